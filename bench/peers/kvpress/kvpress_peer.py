"""kvpress presses as a peer of a megacontext evaluation run, at equal KV budget.

Usage (inside the isolated environment that ``run.sh`` builds)::

    python kvpress_peer.py RUN_DIR [--presses snapkv,expected_attention,knorm,streaming_llm]

Reads ``RUN_DIR/tasks.parquet`` (written by ``megacontext eval``: per comparison the
history token ids ``[T]``, the target ids ``[H]``, the budget ``W``, the row group's
tags) and ``RUN_DIR/meta.json`` (the base model's local directory and dtype), and
writes ``RUN_DIR/peers/kvpress.parquet`` atomically: one row per task and press.
This script does not import megacontext (it runs in kvpress's environment, whose
transformers is older than megacontext's).

Per task and press, the kvpress way (its pipeline's ``_forward``/``generate_answer``):

1. prefill ``history[:T-1]`` through ``model.model`` inside ``with press(model)``:
   the press's forward hooks compress every layer's cache right after that layer's
   attention, keeping ``int(L * (1 - compression_ratio))`` pairs per KV head
   (``kvpress.utils.compute_n_kept``, ``L = T - 1``). The ratio is chosen as
   ``1 - (W - 0.5) / L`` so exactly ``W - 1`` pairs survive (asserted on every layer
   of the cache, and against ``compute_n_kept``);
2. score the targets teacher-forced: one forward over ``[history[T-1]] +
   targets[:-1]`` on the compressed cache with ``position_ids`` ``T-1 .. T+H-2``
   (RoPE positions continue the original sequence, as kvpress's pipeline does).
   The last history token joins the cache uncompressed, so every target is predicted
   from exactly ``W`` history entries per layer and KV head (``entries``, read from
   the cache) plus the targets before it: the same count as megacontext's peers
   (truncation reads the last ``W`` tokens). Why not prefill all ``T`` tokens: the
   hooks compress a layer only after its attention ran over the whole prefill, so
   the prefill's last logits (the prediction of ``targets[0]``) come from the
   uncompressed context;
3. for tasks with an answer spec (needle, LongBench), the cache is cut back to the
   ``W - 1`` compressed entries and a greedy answer is decoded from the same
   position (``generated``; megacontext scores it with the suite's own metric when
   it folds the rows);
4. the same steps with no press give ``full_nll_peer``, the cross-check against the
   run's ``full`` row (same tokens, same positions, same dtype).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

PRESSES = ("snapkv", "expected_attention", "knorm", "streaming_llm")


def make_press(name: str, ratio: float):
    from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress

    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio)  # window_size 64, kernel_size 5
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=ratio)  # 512 future positions
    if name == "knorm":
        return KnormPress(compression_ratio=ratio)
    if name == "streaming_llm":
        return StreamingLLMPress(compression_ratio=ratio)  # 4 sinks, original positions
    raise SystemExit(f"unknown press {name!r}; expected some of {', '.join(PRESSES)}")


def ratio_for(prefill: int, keep: int) -> float:
    """The compression ratio that makes kvpress keep exactly ``keep`` of ``prefill``
    pairs: ``int(prefill * (1 - r))`` lands mid-way in ``[keep, keep + 1)``."""
    from kvpress.utils import compute_n_kept

    if keep >= prefill:
        return 0.0
    r = 1.0 - (keep + 0.5) / prefill
    assert compute_n_kept(prefill, r) == keep, (prefill, keep, r)
    return r


def cache_lengths(cache) -> list[int]:
    """Kept pairs per layer (every head of a layer has the same count: presses gather
    a fixed number of indices per KV head)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def cut_cache(cache, n: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]


def cut_answer(text: str, stop) -> str:
    """megacontext's answer cut: no leading blanks, up to the first stop string."""
    text = text.lstrip()
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()


