"""Training: warm start, then alternating B1 (GistNet) -> B2 (LensNet) -> B3 (LoRA) cycles.

See docs/training.md. Entry points: :class:`Trainer`, :func:`load_train_config`,
:func:`load_checkpoint`, :func:`label_snapshot`, ``megacontext train``,
``megacontext label``.
"""

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import TrainConfig, load_train_config
from .labels import label_snapshot, read_labels, write_labels
from .rollout import Snapshot, rollout
from .trainer import Trainer

__all__ = [
    "Snapshot",
    "TrainConfig",
    "Trainer",
    "label_snapshot",
    "latest_checkpoint",
    "load_checkpoint",
    "load_train_config",
    "read_labels",
    "rollout",
    "write_labels",
]
