"""How much of the budget the lexical focus may retrieve, chosen on training-split data.

Every block the lexical scorer opens (``lens: lexical``) displaces ``bs - 1`` recent
token entries, so ``retrieval_share`` (at most ``floor(share · w_max / bs)`` blocks per
refocus) trades what retrieval brings against what the recent window loses. This probe
reads, per setting, the shipped memory (its GistNet, three levels, nearby positions,
the attention sink) after its ingest refocuses, on **training-split** material only:

- ``code`` / ``prose`` / ``paper``: the next 64 tokens after 4k, 16k and 32k tokens
  of the standard library's training-split modules in name order / the training
  split's pydoc topics / the training-split LongBench Qasper and MultiFieldQA-en
  contexts (scientific and web prose no suite reads), ``W = 1,024``, beside
  truncation and the recency WC (before session 13 ``code`` and ``prose`` read every
  module and topic, a few validation documents among them);
- ``needle``: pass-key and key-value tasks (``--kinds``: also code identifiers) on
  training filler with training seeds
  (:func:`megacontext.synthetic.train_seed` namespace), 3,072 tokens at ``W = 512``,
  depths 10 %–90 %: the answer's NLL and the recovered fraction
  ``(NLL_trunc - NLL) / (NLL_trunc - NLL_full)`` of the mean NLLs;
- ``needle32``: pass keys in 32,768 tokens of training filler at ``W = 1,024``, depths
  10 %, 50 %, 90 % (no full context: it does not fit): the answer's NLL;
- ``needle32rep``: the same, in a 9,000-token piece of training filler repeated (the
  held-out filler is that short, so the text before its question has far copies).

Settings are ``NAME=KEY:VALUE,...`` of :class:`megacontext.MegaContextConfig` fields
(``share0.25=retrieval_share:0.25``; ``none`` turns an optional field off). A setting
run with ``verify_peak:none`` records each check's ``peak``, and the table adds what
``verify_peak`` 0.5 / 1 / 2 would read (``NAME+peakC``: :func:`with_peaks`). Rows go to
``OUT/rows.parquet`` as they finish and ``OUT/results.md`` is rewritten. Run (one process per part, one thread each)::

    OMP_NUM_THREADS=1 uv run python bench/lexical_share_probe.py --part code \\
        --setting share0.25=retrieval_share:0.25 --setting share0.125=retrieval_share:0.125 \\
        --out docs/results/<date>-train-probe/lexical-share-code
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import megacontext as mc
from megacontext import synthetic
from megacontext.data import stdlib_prose
from megacontext.eval.longbench import load_longbench, longbench_dir
from megacontext.eval.peers import full_view, truncation_view, view_nll
from megacontext.focus import FocusLoop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import positions_long_history as plh

H = 64
MEMORY = Path(__file__).resolve().parents[1] / "megacontext/memories/smollm2-135m"
LENGTHS = (4096, 16384, 32768)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def parse_setting(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition("=")
    upd: dict = {}
    for part in filter(None, body.split(",")):
        key, _, value = part.partition(":")
        if value.lower() == "none":  # an optional field turned off (verify_peak:none)
            upd[key] = None
            continue
        for kind in (int, float, str):  # model_copy(update=) does not coerce: 64, not 64.0
            try:
                upd[key] = kind(value)
                break
            except ValueError:
                continue
    mc.MegaContextConfig(**upd)  # a typed error for a field or value that is not one
    return name, upd


def read(base: mc.Base, loop: FocusLoop, W: int, upd: dict, targets: torch.Tensor) -> dict:
    """NLL of ``targets`` after the lexical WC of ``loop``'s tree under ``upd``."""
    keep = loop.config
    loop.config = keep.model_copy(update=upd)
    try:
        view = plh.lexical_view(base, loop, W)
    finally:
        loop.config = keep
    m = view.meta
    return {
        "nll": float(view_nll(base, view, targets).mean()),
        "actions": m["actions"],
        # verify_tokens > 0: whether the focus was kept, and what each WC read
        "kept": m.get("kept"),
        "nll_focus": m.get("nll_focus"),
        "nll_recency": m.get("nll_recency"),
        "unmatched": m.get("unmatched"),
        "peak": m.get("peak"),
    }


