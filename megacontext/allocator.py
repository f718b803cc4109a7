"""The focus allocator: LensNet scores -> legal expand/collapse actions on the WC.

``FocusAllocator(config, backend).step(wc, scores)`` applies one step of the
design's greedy, diff-limited policy with hysteresis, updates ``wc`` in place and
returns the actions it took. Three backends make the same decisions bit for bit:

- ``python``: the readable reference below (:func:`focus_step_reference`); it is
  the specification the others are tested against;
- ``cpp``: ``megacontext._C.focus_step_cpu``, the shared C++ core
  (``csrc/allocator_core.h``) over the tensors' raw buffers;
- ``cuda``: the same core inside one CUDA thread block
  (``csrc/allocator_cuda.cu``), wrapped as the ``megacontext::focus_step``
  torch.library custom op; its state stays on the device.

The rules, the hysteresis state and the tie-breaks are written out in
``docs/allocator.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import native
from .config import MegaContextConfig
from .errors import BackendUnavailableError, ConfigError, InvariantError
from .working_context import LEVEL_DTYPE, NODE_DTYPE, WorkingContext, protected_start

__all__ = [
    "Action",
    "FocusAllocator",
    "actions_from_tensor",
    "actions_to_tensor",
    "focus_step_reference",
]

EXPAND, COLLAPSE = 0, 1
KINDS = ("expand", "collapse")
NEVER = -1
# The python backend needs no _C, so the largest top level is written here too;
# tests/test_focus_allocator.py asserts it equals _C.ALLOC_MAX_TOP.
_MAX_TOP = 7
_KEEP, _EXPANDED, _HEAD, _MEMBER = 0, 1, 2, 3


class Action(NamedTuple):
    """One allocator action.

    ``(level, node)`` is the gist whose representation changed: the gist that was
    expanded into its ``block_size`` children, or the parent that ``block_size``
    children were collapsed into. ``score`` is the candidate's score (the gist's
    score, or the children's mean); ``cost_delta`` is ``+(bs-1)`` or ``-(bs-1)``.
    """

    step: int
    kind: str  # "expand" | "collapse"
    level: int
    node: int
    score: float
    cost_delta: int


# Columns of an action row: the Action fields, in order. The native paths read
# _C.ALLOC_ACTION_COLS; tests/test_focus_allocator.py asserts _C.ALLOC_ACTION_FIELDS
# equals Action._fields, so the two layouts are one.
ACTION_COLS = len(Action._fields)


def actions_to_tensor(actions: list[Action]) -> torch.Tensor:
    """The trace as float64 ``[A, 6]``: step, kind (0 expand, 1 collapse), level, node,
    score, cost_delta. Integers are exact in float64 up to 2**53."""
    rows = [(a.step, KINDS.index(a.kind), a.level, a.node, a.score, a.cost_delta) for a in actions]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), ACTION_COLS)


def actions_from_tensor(rows: torch.Tensor) -> list[Action]:
    """Inverse of :func:`actions_to_tensor` (also reads the native backends' buffers)."""
    out = []
    for step, kind, level, node, score, delta in rows.detach().cpu().tolist():
        out.append(Action(int(step), KINDS[int(kind)], int(level), int(node), score, int(delta)))
    return out


@dataclass(frozen=True)
class StepParams:
    """The scalars of one step (the C++ ``mc::alloc::Params``, bound as ``_C.StepParams``).

    The fields are declared in ``_C.STEP_PARAM_FIELDS`` order (a test checks). The
    native backends receive them through :meth:`packed` and :func:`_native_params`,
    the one place a Python ``StepParams`` becomes the C++ struct.
    """

    block_size: int
    top: int
    num_tokens: int
    w_max: int
    p0: int
    n_diff: int
    cooldown: int
    min_residency: int
    tau_expand: float
    tau_collapse: float
    st_off: tuple[int, ...]  # per level 0..top (index 0 unused): offset in the state
    st_size: tuple[int, ...]  # per level: slots

    def span(self, level: int) -> int:
        return self.block_size**level

    def packed(self) -> list[float]:
        """The fields as one float64 list, in the order ``_C.STEP_PARAM_FIELDS`` gives
        (``st_off`` and ``st_size`` spread, ``top + 1`` values each): the form the
        ``megacontext::focus_step`` op takes (a torch.library schema cannot take a
        struct). Integers are exact in float64 up to 2**53. Needs ``_C``."""
        out: list[float] = []
        for name in native.extension().STEP_PARAM_FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                out.extend(float(v) for v in value)
            else:
                out.append(float(value))
        return out


def _native_params(packed: list[float]):
    """``_C.StepParams`` from a :meth:`StepParams.packed` list, validated in C++.

    Raises ConfigError naming the problem (wrong length, a non-integer where an
    integer belongs, a value out of range) and BackendUnavailableError without ``_C``.
    """
    ext = native.extension()
    try:
        return ext.StepParams.from_packed(packed)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"focus_step params ({len(packed)} values, fields {ext.STEP_PARAM_FIELDS} with "
            f"st_off/st_size spread): {exc}",
            field="params",
            value=list(packed),
        ) from exc