@torch.no_grad()
def run_task(model, tok, task: dict, press_name: str | None, device) -> dict:
    from transformers import DynamicCache

    hist = torch.tensor(task["history"], dtype=torch.long, device=device)
    tgt = torch.tensor(task["target"], dtype=torch.long, device=device)
    T, H, W = hist.numel(), tgt.numel(), int(task["budget"])
    L = T - 1
    keep = min(W, T) - 1  # pairs of history[:T-1] kept; the last token makes it W
    cache = DynamicCache()
    t0 = time.perf_counter()
    if press_name is None:
        ratio = 0.0
        model.model(input_ids=hist[None, :L], past_key_values=cache)
        want = L
    else:
        ratio = ratio_for(L, keep)
        press = make_press(press_name, ratio)
        with press(model):
            model.model(input_ids=hist[None, :L], past_key_values=cache)
        want = keep
    kept = cache_lengths(cache)
    assert all(k == want for k in kept), f"cache keeps {kept}, expected {want} in every layer"
    for layer in cache.layers:  # [B, kv_heads, kept, head_dim]: every head the same count
        assert layer.keys.shape[2] == want and layer.values.shape[2] == want
    x = torch.cat([hist[L:], tgt[:-1]])[None]
    pos = torch.arange(L, L + H, device=device)[None]
    out = model(input_ids=x, past_key_values=cache, position_ids=pos)
    logp = out.logits[0].float().log_softmax(-1)
    nll = -logp.gather(1, tgt[:, None])[:, 0].cpu()
    row = {
        "nll": float(nll.mean()),
        "token_nll": [float(v) for v in nll],
        "entries": want + 1,
        "compression_ratio": ratio,
        "history_tokens": T,
        "horizon": H,
    }
    answer = task["answer"]
    if answer is not None and press_name is not None:
        cut_cache(cache, want)
        row["generated"] = generate(model, tok, cache, hist[L:], L, answer, device)
    row["seconds"] = time.perf_counter() - t0
    return row


def generate(model, tok, cache, last, pos0: int, answer: dict, device) -> str:
    """Greedy decoding as megacontext's ``view_generate``: stop at EOS, or once the
    text (after its leading blanks) holds a stop string."""
    stop = tuple(answer.get("stop", ("\n",)))
    eos = tok.eos_token_id
    out = model(
        input_ids=last[None],
        past_key_values=cache,
        position_ids=torch.tensor([[pos0]], device=device),
        logits_to_keep=1,
    )
    toks: list[int] = []
    pos = pos0 + 1
    for _ in range(int(answer["max_new"])):
        t = int(out.logits[0, -1].argmax())
        if t == eos:
            break
        toks.append(t)
        text = tok.decode(toks).lstrip()
        if text and any(s in text for s in stop):
            break
        out = model(
            input_ids=torch.tensor([[t]], device=device),
            past_key_values=cache,
            position_ids=torch.tensor([[pos]], device=device),
        )
        pos += 1
    return cut_answer(tok.decode(toks), stop)


def write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--out", type=Path, default=None, help="default RUN_DIR/peers/kvpress.parquet")
    args = ap.parse_args(argv)
    run = args.run_dir
    presses = [p for p in args.presses.split(",") if p]
    for p in presses:
        make_press(p, 0.0)  # unknown names fail before any work
    tasks_path, meta_path = run / "tasks.parquet", run / "meta.json"
    for p in (tasks_path, meta_path):
        if not p.is_file():
            raise SystemExit(f"{p}: missing (run `megacontext eval ... --out {run}` first)")
    meta = json.loads(meta_path.read_text())
    src = meta.get("base_model") or {}
    sha = hashlib.sha256(tasks_path.read_bytes()).hexdigest()
    if (meta.get("tasks") or {}).get("sha256") != sha:
        raise SystemExit(f"{tasks_path}: its SHA-256 differs from meta.json's tasks.sha256")
    if not src.get("path"):
        raise SystemExit(
            f"{meta_path}: the base model {src.get('name')!r} has no directory to load "
            "(a model built in memory, e.g. tiny-llama, cannot be read by a peer)"
        )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, src.get("dtype", "float32"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(src["path"], dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(src["path"])
    versions = (
        f"kvpress {md.version('kvpress')}, transformers {md.version('transformers')}, "
        f"torch {torch.__version__}"
    )
    tasks = pq.read_table(tasks_path).to_pylist()
    rows = []
    for task in tasks:
        tags = json.loads(task["tags"])
        answer = None if task["answer"] is None else json.loads(task["answer"])
        task = {**task, "answer": answer}
        full = run_task(model, tok, task, None, device)
        for p in presses:
            r = run_task(model, tok, task, p, device)
            print(
                f"kvpress: task {task['task']} {task['doc']} W={task['budget']} {p}: "
                f"entries {r['entries']} nll {r['nll']:.4f} (full {full['nll']:.4f})",
                file=sys.stderr,
                flush=True,
            )
            rows.append(
                {
                    **tags,
                    "suite": task["suite"],
                    "doc": task["doc"],
                    "budget": int(task["budget"]),
                    "method": f"kvpress_{p}",
                    **r,
                    "full_nll_peer": full["nll"],
                    "answer": None if answer is None else json.dumps(answer, sort_keys=True),
                    "task": int(task["task"]),
                    "tasks_sha256": sha,
                    "versions": versions,
                    "press": repr(make_press(p, r["compression_ratio"])),
                    "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""),
                }
            )
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    out = args.out or run / "peers" / "kvpress.parquet"
    write_atomic(table, out)
    print(f"kvpress: {len(rows)} rows -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
