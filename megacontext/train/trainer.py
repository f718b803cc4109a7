"""The EM-style trainer: warm start, then cycles B1 (GistNet) -> B2 (LensNet) -> B3 (LoRA).

``Trainer(config).run()`` executes the plan::

    warm-gist (GistNet on recency WCs) -> warm-lens (LensNet on labels from those gists)
    -> cycle 1: b1 -> b2 -> b3 -> cycle 2: ... -> cycle N

Every phase trains one module with the others frozen (``requires_grad=False`` on
every parameter that is not the phase's): AdamW, cosine schedule with linear warmup,
``grad_accum`` microbatches of ``batch_size`` windows, gradient clipping, bf16 autocast
on CUDA (fp32 on the CPU). Data for B1/B3 and the warm GistNet phase comes from fresh
on-policy rollouts (:func:`~megacontext.train.rollout.rollout`) of windows drawn with
seeds derived from ``(seed, phase index, step, microbatch)``; B2 and the warm LensNet
phase train on counterfactual labels regenerated at the phase start (so after every
B1) and written to ``artifacts/deltas/<run>/``. After each phase: optional
validation (Loss@H at several budgets, early stop), telemetry, and a checkpoint
``artifacts/checkpoints/<run>/cycle<c>-<phase>/``; ``run(resume=True)`` continues
after the newest complete checkpoint and reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import Base, load_base
from ..data import ShardDataset
from ..errors import ConfigError, InputError, StorageError
from ..gistnet import GistNet
from ..lensnet import LensNet
from ..lora import has_lora, inject_lora, load_lora, lora_parameters, save_lora
from ..telemetry import Telemetry
from .checkpoint import (
    check_resume,
    latest_checkpoint,
    load_rng_state,
    read_trainer_state,
    save_rng_state,
    set_rng_state,
    write_checkpoint,
)
from .config import PHASE_NAMES, OptimConfig, TrainConfig
from .curriculum import curriculum_source
from .forward import forward_rows, wc_embeddings, wc_row
from .labels import (
    label_reads,
    label_snapshot,
    module_hash,
    open_reads,
    read_labels,
    snapshot_nll,
    write_labels,
)
from .phases import gist_loss, lens_loss, lora_loss
from .rollout import region_snapshot, rollout

__all__ = ["Trainer", "WindowSource", "cosine_lambda", "text_windows"]

WindowSource = Callable[[int, int], torch.Tensor]  # (n, seed) -> int64 [n, L]


def cosine_lambda(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to ``floor``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _init_distributed(device: str | None) -> tuple[int, int, str | None]:
    """``(rank, world_size, device)``: join the process group that ``torchrun`` set up
    (``RANK``/``WORLD_SIZE`` in the environment; NCCL on CUDA, gloo on the CPU), or use
    an already initialised one; a single process is ``(0, 1, device)``."""
    import os

    dist = torch.distributed
    if not dist.is_available():
        return 0, 1, device
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        return 0, 1, device
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), dist.get_world_size(), device


def text_windows(tokens: torch.Tensor, length: int) -> WindowSource:
    """Windows of ``length`` tokens at random starts of one token stream."""
    tokens = torch.as_tensor(tokens).to(torch.int64)
    if tokens.numel() < length:
        raise InputError(f"text source has {tokens.numel()} tokens, a window needs {length}")

    def draw(n: int, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, tokens.numel() - length + 1, size=n)
        return torch.stack([tokens[s : s + length] for s in starts.tolist()])

    return draw


def _iterable_source(it: Iterable[Any]) -> WindowSource:
    iterator = iter(it)

    def draw(n: int, seed: int) -> torch.Tensor:
        rows = [torch.as_tensor(next(iterator)).to(torch.int64).flatten() for _ in range(n)]
        return torch.stack(rows)

    return draw


def _check_shapes(file: Path, mine: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """``theirs`` (read from ``file``) has exactly ``mine``'s parameter names and shapes."""
    a = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        k = diff[0]
        raise StorageError(
            f"{file}: another architecture than this run's: {k} is {b.get(k)} in the file, "
            f"{a.get(k)} here ({len(diff)} tensors differ)",
            path=str(file),
            field="shape",
        )


