"""Where the attention sink sits (``sink_at``), probed on training-split text.

Once a history outgrows the budget, the working context (WC) starts with gists, and
the base model reads one sink token before them (``attention_sink``). Under the
bounded schemes the gists sit far behind the recent window (``max_gap`` positions at
most), so a sink at position 0 is thousands of positions before the first token the
model reads as text, where every sequence the model was trained on starts right
after its first token. This probe reads, per target, the next 64 tokens after 4k,
16k and 32k tokens of training-split text (``--part code|prose|paper``, the texts of
``bench/lexical_share_probe.py``), ``W = 1,024``, the shipped memory:

- ``truncation`` (the baseline every row is reported against) and ``streaming``;
- ``window@P``: no gists at all, the sink token at position 0 and the recent
  window's tokens (as many as the recency WC holds) from position ``P``
  (1, 96, 4,000): what the distance between the sink and the window costs alone;
- ``recency/start``, ``recency/window``: the recency WC with the sink at position 0
  or right before its first token entry (:func:`~megacontext.working_context.
  sink_position`);
- ``lexical/start``, ``lexical/window``: the default focus (``lens: lexical``, the
  ingest's refocuses and the check) with ``sink_at`` start or window, the check
  included.

Rows go to ``OUT/rows.parquet`` as they finish; ``OUT/results.md`` is rewritten. Run
(one process per part, one thread each)::

    OMP_NUM_THREADS=1 uv run python bench/sink_place_probe.py --part paper --targets 8 \\
        --out docs/results/<date>-sink/train-paper
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import megacontext as mc
from megacontext.eval.peers import View, streaming_view, truncation_view, view_nll
from megacontext.focus import FocusLoop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lexical_share_probe as lsp
import positions_long_history as plh

H, W = 64, 1024
LENGTHS = (4096, 16384, 32768)
WINDOW_AT = (1, 96, 4000)


def window_view(base: mc.Base, window: torch.Tensor, at: int) -> View:
    """The sink token at position 0, then ``window``'s tokens from position ``at``."""
    ids = torch.cat([torch.tensor([base.sink_token_id]), window])
    pos = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(at, at + window.numel())])
    return View(f"window@{at}", base.embed(ids), pos, at + window.numel())


def views(base: mc.Base, gist: mc.GistNet, hist: torch.Tensor) -> dict[str, View]:
    """Every row's view of ``hist`` but truncation's."""
    loop = FocusLoop(base, gist, None, mc.MegaContextConfig(model=base.name, w_max=W, levels=3))
    loop.ingest(hist)
    out = {"streaming": streaming_view(base, hist, W)}
    for place in ("start", "window"):
        out[f"recency/{place}"] = plh.gist_view(base, loop, W, sink_at=place)
    recent = int(out["recency/window"].meta["per_level"][0])  # the recency WC's tokens
    for at in WINDOW_AT:
        out[f"window@{at}"] = window_view(base, hist[-recent:], at)
    keep = loop.config
    for place in ("start", "window"):
        loop.config = keep.model_copy(update={"sink_at": place})
        try:
            out[f"lexical/{place}"] = plh.lexical_view(base, loop, W)
        finally:
            loop.config = keep
    return out


def render(rows: list[dict], command: str) -> str:
    """NLL minus truncation, mean over targets, per setting and length."""
    trunc = {r["item"]: r["nll"] for r in rows if r["setting"] == "truncation"}
    names = list(dict.fromkeys(r["setting"] for r in rows if r["setting"] != "truncation"))
    part = rows[0]["part"] if rows else "?"
    out = [
        "# Where the attention sink sits (training split)",
        "",
        f"`{command}`",
        "",
        f"## {part}, W = {W:,}: NLL minus truncation (mean over targets)",
        "",
        "| setting | " + " | ".join(f"T={t:,} (n)" for t in LENGTHS) + " |",
        "|---|" + "---:|" * len(LENGTHS),
    ]
    for name in names:
        cells = []
        for t in LENGTHS:
            d = [r["nll"] - trunc[r["item"]] for r in rows if (r["setting"], r["T"]) == (name, t)]
            cells.append(f"{sum(d) / len(d):+.4f} ({len(d)})" if d else "")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if trunc:
        out += ["", f"Truncation's mean NLL: {sum(trunc.values()) / len(trunc):.4f}."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=tuple(lsp.TEXTS), required=True)
    ap.add_argument("--targets", type=int, default=6, help="targets per length")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    command = "OMP_NUM_THREADS=1 uv run python bench/sink_place_probe.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    base, gist = lsp.load_memory()
    ids = lsp.TEXTS[args.part](base, max(LENGTHS) + H + 4096 * (args.targets - 1))
    emit = lsp.row_writer([], args.out, render, command)

    for e in [max(LENGTHS) + H + 4096 * i for i in range(args.targets)]:
        tg = ids[e - H : e]
        key = {"part": args.part, "item": f"end{e}"}
        trunc = truncation_view(base, ids[e - H - W : e - H], W)
        emit(
            {**key, "T": 0, "setting": "truncation", "nll": float(view_nll(base, trunc, tg).mean())}
        )
        for T in LENGTHS:
            for name, view in views(base, gist, ids[e - H - T : e - H]).items():
                nll = float(view_nll(base, view, tg).mean())
                emit({**key, "T": T, "setting": name, "nll": nll, "kept": view.meta.get("kept")})


if __name__ == "__main__":
    main()
