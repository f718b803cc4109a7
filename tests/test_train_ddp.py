"""Data-parallel training: two gloo processes started the way ``torchrun`` starts them
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, torch
torch.set_num_threads(1)
from megacontext.train import Trainer, load_train_config
from megacontext.train.labels import module_hash
cfg = load_train_config("configs/train-tiny.yaml", sys.argv[1:])
t = Trainer(cfg)
res = t.run()
lora = {n: p for n, p in t.base.model.named_parameters() if "lora_" in n}
print("STATE " + json.dumps({"rank": t.rank, "world": t.world, "done": res["done"],
      "gistnet": module_hash(t.gistnet), "lensnet": module_hash(t.lensnet),
      "lora": module_hash(lora)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_stay_in_sync(tmp_path):
    port = _free_port()
    sets = [
        f"artifacts={tmp_path}/a",
        f"runs_dir={tmp_path}/runs",
        "batch_size=1",
        "label_windows=1",
        "early_stop.windows=1",
        "labels.max_candidates=8",
        "warm_gist.steps=1",
        "warm_lens.steps=1",
        "b1.steps=2",
        "b2.steps=2",
        "b3.steps=1",
    ]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *sets],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    states = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("STATE ")][-1]
        states.append(json.loads(line[6:]))
    assert [s["rank"] for s in states] == [0, 1] and all(s["world"] == 2 for s in states)
    assert all(s["done"] == 5 for s in states)
    for key in ("gistnet", "lensnet", "lora"):
        assert states[0][key] == states[1][key], f"{key} diverged between ranks"
    deltas = tmp_path / "a" / "deltas" / "tiny"
    assert (deltas / "cycle1-b2.parquet").is_file()
    assert (deltas / "cycle1-b2-rank1.parquet").is_file()  # each rank labels its own windows
    ckpt = tmp_path / "a" / "checkpoints" / "tiny" / "cycle1-b3" / "trainer.json"
    assert json.loads(ckpt.read_text())["gistnet_hash"] == states[0]["gistnet"]
