"""Does a chat recall a first-turn fact once the transcript is past the budget?

Issue 16's check on the embedded model: the first user turn states a fact ("my locker
code is NNNN"), later turns fill the transcript with held-out prose (LongBench
NarrativeQA paragraphs, each answered by a fixed short assistant reply) until it is
several times the budget, and the last turn asks for the fact. The conversation runs
through ``mc.Chat`` on ``mc.MegaContextForCausalLM`` (the shipped memory unless
``--untrained``) at ``w_max = W``; beside it the frozen base reads the same rendered
prompt whole (full context) and cut to its last ``W`` tokens (truncation). Greedy
replies; a trial is recalled when the reply contains the code. Run::

    OMP_NUM_THREADS=2 uv run python bench/chat_recall.py --trials 5 --out DIR

The check only tells the methods apart on a base model that recalls the fact with the
whole chat in view: the embedded SmolLM2-135M-Instruct does not (full context 0 of 20
at 1.5k tokens, ``docs/results/2026-12-04-cpu-heldout/chat-recall-1500/``). With a
stronger chat model (any Llama-family Hugging Face id or folder with a chat template)
run ``--model ID --untrained``: the shipped memory is trained for the embedded model
only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

import megacontext as mc
from megacontext.train.config import apply_overrides

LONGBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "longbench"
REPLY = "Thanks, noted."


def filler_paragraphs() -> list[str]:
    rows = (LONGBENCH / "narrativeqa.jsonl").read_text(encoding="utf-8").splitlines()
    text = "\n".join(json.loads(r)["context"] for r in rows)
    paras = [p.strip() for p in text.split("\n\n") if 200 < len(p.strip()) < 1500]
    return paras


def trial(model, base, paras, seed: int, target_tokens: int, w: int) -> dict:
    rng = random.Random(seed)
    code = f"{rng.randrange(1000, 10000)}"
    msgs = [
        {"role": "user", "content": f"Please remember this: my locker code is {code}."},
        {"role": "assistant", "content": "Got it, I will remember your locker code."},
    ]
    tok = model.tokenizer
    start = rng.randrange(len(paras))
    k = 0

    def length(m: list[dict]) -> int:
        text = tok.apply_chat_template(m, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    while length(msgs) < target_tokens:
        msgs += [
            {"role": "user", "content": paras[(start + k) % len(paras)]},
            {"role": "assistant", "content": REPLY},
        ]
        k += 1
    question = "What is my locker code? Answer with the number only."
    chat = mc.Chat(model, messages=msgs)
    t0 = time.perf_counter()
    reply = chat.send(question, max_new_tokens=12)
    mc_s = time.perf_counter() - t0
    rendered = tok.apply_chat_template(
        [*msgs, {"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor(tok.encode(rendered, add_special_tokens=False))

    def greedy(x: torch.Tensor) -> str:
        out = base.model.generate(
            x[None],
            attention_mask=torch.ones(1, x.numel(), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
        )
        return tok.decode(out[0, x.numel() :], skip_special_tokens=True)

    full = greedy(ids) if ids.numel() <= (base.max_positions or ids.numel()) else ""
    trunc = greedy(ids[-w:])
    return {
        "seed": seed,
        "code": code,
        "tokens": int(ids.numel()),
        "turns": len(msgs) // 2 + 1,
        "megacontext": reply,
        "full": full,
        "truncation": trunc,
        "recalled_megacontext": code in reply,
        "recalled_full": code in full,
        "recalled_truncation": code in trunc,
        "megacontext_s": mc_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--tokens", type=int, default=3000, help="transcript length before the question"
    )
    ap.add_argument("--w-max", type=int, default=512)
    ap.add_argument("--untrained", action="store_true", help="mean pooling + recency")
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="base model: the embedded smollm2-135m (default) or a Llama-family chat "
        "model's HF id or folder (needs --untrained: the shipped memory is smollm2's)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a MegaContextConfig field of the memory's system (value parsed as YAML), "
        "e.g. lens=lexical",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.model != "smollm2-135m" and not args.untrained:
        ap.error(f"--model {args.model}: the shipped memory is for smollm2-135m; add --untrained")
    args.out.mkdir(parents=True, exist_ok=True)
    base = mc.load_base(args.model)
    changes = apply_overrides({}, args.set)  # KEY=VALUE, values parsed as YAML
    if args.untrained:
        system = mc.MegaContext(
            base, None, None, mc.MegaContextConfig(model=base.name, w_max=args.w_max, **changes)
        )
    else:
        system = mc.MegaContext.pretrained("smollm2-135m", base=base, w_max=args.w_max, **changes)
    model = mc.MegaContextForCausalLM(system)
    paras = filler_paragraphs()
    rows = []
    for i in range(args.trials):
        rows.append(trial(model, base, paras, 10_000 + i, args.tokens, args.w_max))
        print(rows[-1], flush=True)
    n = len(rows)
    lines = [
        "# Chat recall of a first-turn fact beyond the budget",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} uv run python "
        + " ".join(sys.argv)
        + "`  ",
        f"{base.name} ({base.dtype}), CPU, {torch.get_num_threads()} threads; memory: "
        + ("mean pooling" if args.untrained else "shipped smollm2-135m")
        + (f", config changes {changes}" if changes else "")
        + f"; W = {args.w_max}; transcripts of {min(r['tokens'] for r in rows):,}–"
        f"{max(r['tokens'] for r in rows):,} tokens.",
        "",
        "| method | recalled |",
        "|---|---:|",
    ]
    for m in ("full", "truncation", "megacontext"):
        lines.append(f"| {m} | {sum(r[f'recalled_{m}'] for r in rows)}/{n} |")
    lines += ["", "| seed | code | full | truncation | megacontext |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [
            json.dumps(r[m])[1:-1].replace("|", "/") for m in ("full", "truncation", "megacontext")
        ]
        lines.append(f"| {r['seed']} | {r['code']} | " + " | ".join(cells) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