def _repeat(base: mc.Base, ids: torch.Tensor, need: int) -> torch.Tensor:
    """``ids`` joined with blank lines and repeated until ``need`` tokens."""
    sep = base.encode("\n\n")
    one = torch.cat([ids, sep])
    return one.repeat(-(-need // one.numel()))[:need]


def train_code_ids(base: mc.Base, need: int) -> torch.Tensor:
    """The standard library's top-level modules in the training split, in name order
    (``positions_long_history.code_ids``), until ``need`` tokens (repeated if short)."""
    return _repeat(base, plh.code_ids(base, need, "train"), need)


def train_prose_ids(base: mc.Base, need: int) -> torch.Tensor:
    """The training split's pydoc topics (:func:`megacontext.data.stdlib_prose`),
    repeated until ``need`` tokens."""
    return _repeat(base, base.encode(stdlib_prose("train")), need)


def paper_ids(base: mc.Base, need: int) -> torch.Tensor:
    """Long English prose the trainer's rule puts in the training split and no suite
    reads: the LongBench Qasper and MultiFieldQA-en contexts of the *train* split
    (:func:`megacontext.eval.longbench.load_longbench`; the LongBench suite reads only
    the validation rows, and NarrativeQA, the held-out prose, is left out), in file
    order, repeated until ``need`` tokens."""
    folder = longbench_dir()
    if folder is None:
        raise SystemExit("--part paper needs ../shared/data/longbench")
    rows = load_longbench(folder, tasks=("qasper", "multifieldqa_en"), split="train")
    return _repeat(base, torch.cat([base.encode(r.context.strip() + "\n\n") for r in rows]), need)


TEXTS = {"code": train_code_ids, "prose": train_prose_ids, "paper": paper_ids}


def continuation(base, gist, part: str, settings, ntargets: int, emit) -> None:
    W = 1024
    need = max(LENGTHS) + H + 4096 * (ntargets - 1)
    ids = TEXTS[part](base, need)
    for e in [max(LENGTHS) + H + 4096 * i for i in range(ntargets)]:
        tg = ids[e - H : e]
        trunc = float(view_nll(base, truncation_view(base, ids[e - H - W : e - H], W), tg).mean())
        for T in LENGTHS:
            cfg = mc.MegaContextConfig(model=base.name, w_max=W, levels=3)
            loop = FocusLoop(base, gist, None, cfg)
            loop.ingest(ids[e - H - T : e - H])
            rec = float(view_nll(base, plh.gist_view(base, loop, W), tg).mean())
            key = {"part": part, "item": f"end{e}", "T": T, "W": W}
            emit({**key, "setting": "truncation", "nll": trunc, "actions": 0})
            emit({**key, "setting": "recency", "nll": rec, "actions": 0})
            for name, upd in settings:
                emit({**key, "setting": name, **read(base, loop, W, upd, tg)})


def needles(base, gist, settings, reps: int, emit, far: bool = False, kinds=None) -> None:
    W, length, i = (1024, 32768, 0) if far else (512, 3072, 0)
    for task in kinds or (("passkey",) if far else ("passkey", "kv")):
        for depth in (0.1, 0.5, 0.9) if far else DEPTHS:
            for _ in range(reps):
                t = synthetic.GENERATORS[task](
                    base.tokenizer,
                    length=length,
                    depth=depth,
                    seed=synthetic.train_seed(8 if far else 7, i),
                    haystack="train",
                )
                i += 1
                hist, tgt = base.encode(t.context), base.encode(t.target)
                key = {"part": "needle32" if far else "needle"}
                key["item"] = f"{task}/d{depth}/s{t.meta['seed']}"
                key.update(T=length, W=W)
                # 32k tokens do not fit the base model's positions: no full context
                read_task(base, gist, settings, key, hist, tgt, not far, emit)


def read_task(base, gist, settings, key: dict, hist, tgt, full: bool, emit) -> None:
    """Emit the rows of one needle task: truncation, full context (``full``), the
    recency WC, then each setting's lexical WC over one ingest of ``hist`` at
    ``key["W"]``."""
    W = key["W"]
    trunc = float(view_nll(base, truncation_view(base, hist, W), tgt).mean())
    emit({**key, "setting": "truncation", "nll": trunc, "actions": 0})
    if full:
        nll = float(view_nll(base, full_view(base, hist), tgt).mean())
        emit({**key, "setting": "full", "nll": nll, "actions": 0})
    loop = FocusLoop(base, gist, None, mc.MegaContextConfig(model=base.name, w_max=W, levels=3))
    loop.ingest(hist)
    # what a focus the check drops reads (with_peaks)
    rec = float(view_nll(base, plh.gist_view(base, loop, W), tgt).mean())
    emit({**key, "setting": "recency", "nll": rec, "actions": 0})
    for name, upd in settings:
        emit({**key, "setting": name, **read(base, loop, W, upd, tgt)})


REPEAT_FILLER = 9000  # tokens: about the held-out filler's length (9,062)


def repeated_passkey(base: mc.Base, length: int, depth: float, seed: int):
    """A pass key in ``length`` tokens of one ``REPEAT_FILLER``-token piece of
    training-split pydoc prose (start drawn from ``seed``) repeated: the text before
    the question then has copies far back, as in a haystack built from a short
    filler. Returns ``(history ids, target ids, item name, the statement's token
    span)``."""
    rng = np.random.default_rng([seed, 1])
    key = str(int(rng.integers(10_000, 100_000)))
    text = base.encode(stdlib_prose("train"))
    t0 = int(rng.integers(0, text.numel() - REPEAT_FILLER))
    piece = text[t0 : t0 + REPEAT_FILLER]
    stmt = base.encode(f"\n\nThe pass key is {key}. Remember it: {key} is the pass key.\n\n")
    query = base.encode("\n\nWhat is the pass key? The pass key is")
    n_fill = length - stmt.numel() - query.numel()
    fill = piece.repeat(-(-n_fill // REPEAT_FILLER))[:n_fill]
    at = round(depth * n_fill)
    hist = torch.cat([fill[:at], stmt, fill[at:], query])
    span = (at, at + stmt.numel())
    return hist, base.encode(f" {key}"), f"passkey-rep/d{depth}/s{seed}", span


def needles_repeated(base, gist, settings, reps: int, emit) -> None:
    """``needle32rep``: pass keys at depths 10 %, 50 %, 90 % of 32,768 tokens of a
    repeated training filler (:func:`repeated_passkey`), ``W = 1,024``."""
    W, length, i = 1024, 32768, 0
    for depth in (0.1, 0.5, 0.9):
        for _ in range(reps):
            hist, tgt, item, _ = repeated_passkey(base, length, depth, synthetic.train_seed(9, i))
            i += 1
            key = {"part": "needle32rep", "item": item, "T": length, "W": W}
            read_task(base, gist, settings, key, hist, tgt, False, emit)


# the verify_peak bars render() derives from a setting's recorded peaks
PEAKS = (0.5, 1.0, 2.0)


def with_peaks(rows: list[dict], peaks=PEAKS) -> list[dict]:
    """``rows`` plus, for every setting whose rows record the check's ``peak`` (run
    with ``verify_peak:none``) and every ``c`` in ``peaks``, the rows that setting
    would give with ``verify_peak: c``, named ``NAME+peakC``: a kept focus whose peak
    is below ``c`` reads the recency WC instead (the check's only change), so its NLL
    becomes the item's ``recency`` row (needle rows written before session 17 have
    none: such a row is then left out of the derived setting)."""
    rec = {(r["part"], r["item"], r["T"]): r["nll"] for r in rows if r["setting"] == "recency"}
    # a row of such a setting without a peak (its scorer never acted) reads the same
    # WC under any c
    peaked = {r["setting"] for r in rows if r.get("peak") is not None}
    out = list(rows)
    for r in rows:
        if r["setting"] not in peaked:
            continue
        for c in peaks:
            nll = r["nll"]
            if r.get("kept") and r.get("peak") is not None and r["peak"] < c:
                nll = rec.get((r["part"], r["item"], r["T"]))
                if nll is None:
                    continue
            out.append({**r, "setting": f"{r['setting']}+peak{c:g}", "nll": nll})
    return out


def load_memory() -> tuple[mc.Base, mc.GistNet]:
    """The embedded model and the shipped memory's GistNet (seeded: the probes' runs
    are repeatable)."""
    torch.manual_seed(0)
    return mc.load_base("smollm2-135m"), mc.GistNet.load(MEMORY / "gistnet.safetensors")


def row_writer(rows: list[dict], out: Path, render, command: str):
    """``emit(row)``: append ``row`` to ``rows``, then rewrite ``out/rows.parquet`` and
    ``out/results.md`` (``render(rows, command)`` and a machine line), so a stopped run
    keeps every row it finished."""

    def emit(row: dict) -> None:
        rows.append(row)
        plh.write_rows(rows, out / "rows.parquet")
        (out / "results.md").write_text(
            render(rows, command)
            + f"\n{time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; the shipped memory's GistNet\n"
        )
        print(row, flush=True)

    return emit


def render(rows: list[dict], command: str) -> str:
    out = ["# Lexical retrieval share on training-split data", "", f"`{command}`", ""]
    rows = with_peaks(rows)
    names = list(dict.fromkeys(r["setting"] for r in rows))
    by = {(r["part"], r["item"], r["T"], r["setting"]): r for r in rows}
    items = sorted({(r["part"], r["item"], r["T"]) for r in rows})
    for part in sorted({p for p, _, _ in items}):
        if part in ("needle32", "needle32rep"):
            got = [k for k in items if k[0] == part]
            what = "pass keys" if part == "needle32" else "pass keys in a repeated filler"
            out += [f"## {part}: 32,768-token {what}, W = 1,024 (n = {len(got)})", ""]
            out += ["| setting | answer NLL | answers under 1 nat |", "|---|---:|---:|"]
            for s in names:
                have = [by[(*k, s)]["nll"] for k in got if (*k, s) in by]
                if have:
                    under = sum(x < 1.0 for x in have)
                    out.append(f"| {s} | {statistics.mean(have):.3f} | {under} of {len(have)} |")
            out.append("")
            continue
        if part == "needle":
            got = [k for k in items if k[0] == part and (*k, "full") in by]
            out += [f"## needle (n = {len(got)})", "", "| setting | answer NLL | recovered |"]
            out.append("|---|---:|---:|")
            for s in names:
                have = [k for k in got if (*k, s) in by]
                if not have:
                    continue
                nll = statistics.mean(by[(*k, s)]["nll"] for k in have)
                # of the mean NLLs, as the needle suites define it (a per-task ratio
                # blows up where truncation already reads the needle)
                trunc = statistics.mean(by[(*k, "truncation")]["nll"] for k in have)
                full = statistics.mean(by[(*k, "full")]["nll"] for k in have)
                rec = (trunc - nll) / (trunc - full)
                out.append(f"| {s} | {nll:.3f} | {rec:.2f} |")
            out.append("")
            continue
        Ts = sorted({T for p, _, T in items if p == part})
        out += [f"## {part}, W = 1,024: NLL minus truncation (mean over targets)", ""]
        out.append("| setting | " + " | ".join(f"T={T:,} (n)" for T in Ts) + " |")
        out.append("|---|" + "---:|" * len(Ts))
        for s in names:
            if s == "truncation":
                continue
            cells = []
            for T in Ts:
                ks = [k for k in items if k[0] == part and k[2] == T and (*k, s) in by]
                d = [by[(*k, s)]["nll"] - by[(*k, "truncation")]["nll"] for k in ks]
                cells.append(f"{statistics.mean(d):+.4f} ({len(d)})" if d else "–")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--part",
        choices=("code", "prose", "paper", "needle", "needle32", "needle32rep"),
        required=True,
    )
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=KEY:VALUE,...")
    ap.add_argument("--targets", type=int, default=6, help="targets per length (code/prose)")
    ap.add_argument("--reps", type=int, default=2, help="tasks per task kind and depth")
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=tuple(synthetic.GENERATORS),
        help="needle / needle32 task kinds (default: passkey and kv / passkey)",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/results.md")
    args = ap.parse_args()
    if not (args.setting or args.render):
        ap.error("--setting is required (or --render)")
    settings = [parse_setting(s) for s in args.setting]
    import pyarrow.parquet as pq

    args.out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 uv run python bench/lexical_share_probe.py " + " ".join(
        sys.argv[1:]
    )
    rows: list[dict] = []
    if args.render:
        rows = pq.read_table(args.out / "rows.parquet").to_pylist()
        old = (args.out / "results.md").read_text().splitlines()
        command = next(ln.strip("`") for ln in old if ln.startswith("`"))
        (args.out / "results.md").write_text(render(rows, command) + "\n" + old[-1] + "\n")
        return

    emit = row_writer(rows, args.out, render, command)
    base, gist = load_memory()
    if args.part == "needle32rep":
        needles_repeated(base, gist, settings, args.reps, emit)
    elif args.part in ("needle", "needle32"):
        far = args.part == "needle32"
        needles(base, gist, settings, args.reps, emit, far, args.kinds)
    else:
        continuation(base, gist, args.part, settings, args.targets, emit)


if __name__ == "__main__":
    main()
