"""Histories far past the base model's context: next-64-token NLL per method.

On the embedded model (SmolLM2-135M, trained to 8,192 positions), for real code
(standard-library modules concatenated in name order) and real prose (the text of
``pydoc_data.topics``), the 64 tokens ending at a fixed point ``E`` of the text are
scored after the ``T`` tokens before them, ``T`` in 4k/16k/32k/128k, at budgets
``W`` in 1,024/4,096, for:

- ``truncation`` — the last ``W`` tokens (re-indexed from 0);
- ``streaming`` — StreamingLLM: 4 sinks + the last ``W - 4``, positions in the cache;
- ``infllm`` — InfLLM-style: sinks + retrieved blocks at one fixed position, the
  recent window at true distances (:func:`megacontext.eval.peers.infllm_view`);
- ``mc_hybrid`` / ``mc_global`` / ``mc_compact`` — recency-only MegaContext
  (mean-pool gists, no LensNet: the recency WC of the session at ``w_max = W``)
  with ``positions`` = ``hybrid`` (the default) / ``global`` / ``compact``; one
  tree and one WC, read under each scheme (compact at ``W = 1,024`` only).

Every MegaContext view is read as the runtime reads it: behind the attention sink
when the WC starts with a gist (``attention_sink``, the default;
:func:`megacontext.working_context.with_sink`); ``--no-sink`` reads them without it.

The same targets are read after every ``T``, so a row's NLL moves only with what
the method does with the longer history. Truncation reads the same ``W`` tokens for
every ``T >= W`` and is scored once per ``(corpus, target, W)``; at ``T = W`` every
method reads the whole history and equals truncation.

Also a pass key stated ~30k tokens back in a 32k prose history
(:func:`megacontext.synthetic.passkey`): the answer's NLL per method. And the wall
time and peak RSS of a real ``Session.ingest`` of the 128k code history.

Every finished row is appended to ``rows.parquet`` at once, and ``results.md`` and
``nll_vs_history.png`` are rewritten, so an interrupted run still reports what it
measured. Run (one process, two threads)::

    OMP_NUM_THREADS=2 uv run python bench/positions_long_history.py \\
        --out docs/results/2026-12-04-cpu-positions
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

import megacontext as mc
from megacontext.data import stdlib_modules
from megacontext.eval.peers import (
    View,
    infllm_view,
    streaming_view,
    truncation_view,
    view_nll,
)
from megacontext.focus import FocusLoop, position_gap, refocus_after_ingest
from megacontext.train.config import apply_overrides
from megacontext.working_context import WorkingContext, entry_positions, with_sink

H = 64
LENGTHS = (4096, 16384, 32768, 131072)
BUDGETS = (1024, 4096)
PASSKEY_T, PASSKEY_BACK = 32768, 30000
ALL_SCHEMES = ("hybrid", "global", "compact")
SCHEMES = ALL_SCHEMES
METHODS = ("truncation", "streaming", "infllm", *(f"mc_{s}" for s in ALL_SCHEMES))
# compact is scored at the smaller budget only (time on a shared 2-core CPU)
COMPACT_BUDGETS = (1024,)


def code_ids(base: mc.Base, need: int, split: str | None = None) -> torch.Tensor:
    """Top-level standard-library modules in name order (of ``split``, by
    :func:`megacontext.data.stdlib_modules`; ``None``: all), until ``need`` tokens
    (fewer when the modules run out)."""
    parts, n = [], 0
    for _, path in stdlib_modules(split):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = base.encode(text.strip() + "\n\n\n")
        parts.append(ids)
        n += ids.numel()
        if n >= need:
            break
    return torch.cat(parts)[:need]


def prose_ids(base: mc.Base, need: int) -> tuple[torch.Tensor, int]:
    """The pydoc topics text; repeated when shorter than ``need`` (returns how often)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    ids = base.encode(text)
    reps = -(-need // ids.numel())
    sep = base.encode("\n\n")
    return torch.cat([torch.cat([ids, sep])] * reps)[:need], reps


def heldout_code_ids(data: Path, need: int) -> torch.Tensor:
    """Validation-split code documents of the shard directory ``data`` (the standard
    library as ``megacontext ingest`` split it: text no GistNet trained on), in id order,
    until ``need`` tokens."""
    from megacontext.data import ShardDataset

    ds = ShardDataset(data, "validation", ["code"])
    parts, n = [], 0
    for i in sorted(range(len(ds)), key=lambda i: ds.info(i)["doc_id"]):
        parts.append(torch.from_numpy(ds.tokens(i).astype("int64")))
        n += parts[-1].numel()
        if n >= need:
            return torch.cat(parts)[:need]
    raise SystemExit(f"{data}: the validation split holds {n:,} code tokens, need {need:,}")


def heldout_prose_ids(base: mc.Base, need: int) -> tuple[torch.Tensor, int]:
    """LongBench NarrativeQA contexts (never trained on) concatenated in file order,
    repeated when shorter than ``need`` (returns how often)."""
    import json

    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "longbench"
    rows = (path / "narrativeqa.jsonl").read_text(encoding="utf-8").splitlines()
    sep = base.encode("\n\n")
    ids = torch.cat([torch.cat([base.encode(json.loads(r)["context"]), sep]) for r in rows])
    reps = -(-need // ids.numel())
    return torch.cat([ids] * reps)[:need], reps


def mc_views(base: mc.Base, history: torch.Tensor, budgets, loop: FocusLoop | None = None):
    """``{(W, scheme): View}``: the recency WC of a session at ``w_max = W`` over
    ``history`` (FocusLoop ingest: tree + recency rebuild, what ``Session.ingest``
    does before its prefill), read under both position schemes."""
    if loop is None:
        cfg = mc.MegaContextConfig(model=base.name, w_max=min(budgets))
        loop = FocusLoop(base, None, None, cfg)
        loop.ingest(history)
    out = {}
    for w in budgets:
        wc = WorkingContext.from_tree(loop.tree, w, loop.config.protected_tokens)
        wc.check(loop.tree)
        emb = wc.embeddings(base, loop.tree)
        per_level = torch.bincount(wc.levels.long(), minlength=wc.max_level + 1).tolist()
        for scheme in SCHEMES:
            cfg = mc.MegaContextConfig(model=base.name, w_max=w, positions=scheme)
            gap = position_gap(cfg, base)
            pos, nxt = entry_positions(wc.levels, wc.nodes, wc.block_size, scheme, max_gap=gap)
            meta = {"per_level": per_level, "max_gap": gap}
            e, p = with_sink(base, emb, pos, wc.levels, SINK)
            out[(w, scheme)] = View(f"mc_{scheme}", e, p, nxt, meta)
    return out


def gist_view(base: mc.Base, loop: FocusLoop, w: int, sink_at: str = "window") -> View:
    """The recency WC at ``w_max = w`` of ``loop``'s tree (gisted by its GistNet) under
    the default ``hybrid`` positions, its sink at ``sink_at``."""
    wc = WorkingContext.from_tree(loop.tree, w, loop.config.protected_tokens)
    wc.check(loop.tree)
    cfg = mc.MegaContextConfig(model=base.name, w_max=w, positions="hybrid", far_gap=FAR_GAP)
    gap = position_gap(cfg, base)
    pos, nxt = entry_positions(wc.levels, wc.nodes, wc.block_size, "hybrid", max_gap=gap)
    per_level = torch.bincount(wc.levels.long(), minlength=wc.max_level + 1).tolist()
    emb, pos = with_sink(base, wc.embeddings(base, loop.tree), pos, wc.levels, SINK, sink_at)
    return View("mc_hybrid", emb, pos, nxt, {"per_level": per_level})


def lexical_view(base: mc.Base, loop: FocusLoop, w: int) -> View:
    """The WC at ``w_max = w`` over ``loop``'s tree after the lexical scorer's refocuses
    (``lens: lexical``, ``refocus_iterations: 8``, what a session's ingest runs), under
    the default ``nearby`` positions."""
    cfg = loop.config.model_copy(
        update={
            "w_max": w,
            "lens": "lexical",
            "refocus_iterations": 8,
            "positions": "nearby",
            "far_gap": FAR_GAP,
            **LEXICAL_SET,
        }
    )
    lex = FocusLoop(base, loop.gistnet, None, cfg)
    lex.tree = loop.tree  # the same gists: ingest once per history, not per budget
    lex.rebuild()
    actions: list = []

    def step() -> list:
        got = lex.refocus().actions
        actions.extend(got)
        return got

    refocus_after_ingest(cfg, step, lex.verify)
    wc = lex.wc
    per_level = torch.bincount(wc.levels.long(), minlength=wc.max_level + 1).tolist()
    meta = {"per_level": per_level, "actions": len(actions)}
    if lex.verdicts:  # verify_tokens > 0 and the scorer acted
        v = lex.verdicts[-1]
        meta.update(
            kept=int(v.kept),
            nll_focus=v.nll_focus,
            nll_recency=v.nll_recency,
            unmatched=v.unmatched,
            peak=v.peak,
        )
    emb, pos = with_sink(
        base, wc.embeddings(base, lex.tree), lex.positions(), wc.levels, SINK, cfg.sink_at
    )
    return View("mc_lexical", emb, pos, lex.next_position(), meta)


# --lexical: a lexical-focus row beside each --gistnet recency row
LEXICAL = False
# --lexical-set KEY=VALUE: config fields of the lexical rows, named in their method
LEXICAL_SET: dict = {}
LEXICAL_TAG = ""
# --no-sink: read every MegaContext view without the attention sink (the ablation)
SINK = True
# --far-gap: MegaContextConfig.far_gap of the --gistnet (and --lexical) rows
FAR_GAP: int | None = None

# (name, GistNet or None, levels) from --gistnet / --levels: extra recency MegaContext rows
GISTNETS: list[tuple[str, mc.GistNet | None, int]] = []


def write_rows(rows: list[dict], path: Path) -> None:
    """``rows`` to Parquet at ``path``, every key any row has a column (later rows may
    add one: ``from_pylist`` alone keeps only the first row's keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in rows]), path)


class Run:
    def __init__(self, out: Path, base: mc.Base):
        self.out, self.base = out, base
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.extra: dict[str, str] = {}

    def done(self, method: str, **key) -> bool:
        want = {**key, "method": method}
        return any(all(r.get(k) == v for k, v in want.items()) for r in self.rows)

    def score(self, view: View, targets: torch.Tensor, **key) -> float | None:
        method = key.pop("method", view.method)
        if self.done(method, **key):
            return None
        t0 = time.perf_counter()
        nll = view_nll(self.base, view, targets)
        row = {
            **key,
            "method": method,
            "nll": float(nll.mean()),
            "entries": view.entries,
            "max_position": int(max(int(view.positions.max()), view.next_position + H - 2)),
            "forward_s": time.perf_counter() - t0,
        }
        if "kept" in view.meta:  # a lexical row whose focus the base model checked
            row["focus_kept"] = view.meta["kept"]
        self.rows.append(row)
        self.flush()
        print(row, flush=True)
        return row["nll"]

    def flush(self) -> None:
        write_rows(self.rows, self.out / "rows.parquet")
        (self.out / "results.md").write_text(render(self.rows, self.extra))
        plot(self.rows, self.out / "nll_vs_history.png")


def methods_of(rows: list[dict]) -> list[str]:
    """The fixed methods, then any extra MegaContext variants (``--gistnet``) in order."""
    seen = dict.fromkeys(r["method"] for r in rows)
    return [*(m for m in METHODS if m in seen), *(m for m in seen if m not in METHODS)]


def grid_rows(rows: list[dict]) -> list[dict]:
    """The continuation rows with truncation (scored once per target and W) repeated
    at every T >= W, and every method at T = W equal to truncation (each reads the
    whole history there)."""
    out = []
    for r in rows:
        if r["task"] != "continuation":
            continue
        if r["method"] != "truncation":
            out.append(r)
            continue
        for T in LENGTHS:
            if r["W"] <= T:
                out.append({**r, "T": T})
                if r["W"] == T:
                    out += [
                        {**r, "T": T, "method": m} for m in methods_of(rows) if m != "truncation"
                    ]
    return out


def _mean(rows: list[dict], **key) -> float | None:
    vals = [r["nll"] for r in rows if all(r[k] == v for k, v in key.items())]
    return sum(vals) / len(vals) if vals else None


def _fmt(x: float | None, sign: bool = False) -> str:
    return "" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def render(rows: list[dict], extra: dict[str, str]) -> str:
    lines = ["# Next-64-token NLL after long histories (nats; mean over targets)", ""]
    g = grid_rows(rows)
    methods = methods_of(rows)
    for corpus in ("code", "prose"):
        for W in BUDGETS:
            sub = [r for r in g if r["corpus"] == corpus and r["W"] == W]
            if not sub:
                continue
            Ts = sorted({r["T"] for r in sub})
            n = {T: len({r["target"] for r in sub if r["T"] == T}) for T in Ts}
            lines += [f"## {corpus}, W = {W:,}", ""]
            lines.append("| method | " + " | ".join(f"T={T:,} (n={n[T]})" for T in Ts) + " |")
            lines.append("|---|" + "---:|" * len(Ts))
            for m in methods:
                lines.append(
                    f"| {m} | " + " | ".join(_fmt(_mean(sub, method=m, T=T)) for T in Ts) + " |"
                )
            for m in [x for x in methods if x.startswith("mc_hybrid")]:
                diffs = []
                for T in Ts:
                    a, b = _mean(sub, method=m, T=T), _mean(sub, method="truncation", T=T)
                    diffs.append(None if a is None or b is None else a - b)
                lines.append(
                    f"| {m} − truncation | " + " | ".join(_fmt(d, True) for d in diffs) + " |"
                )
            lines.append("")
    if g:
        lines += ["## Largest position fed (any T, targets included)", ""]
        lines += ["| method | " + " | ".join(f"W={W:,}" for W in BUDGETS) + " |"]
        lines += ["|---|" + "---:|" * len(BUDGETS)]
        for m in methods:
            cells = []
            for W in BUDGETS:
                ps = [r["max_position"] for r in g if r["method"] == m and r["W"] == W]
                cells.append(f"{max(ps):,}" if ps else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    pk = [r for r in rows if r["task"] == "passkey"]
    if pk:
        lines += ["## Pass key ~30k tokens back in a 32k prose history: answer NLL", ""]
        lines += ["| method | " + " | ".join(f"W={W:,}" for W in BUDGETS) + " |"]
        lines += ["|---|" + "---:|" * len(BUDGETS)]
        for m in methods:
            cells = [_fmt(_mean(pk, method=m, W=W)) for W in BUDGETS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    for k, v in extra.items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = grid_rows(rows)
    keys = sorted({(r["corpus"], r["W"]) for r in g})
    if not keys:
        return
    fig = Figure(figsize=(4.2 * len(keys), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (corpus, W) in zip(axes, keys, strict=True):
        sub = [r for r in g if r["corpus"] == corpus and r["W"] == W]
        # the y range holds every method but mc_global, whose points past it are
        # drawn at the top edge with their value written beside them
        near = [r["nll"] for r in sub if r["method"] != "mc_global"]
        top = max(near) + 0.35
        for m in methods_of(rows):
            Ts = sorted({r["T"] for r in sub if r["method"] == m})
            if Ts:
                ys = [_mean(sub, method=m, T=T) for T in Ts]
                line = ax.plot(Ts, [min(y, top) for y in ys], marker="o", label=m)[0]
                for T, y in zip(Ts, ys, strict=True):
                    if y > top:
                        ax.annotate(
                            f"{y:.1f}",
                            (T, top),
                            textcoords="offset points",
                            xytext=(4, -10),
                            fontsize=7,
                            color=line.get_color(),
                        )
        ax.set_ylim(min(near) - 0.1, top + 0.02)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("history length T (tokens)")
        ax.set_title(f"{corpus}, W = {W:,}")
    axes[0].set_ylabel("NLL of the next 64 tokens (nats)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def continuation(run: Run, corpus: str, ids: torch.Tensor, ends, budgets, lengths) -> None:
    base = run.base
    for e in ends:
        targets = ids[e - H : e]
        for W in budgets:
            key = dict(task="continuation", corpus=corpus, target=e, W=W)
            run.score(truncation_view(base, ids[e - H - W : e - H], W), targets, T=W, **key)
        for T in lengths:
            hist = ids[e - H - T : e - H]
            loop = None
            if max(LENGTHS) == T and corpus == "code" and not any("ingest" in k for k in run.extra):
                loop = timed_session_ingest(run, hist)
            views = None
            for W in budgets:
                if T <= W:
                    continue
                key = dict(task="continuation", corpus=corpus, target=e, W=W, T=T)
                run.score(streaming_view(base, hist, W), targets, **key)
                run.score(infllm_view(base, hist, W), targets, **key)
                if views is None:
                    views = mc_views(base, hist, [w for w in budgets if w < T], loop)
                for scheme in SCHEMES:
                    if scheme != "compact" or W in COMPACT_BUDGETS:
                        run.score(views[(W, scheme)], targets, **key)
            for name, gist, levels in GISTNETS:
                gloop = None
                for W in budgets:
                    key = dict(task="continuation", corpus=corpus, target=e, W=W, T=T)
                    recency = not run.done(f"mc_hybrid+{name}", **key)
                    # --resume over recency rows still adds the lexical rows they lack
                    lexical = LEXICAL and not run.done(f"mc_lexical{LEXICAL_TAG}+{name}", **key)
                    if T <= W or not (recency or lexical):
                        continue
                    if gloop is None:
                        cfg = mc.MegaContextConfig(
                            model=base.name, w_max=min(budgets), levels=levels
                        )
                        gloop = FocusLoop(base, gist, None, cfg)
                        gloop.ingest(hist)
                    if recency:
                        view = gist_view(base, gloop, W)
                        run.score(view, targets, method=f"mc_hybrid+{name}", **key)
                    if lexical:
                        view = lexical_view(base, gloop, W)
                        run.score(view, targets, method=f"mc_lexical{LEXICAL_TAG}+{name}", **key)


def timed_session_ingest(run: Run, hist: torch.Tensor) -> FocusLoop:
    """A real session (default ``positions="hybrid"``, w_max 1,024) ingesting the history:
    wall time and the process's peak RSS; its focus loop serves the MC views."""
    base = run.base
    cfg = mc.MegaContextConfig(model=base.name, w_max=min(BUDGETS))
    session = mc.MegaContext(base, None, None, cfg).session()
    t0 = time.perf_counter()
    session.ingest(hist)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pos = session.focus.positions()
    run.extra["128k ingest (Session.ingest, w_max 1,024, hybrid)"] = (
        f"{dt:.1f} s ({hist.numel() / dt:,.0f} tokens/s), peak RSS {rss:,.0f} MiB, "
        f"WC {session.wc}, largest position {int(pos.max())}"
    )
    return session.focus


def passkey(run: Run, budgets) -> None:
    from megacontext.synthetic import passkey as make

    base = run.base
    length = PASSKEY_T
    task = make(base.tokenizer, length=length, depth=1 - PASSKEY_BACK / length, seed=0)
    ids = base.encode(task.context)
    targets = base.encode(task.target)
    at = int(task.meta["needle_span"][0])
    run.extra["pass key"] = (
        f"{task.meta.get('answer')} stated at token ~{at} of {ids.numel():,} "
        f"(~{ids.numel() - at:,} back); answer {targets.numel()} tokens"
    )
    views = mc_views(base, ids, budgets)
    for W in budgets:
        key = dict(task="passkey", corpus="prose", target=0, W=W, T=ids.numel())
        run.score(truncation_view(base, ids, W), targets, **key)
        run.score(streaming_view(base, ids, W), targets, **key)
        run.score(infllm_view(base, ids, W), targets, **key)
        for scheme in SCHEMES:
            if scheme != "compact" or W in COMPACT_BUDGETS:
                run.score(views[(W, scheme)], targets, **key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", type=int, default=2, help="target windows per corpus")
    ap.add_argument("--smoke", action="store_true", help="tiny grid to check the script")
    ap.add_argument(
        "--resume", action="store_true", help="keep the rows already in OUT/rows.parquet"
    )
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the table and plot of OUT's rows"
    )
    ap.add_argument(
        "--texts",
        choices=("stdlib", "heldout"),
        default="stdlib",
        help="stdlib: stdlib modules + pydoc topics (the default); heldout: validation-split "
        "code of --data + LongBench NarrativeQA (text no GistNet trained on)",
    )
    ap.add_argument("--data", type=Path, default=Path("artifacts/data/stdlib"))
    ap.add_argument(
        "--gistnet",
        action="append",
        default=[],
        help="NAME=PATH (repeatable; PATH 'mean' for mean pooling): a recency row "
        "'mc_hybrid+NAME' with these gists",
    )
    ap.add_argument(
        "--levels", type=int, default=2, help="gist levels of the --gistnet rows (default 2)"
    )
    ap.add_argument("--lengths", type=int, nargs="+", help="history lengths T (default all)")
    ap.add_argument("--budgets", type=int, nargs="+", help="budgets W (default 1,024 4,096)")
    ap.add_argument("--schemes", nargs="+", choices=ALL_SCHEMES, help="MegaContext schemes")
    ap.add_argument("--no-passkey", action="store_true", help="skip the pass key")
    ap.add_argument(
        "--corpora",
        nargs="+",
        choices=("code", "prose"),
        default=["code", "prose"],
        help="the corpora to read (default both; one each lets two processes share a run)",
    )
    ap.add_argument(
        "--no-sink",
        action="store_true",
        help="read the MegaContext views without the attention sink (attention_sink: false)",
    )
    ap.add_argument(
        "--lexical",
        action="store_true",
        help="beside each --gistnet row, 'mc_lexical+NAME': the same gists with the lexical "
        "focus (lens: lexical, refocus_iterations 8) under nearby positions",
    )
    ap.add_argument(
        "--far-gap",
        type=int,
        help="far_gap of the --gistnet and --lexical rows (MegaContextConfig.far_gap: the "
        "most positions their gists sit behind the recent window; default: no cap)",
    )
    ap.add_argument(
        "--lexical-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a MegaContextConfig field of the --lexical rows (value parsed as YAML); "
        "their method is then 'mc_lexical[KEY=VALUE,...]+NAME'",
    )
    args = ap.parse_args()
    global LENGTHS, BUDGETS, PASSKEY_T, PASSKEY_BACK, SCHEMES, LEXICAL, SINK, FAR_GAP, LEXICAL_TAG
    if args.render:
        import pyarrow.parquet as pq

        rows = pq.read_table(args.out / "rows.parquet").to_pylist()
        BUDGETS = tuple(sorted({int(r["W"]) for r in rows if r.get("W") is not None}))
        old = (args.out / "results.md").read_text().splitlines()
        extra = dict(ln[2:].split(": ", 1) for ln in old if ln.startswith("- ") and ": " in ln)
        (args.out / "results.md").write_text(render(rows, extra))
        plot(rows, args.out / "nll_vs_history.png")
        return
    LEXICAL = args.lexical
    if args.lexical_set:
        LEXICAL_SET.update(apply_overrides({}, args.lexical_set))
        mc.MegaContextConfig(**LEXICAL_SET)  # a typed error for a bad field or value
        LEXICAL_TAG = "[" + ",".join(args.lexical_set) + "]"
    FAR_GAP = args.far_gap
    SINK = not args.no_sink
    LENGTHS = tuple(args.lengths or LENGTHS)
    BUDGETS = tuple(args.budgets or BUDGETS)
    SCHEMES = tuple(args.schemes or SCHEMES)
    for spec in args.gistnet:
        name, _, path = spec.partition("=")
        GISTNETS.append((name, None if path == "mean" else mc.GistNet.load(path), args.levels))
    if args.smoke:
        LENGTHS, BUDGETS, PASSKEY_T, PASSKEY_BACK = (512, 2048), (256, 512), 2048, 1800
        global COMPACT_BUDGETS
        COMPACT_BUDGETS = (256,)
    torch.manual_seed(0)
    base = mc.load_base("smollm2-135m")
    run = Run(args.out, base)
    if args.resume and (args.out / "rows.parquet").is_file():
        import pyarrow.parquet as pq

        run.rows = pq.read_table(args.out / "rows.parquet").to_pylist()
    run.extra["attention sink"] = "on (the default)" if SINK else "off (--no-sink)"
    if args.gistnet:
        run.extra["far gap of the --gistnet rows"] = (
            "none (the default)" if FAR_GAP is None else f"{FAR_GAP} (--far-gap)"
        )
    run.extra["machine"] = (
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{base.name} ({base.dtype}, trained to {base.max_positions:,} positions)"
    )
    need = max(LENGTHS) + H + 4096 * (args.targets - 1)
    if args.texts == "heldout":
        code = heldout_code_ids(args.data, need)
        prose, reps = heldout_prose_ids(base, need)
        run.extra["texts"] = (
            f"held out: code: {code.numel():,} tokens of validation-split stdlib modules "
            f"({args.data}); prose: LongBench NarrativeQA contexts ({prose.numel():,} "
            f"tokens, repeated {reps}x)"
        )
    else:
        code = code_ids(base, need)
        prose, reps = prose_ids(base, need)
        run.extra["texts"] = (
            f"code: {code.numel():,} tokens of stdlib modules; prose: pydoc topics "
            f"({prose.numel():,} tokens, the text repeated {reps}x to reach 128k)"
        )
    ends = [need - 4096 * i for i in range(args.targets)]
    corpora = [(c, ids) for c, ids in (("code", code), ("prose", prose)) if c in args.corpora]
    # most important first: one target per corpus at the small budget, the pass key,
    # the large budget, then the further targets
    for corpus, ids in corpora:
        continuation(run, corpus, ids, ends[:1], BUDGETS[:1], LENGTHS)
    if not args.no_passkey:
        passkey(run, BUDGETS)
    for corpus, ids in corpora:
        continuation(run, corpus, ids, ends[:1], BUDGETS[1:], LENGTHS)
    # further targets at the smaller budget only (time on a shared 2-core CPU)
    for corpus, ids in corpora:
        continuation(run, corpus, ids, ends[1:], BUDGETS[:1], LENGTHS)
    run.extra["done"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run.flush()


if __name__ == "__main__":
    main()