def _initial_gistnet(file: Path, dim: int, block_size: int, levels: int) -> GistNet:
    """``init_gistnet``: the GistNet in ``file``, which must read this base model's
    width and this run's block size and serve at least its levels (the phases train
    every level of the tree): a typed error naming the file otherwise."""
    g = GistNet.load(file)
    c = g.config
    for field, ok, want in (
        ("dim", c.dim == dim, f"{dim}"),
        ("block_size", c.block_size == block_size, f"{block_size}"),
        ("levels", c.levels >= levels, f"at least {levels} (megacontext.levels)"),
    ):
        if not ok:
            have = getattr(c, field)
            raise ConfigError(
                f"init_gistnet: {file} has {field}={have}, this run needs {want}",
                field=f"init_gistnet.{field}",
                value=have,
            )
    return g


class Trainer:
    """Runs the plan of a :class:`TrainConfig`.

    Args:
        config: the run's config.
        base: a loaded base model (default: ``load_base(config.model)``).
        train_windows / val_windows: window sources, ``(n, seed) -> int64 [n, L]``, or
            any iterable of token windows (drawn in order; resume then replays only if
            the iterable does). Default: built from ``config.data``.
        hooks: callables ``hook(trainer, phase, cycle)`` run after each phase's
            checkpoint (tests use one to kill a run).
        progress: ``progress(phase, cycle, step, total, loss)`` after each step.
    """

    def __init__(
        self,
        config: TrainConfig,
        base: Base | None = None,
        train_windows: WindowSource | Iterable[Any] | None = None,
        val_windows: WindowSource | Iterable[Any] | None = None,
        hooks: list[Callable[..., None]] | None = None,
        progress: Callable[..., None] | None = None,
    ):
        self.cfg = config
        self.mc = config.mc_config()
        self.rank, self.world, device = _init_distributed(config.device)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % (1 << 32))
        self.base = base if base is not None else load_base(config.model, device=device)
        self.device = self.base.device
        bs, levels = self.mc.block_size, self.mc.levels
        if config.init_gistnet is not None:
            self.gistnet = _initial_gistnet(Path(config.init_gistnet), self.base.dim, bs, levels)
        else:
            self.gistnet = GistNet(
                self.base.dim, block_size=bs, levels=levels, seed=config.seed, **config.gistnet
            )
        self.gistnet = self.gistnet.to(device=self.device, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.lensnet = LensNet(self.base.dim, **config.lensnet).to(self.device)
        if config.b3.steps > 0 and config.cycles > 0 and not has_lora(self.base.model):
            inject_lora(self.base.model, config.lora, seed=config.seed + 2)
        self.train_windows = self._source(train_windows, "train")
        self.val_windows = self._source(val_windows, "val")
        self.hooks = list(hooks or [])
        self.progress = progress
        self.plan = [("warm-gist", 0), ("warm-lens", 0)] + [
            (p, c) for c in range(1, config.cycles + 1) for p in ("b1", "b2", "b3")
        ]
        self.done = 0
        self.global_step = 0
        self.early: dict[str, Any] = {"best": None, "bad": 0, "stopped": False, "history": []}
        root = Path(config.artifacts)
        self.ckpt_root = root / "checkpoints" / config.run
        self.deltas_dir = root / "deltas" / config.run
        self.telemetry_dir = root / "telemetry" / config.run
        self.prev_gistnet: GistNet | None = None

    # ------------------------------------------------------------------ data

    def _source(self, given: Any, which: str) -> WindowSource:
        src = self._plain_source(given, which)
        cur = self.cfg.data.curriculum
        if cur is None or which != "train":
            return src
        d = self.cfg.data
        hay = {"prose": src, "code": src}
        if given is None and d.kind == "shards" and d.path is not None:
            # real narrative / code of the training split for the matching task kinds
            for key, tags in (("prose", ["narrative", "doc"]), ("code", ["code"])):
                ds = ShardDataset(d.path, d.split, tags)
                if len(ds) and int(ds.lengths.max()) >= self.cfg.window_length:
                    hay[key] = functools.partial(self._tagged, ds)
        return curriculum_source(
            src,
            hay,
            lambda text: self.base.encode(text).tolist(),
            history=d.history,
            block_size=self.mc.block_size,
            fraction=cur.fraction,
            kinds=cur.kinds,
            placements=cur.placements,
        )

    def _tagged(self, ds: ShardDataset, n: int, seed: int) -> torch.Tensor:
        return ds.sample_windows(self.cfg.window_length, n, seed)

    def _plain_source(self, given: Any, which: str) -> WindowSource:
        if given is not None:
            return given if callable(given) else _iterable_source(given)
        d, length = self.cfg.data, self.cfg.window_length
        if d.kind == "random":
            vocab = self.base.vocab_size
            offset = 0 if which == "train" else 1 << 40

            def draw(n: int, seed: int) -> torch.Tensor:
                g = torch.Generator().manual_seed(_seed(seed, offset) % (1 << 62))
                return torch.randint(0, vocab, (n, length), generator=g)

            return draw
        if d.kind == "text":
            if not d.paths:
                raise ConfigError("data.kind=text needs data.paths", field="data.paths")
            ids = []
            for p in d.paths:
                try:
                    text = Path(p).read_text(encoding="utf-8")
                except OSError as exc:
                    raise ConfigError(
                        f"data.paths: cannot read {p} ({exc})", field="data.paths"
                    ) from None
                except UnicodeDecodeError as exc:
                    raise ConfigError(
                        f"data.paths: {p} is not UTF-8 text (byte at offset {exc.start})",
                        field="data.paths",
                        value=str(p),
                    ) from None
                ids.append(self.base.encode(text))
            stream = torch.cat(ids)
            cut = int(stream.numel() * (1 - d.val_fraction))
            return text_windows(stream[:cut] if which == "train" else stream[cut:], length)
        if d.path is None:
            raise ConfigError("data.kind=shards needs data.path", field="data.path")
        ds = ShardDataset(d.path, d.split if which == "train" else d.val_split, d.tags)
        if which != "train" or d.tag_mix is None:
            return lambda n, seed: ds.sample_windows(length, n, seed)
        # per-tag sources: window j of a draw comes from tag k with probability w_k
        tags = sorted(t for t, w in d.tag_mix.items() if w > 0)
        parts = {t: ds.with_tags([t]) for t in tags}
        probs = torch.tensor([d.tag_mix[t] for t in tags], dtype=torch.float64)

        def mixed(n: int, seed: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(_seed(seed, 11) % (1 << 62))
            which_tag = torch.multinomial(probs, n, replacement=True, generator=g).tolist()
            out = torch.empty(n, length, dtype=torch.int64)
            for k, t in enumerate(tags):
                rows = [j for j, w in enumerate(which_tag) if w == k]
                if rows:
                    out[rows] = parts[t].sample_windows(length, len(rows), _seed(seed, k))
            return out

        return mixed

    # ------------------------------------------------------------------ helpers

    def _data_seed(self, *parts: int) -> int:
        # ranks draw different data; a single process keeps the rank-free seeds
        extra = (self.rank,) if self.world > 1 else ()
        return _seed(self.cfg.seed, *parts, *extra)

    def _all_reduce_grads(self, params: list[torch.nn.Parameter], count: int) -> int:
        """Average gradients over ranks (data parallel); returns the number of
        microbatches with a loss summed over ranks (all ranks step, or none)."""
        dist = torch.distributed
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        n = torch.tensor([float(count)], device=flat.device)
        dist.all_reduce(flat)
        dist.all_reduce(n)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads, strict=True):
            k = g.numel()
            p.grad = flat[offset : offset + k].view_as(p).to(p.dtype)
            offset += k
        return int(n.item())

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _freeze_all(self) -> None:
        for m in (self.gistnet, self.lensnet, self.base.model):
            m.requires_grad_(False)

    def _trainable(self, phase: str) -> list[torch.nn.Parameter]:
        self._freeze_all()
        if phase in ("warm-gist", "b1"):
            params = list(self.gistnet.parameters())
        elif phase in ("warm-lens", "b2"):
            params = list(self.lensnet.parameters())
        else:
            params = lora_parameters(self.base.model)
        for p in params:
            p.requires_grad_(True)
        return params

    def _rollouts(self, phase_idx: int, step: int, micro: int, with_lens: bool):
        windows = self.train_windows(self.cfg.batch_size, self._data_seed(phase_idx, step, micro))
        out = []
        d = self.cfg.data
        for k, w in enumerate(windows):
            tree, snaps = rollout(
                self.base,
                self.gistnet,
                self.lensnet if with_lens else None,
                self.mc,
                w,
                d.history,
                d.blocks,
                self.mc.horizon,
                doc=k,
                allocator_backend=self.cfg.allocator_backend,
            )
            if self.cfg.snapshots_per_window is not None:
                snaps = snaps[-self.cfg.snapshots_per_window :]
            out.append((w, tree, snaps))
        return out

    def _regions(self, phase_idx: int, step: int, micro: int):
        """Region snapshots (``data.wc: region``): one per window, no tree needed."""
        seed = self._data_seed(phase_idx, step, micro)
        windows = self.train_windows(self.cfg.batch_size, seed)
        g = torch.Generator().manual_seed(_seed(seed, 7) % (1 << 62))
        return [
            (w, None, [region_snapshot(w, self.mc, self.cfg.data.region, self.mc.horizon, g, k)])
            for k, w in enumerate(windows)
        ]

    def make_labels(self, phase_idx: int, cycle: int, with_lens: bool, tag: str, tel: Any = None):
        """Roll out ``label_windows`` windows and label every snapshot; writes
        ``artifacts/deltas/<run>/cycle<c>-<tag>.parquet``. Returns the labelled items
        ``(tokens, tree, snapshot, rows)``. With telemetry ``tel``, one row per window
        (``label_window`` of ``label_windows``, ``label_elapsed_s``, ``label_eta_s``,
        ``label_rows``), flushed at once: the label phase is most of a LensNet run's
        time, and a run in the background shows its progress there."""
        cfg, lc = self.cfg, self.cfg.labels
        windows = self.train_windows(cfg.label_windows, self._data_seed(phase_idx, 1 << 20))
        items, table = [], []
        hashes = {
            "gistnet_hash": module_hash(self.gistnet),
            "lensnet_hash": module_hash(self.lensnet),
            "lora_hash": (
                module_hash({n: p for n, p in self.base.model.named_parameters() if "lora_" in n})
                if has_lora(self.base.model)
                else ""
            ),
        }
        reused = self._reused_labels(hashes["gistnet_hash"]) if lc.reuse else None
        start = time.perf_counter()
        for k, w in enumerate(windows):
            tree, snaps = rollout(
                self.base,
                self.gistnet,
                self.lensnet if with_lens else None,
                self.mc,
                w,
                cfg.data.history,
                cfg.data.blocks,
                self.mc.horizon,
                doc=k,
                allocator_backend=cfg.allocator_backend,
            )
            for s in snaps:
                if lc.kind == "reads":
                    label, extra = label_reads, {
                        "top_blocks": lc.top_blocks,
                        "random_blocks": lc.random_blocks,
                    }
                else:
                    label, extra = label_snapshot, {"max_candidates": lc.max_candidates}
                with self._autocast():
                    if reused is not None:
                        rows = self._reused_rows(reused, k, s, w, tree)
                    else:
                        rows = label(
                            self.base,
                            tree,
                            w,
                            s,
                            self.mc,
                            batch=lc.batch,
                            temperature=lc.temperature,
                            token_cost=lc.token_cost,
                            seed=_seed(cfg.seed, phase_idx) % (1 << 31),
                            **extra,
                        )
                items.append((w, tree, s, rows))
                table += [{"run": cfg.run, "cycle": cycle, **hashes, **r} for r in rows]
                opened = open_reads(s, rows, self.mc) if lc.kind == "reads" else None
                if opened is not None:  # the WC after the first refocus: the same labels
                    items.append((w, tree, *opened))
            if self.progress is not None:
                self.progress(f"{tag} labels", cycle, k + 1, len(windows), math.nan)
            if tel is not None:
                elapsed = time.perf_counter() - start
                tel.log_iteration(
                    iteration=self.global_step,
                    cycle=cycle,
                    phase_index=PHASE_NAMES.index(tag),
                    label_window=k + 1,
                    label_windows=len(windows),
                    label_rows=len(table),
                    label_elapsed_s=elapsed,
                    label_eta_s=elapsed / (k + 1) * (len(windows) - k - 1),
                )
                tel.flush()
        if table:
            suffix = f"-rank{self.rank}" if self.rank else ""
            write_labels(table, self.deltas_dir / f"cycle{cycle}-{tag}{suffix}.parquet")
        return items

    _RUN_COLUMNS = ("run", "cycle", "gistnet_hash", "lensnet_hash", "lora_hash")

    def _reused_labels(self, gistnet_hash: str) -> dict[tuple[int, int], list[dict[str, Any]]]:
        """``labels.reuse``'s rows by ``(doc, snapshot_step)``, checked against this
        run's GistNet (the labels value its gists)."""
        path = self.cfg.labels.reuse
        rows = read_labels(path)
        other = {r["gistnet_hash"] for r in rows}
        if other != {gistnet_hash}:
            raise ConfigError(
                f"labels.reuse: {path} was labelled with GistNet {sorted(other)}, this run's "
                f"GistNet is {gistnet_hash}",
                field="labels.reuse",
                value=path,
            )
        out: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in rows:
            key = (int(r["doc"]), int(r["snapshot_step"]))
            out.setdefault(key, []).append(
                {k: v for k, v in r.items() if k not in self._RUN_COLUMNS}
            )
        return out

    def _reused_rows(
        self, reused: dict, doc: int, snap: Any, tokens: torch.Tensor, tree: Any
    ) -> list[dict[str, Any]]:
        """The reused rows of one snapshot, after checking that they label this very
        snapshot: same cursor, and its Loss@H recomputed (one forward) equals theirs."""
        rows = reused.get((doc, snap.step), [])
        path = self.cfg.labels.reuse
        if any(int(r["cursor"]) != snap.cursor for r in rows):
            raise ConfigError(
                f"labels.reuse: {path} labels window {doc} step {snap.step} at another cursor "
                f"than this run's {snap.cursor} (other data or seed)",
                field="labels.reuse",
                value=path,
            )
        if rows:
            with self._autocast():
                mine = snapshot_nll(self.base, tree, tokens, snap, self.mc)
            if abs(mine - float(rows[0]["nll_snapshot"])) > 1e-3:
                raise ConfigError(
                    f"labels.reuse: {path} window {doc} step {snap.step} has Loss@H "
                    f"{float(rows[0]['nll_snapshot']):.4f}, this run's snapshot {mine:.4f} "
                    "(other windows, base model or data)",
                    field="labels.reuse",
                    value=path,
                )
        return rows

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(
        self, budgets: list[int] | None = None, windows: int | None = None
    ) -> dict[int, float]:
        """Validation Loss@H (nats) at each budget: the last snapshot of each validation
        window's on-policy rollout, gists from the tree (what the runtime reads)."""
        es = self.cfg.early_stop
        budgets = list(budgets or es.budgets)
        n = windows or es.windows
        ws = self.val_windows(n, _seed(self.cfg.seed, 7777))
        out: dict[int, float] = {}
        d = self.cfg.data
        for b in budgets:
            mc = self.mc.replace(w_max=b)
            losses = []
            for k, w in enumerate(ws):
                tree, snaps = rollout(
                    self.base,
                    self.gistnet,
                    self.lensnet,
                    mc,
                    w,
                    d.history,
                    d.blocks,
                    mc.horizon,
                    doc=k,
                    allocator_backend=self.cfg.allocator_backend,
                )
                s = snaps[-1]
                emb = wc_embeddings(self.base, w, s.levels, s.nodes, mc.block_size, "tree", tree)
                row, start = wc_row(self.base, emb, s.levels, s.nodes, mc)
                with self._autocast():
                    logp = forward_rows(self.base, [row], [s.targets], [start])[0]
                losses.append(float(-logp.gather(-1, s.targets.to(logp.device)[:, None]).mean()))
            out[b] = float(np.mean(losses))
        return out

    def _early_stop(self, tel: Any, phase: str, cycle: int) -> None:
        es = self.cfg.early_stop
        if not es.enabled:
            return
        last = self.done == len(self.plan)
        if es.every == "cycle" and phase not in ("warm-lens", "b3") and not last:
            return
        res = self.evaluate()
        score = float(np.mean(list(res.values())))
        e = self.early
        e["history"].append(
            {"phase": phase, "cycle": cycle, "loss": score, **{str(k): v for k, v in res.items()}}
        )
        if e["best"] is None or score < e["best"] - es.min_delta:
            e["best"], e["bad"] = score, 0
        else:
            e["bad"] += 1
            if e["bad"] >= es.patience:
                e["stopped"] = True
        if tel is not None:
            tel.log_iteration(
                iteration=self.global_step,
                step=self.global_step,
                loss_at_h=score,
                cycle=cycle,
                phase_index=PHASE_NAMES.index(phase),
                **{f"val_loss_at_h_{k}": v for k, v in res.items()},
            )

    # ------------------------------------------------------------------ phases

    def _phase(self, idx: int, phase: str, cycle: int, tel: Any) -> None:
        oc: OptimConfig = getattr(self.cfg, phase.replace("-", "_"))
        if oc.steps == 0:
            return
        cfg = self.cfg
        labelled = None
        if phase in ("warm-lens", "b2"):
            labelled = self.make_labels(idx, cycle, with_lens=phase == "b2", tag=phase, tel=tel)
            if not labelled or not any(rows for *_, rows in labelled):
                return
        if phase == "b1":
            # the previous checkpoint's GistNet, the anchor of the stability loss
            self.prev_gistnet = GistNet(config=self.gistnet.config).to(self.device)
            self.prev_gistnet.load_state_dict(self.gistnet.state_dict())
            self.prev_gistnet.requires_grad_(False)
        params = self._trainable(phase)
        opt = torch.optim.AdamW(params, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_lambda(oc.warmup_steps, oc.steps, oc.min_lr_ratio)
        )
        self.gistnet.train(phase in ("warm-gist", "b1"))
        self.lensnet.train(phase in ("warm-lens", "b2"))
        started = time.perf_counter()
        for step in range(oc.steps):
            if (
                step
                and oc.max_seconds is not None
                and time.perf_counter() - started > oc.max_seconds
            ):
                # time-boxed phase: stop here; the checkpoint below records the steps taken
                break
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            opt.zero_grad(set_to_none=True)
            total, count, tokens, stats = 0.0, 0, 0, {}
            runtime: dict[str, Any] = {"swap": [], "util": [], "exp": 0, "col": 0, "trace": []}
            for micro in range(cfg.grad_accum):
                losses = []
                if labelled is not None:
                    g = torch.Generator().manual_seed(self._data_seed(idx, step, micro) % (1 << 62))
                    pick = torch.randint(len(labelled), (cfg.batch_size,), generator=g).tolist()
                    for j in pick:
                        w, tree, s, rows = labelled[j]
                        with self._autocast():
                            loss, st = lens_loss(
                                self.base, self.lensnet, tree, s, rows, self.mc, cfg.lens_loss
                            )
                        if loss is not None:
                            losses.append((loss, st))
                        tokens += s.cursor
                else:
                    if phase in ("warm-gist", "b1") and cfg.data.wc == "region":
                        batch = self._regions(idx, step, micro)
                    else:
                        batch = self._rollouts(idx, step, micro, with_lens=phase != "warm-gist")
                    for w, tree, snaps in batch:
                        for s in snaps:
                            runtime["swap"].append(s.n_expand + s.n_collapse)
                            runtime["util"].append(len(s.levels) / self.mc.w_max)
                            runtime["exp"] += s.n_expand
                            runtime["col"] += s.n_collapse
                            runtime["trace"] += [
                                {
                                    **a,
                                    "iteration": self.global_step,
                                    "session": micro * 1000 + s.doc,
                                }
                                for a in s.actions
                            ]
                            with self._autocast():
                                if phase == "b3":
                                    loss, st = lora_loss(
                                        self.base, tree, w, s, self.mc, cfg.lora.keepalive_weight
                                    )
                                else:
                                    loss, st = gist_loss(
                                        self.base,
                                        self.gistnet,
                                        tree,
                                        w,
                                        s,
                                        self.mc,
                                        cfg.gist_loss,
                                        self.prev_gistnet if phase == "b1" else None,
                                    )
                            if loss is not None:
                                losses.append((loss, st))
                            tokens += s.cursor + s.targets.numel()
                if not losses:
                    continue
                loss = torch.stack([x for x, _ in losses]).mean()
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach())
                count += 1
                for _, st in losses:
                    for k, v in st.items():
                        stats[k] = stats.get(k, 0.0) + v / len(losses) / cfg.grad_accum
            if self.world > 1:
                count = self._all_reduce_grads(params, count)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
            if count:
                opt.step()
            lr = float(sched.get_last_lr()[0])
            sched.step()
            dt = time.perf_counter() - t0
            mean_loss = total / max(count, 1)
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row: dict[str, Any] = {
                "iteration": self.global_step,
                "step": step,
                "cycle": cycle,
                "phase_index": PHASE_NAMES.index(phase),
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / dt,
                "peak_mem_mb": peak,
                "latency_ms": dt * 1e3,
                "w_max": self.mc.w_max,
                **{f"loss_{k}": v for k, v in stats.items()},
            }
            if runtime["swap"]:
                row["swap_rate"] = float(np.mean(runtime["swap"]))
                res = [a["residency"] for a in runtime["trace"]]
                if res:
                    row["mean_residency"] = float(np.mean(res))
                row["token_budget_utilization"] = float(np.mean(runtime["util"]))
                row["n_expand"] = runtime["exp"]
                row["n_collapse"] = runtime["col"]
            if tel is not None:
                tel.log_iteration(**row)
                if runtime["trace"]:
                    tel.log_actions(runtime["trace"])
            self.global_step += 1
            if self.progress is not None:
                self.progress(phase, cycle, step + 1, oc.steps, mean_loss)
        self._last_opt = (opt, sched)
        self._freeze_all()
        self.gistnet.eval()
        self.lensnet.eval()

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "global_step": self.global_step,
            "early": self.early,
            "plan": self.plan,
            "gistnet_hash": module_hash(self.gistnet),
            "lensnet_hash": module_hash(self.lensnet),
        }

    def save_checkpoint(self, phase: str, cycle: int) -> Path:
        final = self.ckpt_root / f"cycle{cycle}-{phase}"

        def write(tmp: Path) -> None:
            self.gistnet.save(tmp / "gistnet.safetensors")
            self.lensnet.save(tmp / "lensnet.safetensors")
            if has_lora(self.base.model):
                save_lora(self.base.model, self.cfg.lora, tmp / "lora")
            opt = getattr(self, "_last_opt", None)
            if opt is not None:
                torch.save(
                    {"optimizer": opt[0].state_dict(), "scheduler": opt[1].state_dict()},
                    tmp / "optimizer.pt",
                )
            save_rng_state(tmp)
            (tmp / "trainer.json").write_text(json.dumps(self._state(), indent=1))
            self.cfg.to_yaml(tmp / "config.yaml")

        return write_checkpoint(final, write)

    def load_state(self, path: str | Path) -> None:
        """Restore weights, LoRA, RNG and progress from a checkpoint directory."""
        path = Path(path)
        state = read_trainer_state(path, resume=True)  # also refuses links out of it
        rng = load_rng_state(path)  # validated before anything is changed
        g = GistNet.load(path / "gistnet.safetensors")
        lens = LensNet.load(path / "lensnet.safetensors")
        # Shapes are checked before either module changes: a checkpoint of another
        # architecture is a typed error, never torch's "size mismatch" half-way through.
        for name, mine, theirs in (
            ("gistnet", self.gistnet, g),
            ("lensnet", self.lensnet, lens),
        ):
            _check_shapes(path / f"{name}.safetensors", mine, theirs)
        self.gistnet.load_state_dict(g.state_dict())
        self.lensnet.load_state_dict(lens.state_dict())
        if (path / "lora").is_dir():
            load_lora(self.base.model, path / "lora", inject=not has_lora(self.base.model))
        set_rng_state(rng)
        self.done = int(state["done"])
        self.global_step = int(state["global_step"])
        self.early = state["early"]
        self._freeze_all()

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Execute the plan (after the newest complete checkpoint when ``resume``);
        returns ``{"done", "stopped", "checkpoint", "early"}``."""
        if resume:
            last = latest_checkpoint(self.ckpt_root)
            if last is not None:
                # refuses (naming the fields) a checkpoint of a run with another config
                check_resume(last, self.cfg)
                self.load_state(last)
        main = self.rank == 0
        if main:
            self.cfg.to_yaml(Path(self.cfg.runs_dir) / f"{self.cfg.run}.yaml")
        ckpt = None
        tags = [
            f"data:{self.cfg.data.kind}",
            f"w_max:{self.mc.w_max}",
            f"tau:{self.mc.tau_expand}/{self.mc.tau_collapse}",
        ]
        telemetry = (
            Telemetry(self.telemetry_dir, config=self.cfg.dump(), tags=tags)
            if main
            else contextlib.nullcontext()
        )
        with telemetry as tel:
            while self.done < len(self.plan) and not self.early["stopped"]:
                idx = self.done
                phase, cycle = self.plan[idx]
                self._phase(idx, phase, cycle, tel)
                self.done = idx + 1
                self._early_stop(tel, phase, cycle)
                if main:
                    ckpt = self.save_checkpoint(phase, cycle)
                if self.world > 1:
                    torch.distributed.barrier()
                for hook in self.hooks:
                    hook(self, phase, cycle)
        return {
            "done": self.done,
            "stopped": self.early["stopped"],
            "checkpoint": ckpt,
            "early": self.early,
        }
