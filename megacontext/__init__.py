"""megacontext: a frozen Hugging Face LM reads an unbounded history through a
fixed budget of active entries (a gist tree, a learned focus policy, and a
RoPE-preserving KV cache).

``import megacontext as mc``. Heavy modules (torch, transformers) load on first
use of the names that need them, so importing the package is cheap and never
needs a GPU, a compiler or the network.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BackendUnavailableError,
    ConfigError,
    InputError,
    InvariantError,
    MegaContextError,
    ModelNotAvailableError,
    StorageError,
    UnsupportedModelError,
)

# public name -> submodule that defines it (loaded on first access)
_LAZY: dict[str, str] = {
    "MegaContextConfig": "config",
    "Base": "base",
    "load_base": "base",
    "token_nll": "nll",
    "profiling": "profiling",
    "MegaContextTree": "tree",
    "mean_pool": "tree",
    "GistNet": "gistnet",
    "GistNetConfig": "gistnet",
    "LensNet": "lensnet",
    "LensNetConfig": "lensnet",
    "WorkingContext": "working_context",
    "FocusAllocator": "allocator",
    "Action": "allocator",
    "Telemetry": "telemetry",
    "MegaContext": "runtime",
    "Session": "runtime",
    "SessionBatch": "runtime",
    "MegaContextForCausalLM": "hf",
    "Chat": "hf",
    "Trainer": "train",
    "TrainConfig": "train",
    "MegaContextCache": "cache",
    "patch": "hook",
    "unpatch": "hook",
    "patched": "hook",
    "ShardDataset": "data",
    "build_shards": "data",
    "synthetic": "synthetic",
    "available_memories": "pretrained",
    "read_memory": "pretrained",
    "export_memory": "pretrained",
}

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "InputError",
    "InvariantError",
    "MegaContextError",
    "ModelNotAvailableError",
    "StorageError",
    "UnsupportedModelError",
    "__version__",
    # lazily loaded (keep in step with _LAZY)
    "Base",
    "MegaContextConfig",
    "load_base",
    "profiling",
    "token_nll",
    "MegaContextTree",
    "mean_pool",
    "GistNet",
    "GistNetConfig",
    "LensNet",
    "LensNetConfig",
    "WorkingContext",
    "FocusAllocator",
    "Action",
    "Telemetry",
    "MegaContext",
    "Session",
    "SessionBatch",
    "MegaContextForCausalLM",
    "Chat",
    "Trainer",
    "TrainConfig",
    "MegaContextCache",
    "patch",
    "unpatch",
    "patched",
    "ShardDataset",
    "build_shards",
    "synthetic",
    "available_memories",
    "read_memory",
    "export_memory",
]

if TYPE_CHECKING:
    from . import profiling, synthetic
    from .allocator import Action, FocusAllocator
    from .base import Base, load_base
    from .cache import MegaContextCache
    from .config import MegaContextConfig
    from .data import ShardDataset, build_shards
    from .gistnet import GistNet, GistNetConfig
    from .hf import Chat, MegaContextForCausalLM
    from .hook import patch, patched, unpatch
    from .lensnet import LensNet, LensNetConfig
    from .nll import token_nll
    from .pretrained import available_memories, export_memory, read_memory
    from .runtime import MegaContext, Session, SessionBatch
    from .telemetry import Telemetry
    from .train import TrainConfig, Trainer
    from .tree import MegaContextTree, mean_pool
    from .working_context import WorkingContext


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megacontext' has no attribute {name!r}")
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if name == module else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