# ------------------------------------------------------------------ the reference


def focus_step_reference(
    levels: list[int], nodes: list[int], scores: list[float], state: list[int], p: StepParams
) -> tuple[list[int], list[int], list[list[float]]]:
    """One allocator step, written for reading. Mutates ``state`` (the step counter
    ``state[0]`` and the last-change slots); returns the new ``levels``, ``nodes``
    and the action rows (see :func:`actions_to_tensor`).

    ``scores`` are float32 values (as Python floats); every sum and comparison is in
    double, in the order written here, so the C++ and CUDA backends can match it
    bit for bit.
    """
    n, bs, top = len(levels), p.block_size, p.top
    t = state[0]

    def last_change(level: int, node: int) -> int:
        if level < 1 or level > top or node < 0 or node >= p.st_size[level]:
            return NEVER
        return state[p.st_off[level] + node]

    def created(level: int, node: int) -> int:
        """Step at which entry (level, node) appeared (NEVER: present from the start)."""
        c = last_change(level, node) if level >= 1 else NEVER
        if level < top:
            c = max(c, last_change(level + 1, node // bs))
        return c

    def too_recent(when: int, window: int) -> bool:
        return when != NEVER and t - when < window

    def is_group_head(i: int) -> bool:
        """Entries i..i+bs-1 are exactly the bs children of one parent."""
        level, node = levels[i], nodes[i]
        return (
            0 <= level < top
            and node >= 0
            and node % bs == 0
            and i + bs <= n
            and node // bs < p.st_size[level + 1]
            and all(levels[i + j] == level and nodes[i + j] == node + j for j in range(bs))
        )

    # Candidates: (sort key, entry, level, node, score, start, end).
    expands, collapses = [], []
    for i in range(n):
        level, node = levels[i], nodes[i]
        # Expand: a gist above tau_expand, outside the protected tail, past its
        # cooldown, and past min_residency when it was made by a collapse.
        s = scores[i]
        if 1 <= level <= top and s > p.tau_expand and 0 <= node < p.st_size[level]:
            start = node * p.span(level)
            end = start + p.span(level)
            self_change = last_change(level, node)
            parent_change = last_change(level + 1, node // bs) if level < top else NEVER
            flip_back = self_change != NEVER and self_change > parent_change
            if (
                end <= p.p0
                and not too_recent(created(level, node), p.cooldown)
                and not (flip_back and too_recent(self_change, p.min_residency))
            ):
                expands.append(((-s, -end, -start), i, level, node, s, start, end))
        # Collapse: no threshold here (the over-budget phase takes any legal one).
        if is_group_head(i):
            parent = node // bs
            start = parent * p.span(level + 1)
            end = start + p.span(level + 1)
            pchange = last_change(level + 1, parent)
            fresh = any(too_recent(created(level, node + j), p.cooldown) for j in range(bs))
            acc = 0.0  # mean in double, summed in entry order
            for j in range(bs):
                acc += scores[i + j]
            mean = acc / bs
            if (
                end <= p.p0
                and not fresh
                and not too_recent(pchange, p.min_residency)
                and not math.isnan(mean)
            ):
                collapses.append(((mean, end, start), i, level, node, mean, start, end))
    expands.sort(key=lambda c: c[0])
    collapses.sort(key=lambda c: c[0])

    live_e = {c[1] for c in expands}
    live_c = {c[1] for c in collapses}
    mark = [_KEEP] * n
    rows: list[list[float]] = []

    def best(queue: list, live: set) -> tuple | None:
        for cand in queue:  # the first candidate no applied action has removed
            if cand[1] in live:
                return cand
        return None

    def apply(cand: tuple, kind: int) -> None:
        _, i, level, node, score, _, _ = cand
        if kind == EXPAND:
            mark[i] = _EXPANDED
            live_e.discard(i)
            live_c.discard(i - node % bs)  # the group holding this gist, if any
            state[p.st_off[level] + node] = t
            rows.append([t, EXPAND, level, node, score, bs - 1])
        else:
            mark[i] = _HEAD
            live_c.discard(i)
            for j in range(bs):
                if j:
                    mark[i + j] = _MEMBER
                live_e.discard(i + j)
            state[p.st_off[level + 1] + node // bs] = t
            rows.append([t, COLLAPSE, level + 1, node // bs, score, -(bs - 1)])

    delta = bs - 1
    cost = n
    # 1. Over budget: collapse lowest score first, ignoring tau and n_diff.
    while cost > p.w_max and (c := best(collapses, live_c)) is not None:
        apply(c, COLLAPSE)
        cost -= delta

    def thresholded_collapse() -> tuple | None:
        c = best(collapses, live_c)
        return c if c is not None and c[4] < -p.tau_collapse else None

    # 2. Up to n_diff actions, alternating expand (first) and collapse.
    taken = 0
    expand_turn = True
    while taken < p.n_diff:
        if expand_turn:
            expand_turn = False
            acted = False
            while taken < p.n_diff and (e := best(expands, live_e)) is not None:
                if cost + delta <= p.w_max:
                    apply(e, EXPAND)
                    cost += delta
                    taken += 1
                    acted = True
                    break
                # The expand does not fit: make room with collapses first.
                k = thresholded_collapse()
                if k is None:
                    break
                apply(k, COLLAPSE)
                cost -= delta
                taken += 1
                acted = True
            if acted:
                continue
        else:
            expand_turn = True
        k = thresholded_collapse()
        if k is not None:
            apply(k, COLLAPSE)
            cost -= delta
            taken += 1
            continue
        if best(expands, live_e) is None or cost + delta > p.w_max:
            break  # neither queue can act any more

    # Rewrite the WC in order.
    new_levels, new_nodes = [], []
    for i in range(n):
        level, node = levels[i], nodes[i]
        if mark[i] == _EXPANDED:
            new_levels += [level - 1] * bs
            new_nodes += [node * bs + j for j in range(bs)]
        elif mark[i] == _HEAD:
            new_levels.append(level + 1)
            new_nodes.append(node // bs)
        elif mark[i] == _KEEP:
            new_levels.append(level)
            new_nodes.append(node)
    state[0] = t + 1
    return new_levels, new_nodes, rows


# ------------------------------------------------------------------- the front end


class FocusAllocator:
    """Greedy, diff-limited focus allocator with hysteresis.

    Args:
        config: the allocator knobs (``block_size``, ``levels``, ``w_max``, ``n_diff``,
            ``tau_expand``, ``tau_collapse``, ``cooldown_steps``, ``min_residency``,
            ``protected_tokens``).
        backend: ``"auto"`` (cuda for a WC on a CUDA device when the kernels are built,
            else cpp when the extension is built, else python; ``MEGACONTEXT_BACKEND``
            overrides), ``"python"``, ``"cpp"`` or ``"cuda"``.

    State: the step counter and, per gist node, the step of its last change (expand
    of it or collapse into it), in one int64 tensor on the WC's device. One
    allocator serves one history; :meth:`reset` clears the state.

    Example::

        cfg = mc.MegaContextConfig(w_max=512)
        wc = mc.WorkingContext.from_tree(tree, cfg.w_max, cfg.protected_tokens)
        alloc = mc.FocusAllocator(cfg)
        actions = alloc.step(wc, scores)   # wc is updated in place
    """

    def __init__(self, config: MegaContextConfig, backend: str = "auto"):
        if backend not in ("auto", "python", "cpp", "cuda"):
            raise ConfigError(
                f"backend must be auto, python, cpp or cuda, got {backend!r}",
                field="backend",
                value=backend,
            )
        if config.levels > _MAX_TOP:
            raise ConfigError(
                f"levels={config.levels} exceeds the allocator's maximum {_MAX_TOP}",
                field="levels",
                value=config.levels,
            )
        if config.block_size**config.levels >= 2**62:
            raise ConfigError("block_size**levels overflows int64", field="levels")
        if backend == "cpp" and not native.available():
            native.extension()  # raises BackendUnavailableError with the reason
        if backend == "cuda" and not native.cuda_available():
            raise BackendUnavailableError(
                "backend='cuda' needs megacontext._C built with CUDA and a visible CUDA device "
                f"(build: {native.build_info()})"
            )
        self.config = config
        self.backend = backend
        # > 0 (a power of two): the cpp backend selects candidates the way the CUDA
        # kernel does, run sequentially with that many "threads" (tests only).
        self._emulate_threads = 0
        self.reset()

    def reset(self) -> None:
        """Forget the hysteresis state and restart the step counter at 0."""
        self._caps = [0] * (self.config.levels + 1)
        self._state = torch.zeros(1, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """The hysteresis state: ``{"state": int64 [1 + sum(caps)] (CPU copy; entry 0
        the step counter, then each level's last-changed steps), "caps": [levels + 1]
        slots per level}``. :meth:`load_state_dict` restores it exactly."""
        return {"state": self._state.detach().cpu().clone(), "caps": list(self._caps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (checked against this config's levels)."""
        caps = [int(c) for c in state["caps"]]
        tensor = torch.as_tensor(state["state"])
        if len(caps) != self.config.levels + 1 or any(c < 0 for c in caps) or caps[0]:
            raise ConfigError(
                f"allocator caps {caps} do not fit levels={self.config.levels}",
                field="caps",
                value=caps,
            )
        if tensor.dtype != torch.int64 or tuple(tensor.shape) != (1 + sum(caps),):
            raise ConfigError(
                f"allocator state must be int64 [{1 + sum(caps)}], got {tensor.dtype} "
                f"{tuple(tensor.shape)}",
                field="state",
            )
        self._state, self._caps = tensor.clone(), caps

    # -------------------------------------------------------------- state access

    @property
    def step_count(self) -> int:
        """Steps taken so far (the step number the next actions will carry)."""
        return int(self._state[0])

    def _offsets(self) -> tuple[int, ...]:
        offs, o = [0], 1
        for level in range(1, self.config.levels + 1):
            offs.append(o)
            o += self._caps[level]
        return tuple(offs)

    def last_changed(self, level: int) -> torch.Tensor:
        """int64 ``[slots]``: the step at which each LOD``level`` node was last
        expanded or collapsed into (-1: never). Slots cover every node seen so far."""
        if not 1 <= level <= self.config.levels:
            raise ConfigError(f"level must be in [1, {self.config.levels}]", field="level")
        off = self._offsets()[level]
        return self._state[off : off + self._caps[level]]

    def _ensure_state(self, num_tokens: int, device: torch.device) -> None:
        bs, top = self.config.block_size, self.config.levels
        need = [0] + [num_tokens // bs**level for level in range(1, top + 1)]
        if any(need[lv] > self._caps[lv] for lv in range(1, top + 1)):
            # Grow geometrically so a growing history reallocates rarely.
            caps = [0] + [
                max(self._caps[lv], need[lv] if need[lv] <= self._caps[lv] else 2 * need[lv])
                for lv in range(1, top + 1)
            ]
            old_offs = self._offsets()
            new = torch.full((1 + sum(caps),), NEVER, dtype=torch.int64, device=device)
            new[0] = self._state[0]
            o = 1
            for lv in range(1, top + 1):
                c = self._caps[lv]
                new[o : o + c] = self._state[old_offs[lv] : old_offs[lv] + c].to(device)
                o += caps[lv]
            self._state, self._caps = new, caps
        if self._state.device != device:
            self._state = self._state.to(device)

    # --------------------------------------------------------------------- step

    def resolve_backend(self, wc: WorkingContext) -> str:
        """The backend a step on ``wc`` runs on."""
        forced = native.forced_backend() if self.backend == "auto" else None
        choice = forced or self.backend
        on_cuda = wc.device.type == "cuda"
        if choice == "auto":
            if on_cuda and native.cuda_available():
                return "cuda"
            return "cpp" if native.available() else "python"
        if choice == "cuda" and not on_cuda:
            raise BackendUnavailableError(
                f"backend 'cuda' needs the working context on a CUDA device, got {wc.device}"
            )
        if choice == "cuda" and not native.cuda_available():
            raise BackendUnavailableError("backend 'cuda' is not available in this build")
        if choice == "cpp":
            native.extension()
        return choice

    def _params(self, wc: WorkingContext) -> StepParams:
        cfg = self.config
        for name, mine, theirs in (
            ("block_size", cfg.block_size, wc.block_size),
            ("levels", cfg.levels, wc.max_level),
            ("w_max", cfg.w_max, wc.w_max),
            ("recent_tokens", cfg.protected_tokens, wc.recent_tokens),
        ):
            if mine != theirs:
                raise ConfigError(
                    f"working context has {name}={theirs} but the allocator's config has "
                    f"{mine}",
                    field=name,
                    value=theirs,
                )
        return StepParams(
            block_size=cfg.block_size,
            top=cfg.levels,
            num_tokens=wc.num_tokens,
            w_max=cfg.w_max,
            p0=protected_start(wc.num_tokens, cfg.protected_tokens, cfg.block_size),
            n_diff=cfg.n_diff,
            cooldown=cfg.cooldown_steps,
            min_residency=cfg.min_residency,
            tau_expand=float(cfg.tau_expand),
            tau_collapse=float(cfg.tau_collapse),
            st_off=self._offsets(),
            st_size=tuple(self._caps),
        )

    def step(self, wc: WorkingContext, scores: torch.Tensor) -> list[Action]:
        """One step: choose and apply actions, **updating ``wc`` in place** (its
        ``levels`` and ``nodes`` tensors are replaced), advance the step counter and
        return the actions in the order they were applied.

        ``scores``: ``[N]`` (or ``[1, N]``), one utility per entry; converted to float32
        (every backend decides on the same float32 values). A NaN score masks the
        candidates it belongs to.
        """
        scores = torch.as_tensor(scores)
        if scores.dim() == 2 and scores.shape[0] == 1:
            scores = scores[0]
        if scores.dim() != 1 or scores.shape[0] != len(wc):
            raise ConfigError(
                f"scores must have shape [{len(wc)}] (one per WC entry), got "
                f"{tuple(scores.shape)}",
                field="scores",
            )
        backend = self.resolve_backend(wc)
        # The host backends run on CPU copies of a WC that lives on an accelerator
        # (the new WC is moved back); only the cuda backend works in place.
        device = wc.device if backend == "cuda" else torch.device("cpu")
        self._ensure_state(wc.num_tokens, device)
        p = self._params(wc)
        scores = scores.detach().to(device=device, dtype=torch.float32).contiguous()
        work = wc if wc.device == device else wc.to(device)
        if backend != "cuda" and len(work):
            # The device kernel only guards memory; on the host an impossible level
            # is reported (the same error from both host backends).
            lo, hi = torch.aminmax(work.levels)
            if int(lo) < 0 or int(hi) > p.top:
                i = int(torch.nonzero((work.levels < 0) | (work.levels > p.top))[0])
                raise InvariantError(
                    f"entry {i}: level {int(work.levels[i])} outside [0, {p.top}]", entry=i
                )
        if backend == "python":
            rows = self._step_python(work, scores, p)
        elif backend == "cpp":
            rows = self._step_cpp(work, scores, p)
        else:
            rows = self._step_cuda(work, scores, p)
        if work is not wc:
            wc.levels, wc.nodes = work.levels.to(wc.device), work.nodes.to(wc.device)
        return actions_from_tensor(rows)

    def _step_python(self, wc: WorkingContext, scores: torch.Tensor, p: StepParams):
        state = self._state.tolist()
        levels, nodes, rows = focus_step_reference(
            wc.levels.tolist(), wc.nodes.tolist(), scores.tolist(), state, p
        )
        self._state.copy_(torch.tensor(state, dtype=torch.int64))
        wc.levels = torch.tensor(levels, dtype=LEVEL_DTYPE)
        wc.nodes = torch.tensor(nodes, dtype=NODE_DTYPE)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), ACTION_COLS)

    def _step_cpp(self, wc: WorkingContext, scores: torch.Tensor, p: StepParams):
        ext = native.extension()
        params = _native_params(p.packed())
        n = len(wc)
        levels, nodes = wc.levels.contiguous(), wc.nodes.contiguous()
        out_cap, act_cap = _capacities(n, params.block_size, params.n_diff)
        out_levels = torch.empty(out_cap, dtype=LEVEL_DTYPE)
        out_nodes = torch.empty(out_cap, dtype=NODE_DTYPE)
        actions = torch.empty((act_cap, ext.ALLOC_ACTION_COLS), dtype=torch.float64)
        new_n, n_actions = ext.focus_step_cpu(
            levels.data_ptr(),
            nodes.data_ptr(),
            scores.data_ptr(),
            n,
            self._state.data_ptr(),
            params,
            out_levels.data_ptr(),
            out_cap,
            out_nodes.data_ptr(),
            actions.data_ptr(),
            act_cap,
            self._emulate_threads,
        )
        wc.levels = out_levels[:new_n]
        wc.nodes = out_nodes[:new_n]
        return actions[:n_actions]

    def _step_cuda(self, wc: WorkingContext, scores: torch.Tensor, p: StepParams):
        out_levels, out_nodes, actions, counts = focus_step(
            wc.levels, wc.nodes, scores, self._state, p.packed()
        )
        # The op itself never synchronises; returning Python actions needs the
        # counts and the rows, fetched together: the step's single device->host copy.
        packed = torch.cat([counts.to(torch.float64), actions.reshape(-1)]).cpu()
        new_n, n_actions = int(packed[0]), int(packed[1])
        wc.levels = out_levels[:new_n]
        wc.nodes = out_nodes[:new_n]
        return packed[2:].reshape(-1, actions.shape[1])[:n_actions]


# ------------------------------------------------------------- the custom op


def _capacities(n: int, block_size: int, n_diff: int) -> tuple[int, int]:
    # Plain arithmetic (not _C.StepParams.out_capacity) so that the fake works on the
    # symbolic sizes of a dynamic-shape trace; tests check it against _C's.
    return n + n_diff * (block_size - 1), n // block_size + n_diff + 1


@torch.library.custom_op("megacontext::focus_step", mutates_args=("state",))
def focus_step(
    levels: torch.Tensor,
    nodes: torch.Tensor,
    scores: torch.Tensor,
    state: torch.Tensor,
    params: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One allocator step as a torch op (CPU: the C++ core; CUDA: the kernel).

    Inputs: ``levels`` int32 [N], ``nodes`` int64 [N], ``scores`` float32 [N],
    ``state`` int64 (mutated: step counter + last-change slots, layout
    ``st_off``/``st_size``), ``params`` the step's parameters packed by
    :meth:`StepParams.packed` (order: ``_C.STEP_PARAM_FIELDS``; a wrong length or
    value is a ConfigError). Returns ``out_levels`` int32 [C], ``out_nodes`` int64 [C]
    (``C = N + n_diff*(bs-1)``; the first ``counts[0]`` are the new WC), ``actions``
    float64 [A, ``_C.ALLOC_ACTION_COLS``] (the first ``counts[1]`` rows are the trace)
    and ``counts`` int64 [2]. On CUDA it is enqueued on the current stream and never
    synchronises.
    """
    p = _native_params(params)
    n = levels.shape[0]
    dev = levels.device
    for name, x, dtype in (
        ("levels", levels, LEVEL_DTYPE),
        ("nodes", nodes, NODE_DTYPE),
        ("scores", scores, torch.float32),
        ("state", state, torch.int64),
    ):
        if x.dtype != dtype or x.device != dev or not x.is_contiguous():
            raise ConfigError(
                f"focus_step: {name} must be a contiguous {dtype} tensor on {dev}, got "
                f"{x.dtype} on {x.device}",
                field=name,
            )
    ext = native.extension()
    out_cap, act_cap = _capacities(n, p.block_size, p.n_diff)
    # Zero-filled (not empty) so the unused tail is deterministic.
    out_levels = torch.zeros(out_cap, dtype=LEVEL_DTYPE, device=dev)
    out_nodes = torch.zeros(out_cap, dtype=NODE_DTYPE, device=dev)
    actions = torch.zeros((act_cap, ext.ALLOC_ACTION_COLS), dtype=torch.float64, device=dev)
    args = (
        levels.data_ptr(),
        nodes.data_ptr(),
        scores.data_ptr(),
        n,
        state.data_ptr(),
        p,
        out_levels.data_ptr(),
        out_cap,
        out_nodes.data_ptr(),
        actions.data_ptr(),
        act_cap,
    )
    if dev.type == "cuda":
        if not hasattr(ext, "focus_step_cuda"):
            raise BackendUnavailableError("megacontext._C was built without CUDA kernels")
        counts = torch.empty(2, dtype=torch.int64, device=dev)
        scratch_bytes = max(n, 1) * ext.ALLOC_SCRATCH_BYTES_PER_ENTRY
        scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=dev)
        stream = torch.cuda.current_stream(dev).cuda_stream
        ext.focus_step_cuda(
            *args, counts.data_ptr(), scratch.data_ptr(), scratch_bytes, int(stream)
        )
    elif dev.type == "cpu":
        new_n, n_actions = ext.focus_step_cpu(*args)
        counts = torch.tensor([new_n, n_actions], dtype=torch.int64)
    else:
        raise BackendUnavailableError(f"focus_step has no implementation for device {dev}")
    return out_levels, out_nodes, actions, counts


@focus_step.register_fake
def _(levels, nodes, scores, state, params):
    p = _native_params(params)
    out_cap, act_cap = _capacities(levels.shape[0], p.block_size, p.n_diff)
    return (
        levels.new_empty(out_cap),
        nodes.new_empty(out_cap),
        torch.empty(
            (act_cap, native.extension().ALLOC_ACTION_COLS),
            dtype=torch.float64,
            device=levels.device,
        ),
        torch.empty(2, dtype=torch.int64, device=levels.device),
    )
