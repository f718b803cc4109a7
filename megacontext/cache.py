"""``MegaContextCache``: a preallocated, RoPE-preserving KV cache for the hook.

All layers' keys and values live in one tensor ``kv[L, 2, B, Hkv, C, D]`` of fixed
capacity ``C = W_max + K`` (no growth, no reallocation during a session). Keys are
stored after RoPE, rotated for the entry's position at the time it was written. When
the working context (WC) is refocused a kept entry's K/V row is *moved* to its new
slot, never recomputed; if its position changed too (a bounded position scheme
re-packs positions), its key is re-rotated by the position delta in the same pass:
RoPE rotations compose, so the key rotated for ``p`` and then by ``delta`` is the
key for ``p + delta`` (to the dtype's rounding). The frequencies are the model's own
(:func:`rope_inv_freq`).

Slot ``j`` of batch row ``b`` holds WC entry ``j``; causal order is slot order. The
runtime drives writes explicitly: :meth:`plan` says at which slots the next
forward's rows go and how long each row's context is; without a plan the cache
appends, like transformers' own caches (so a patched model can use it directly).

Attention sink (``sink=S``, the runtime uses ``S = 1`` under ``attention_sink``): ``S``
more physical slots before slot 0 hold a constant sink token's K/V
(:meth:`set_sink`), shared by every row. Every API here speaks of the logical slots
``0..C-1`` (``kv`` is their view), so refocus never moves the sink; row ``b`` reads it
when ``sink_on[b]`` (:meth:`attention_mask` adds its column), which the runtime sets
from its WC (:func:`megacontext.working_context.reads_sink`).

Refocus (see ``docs/runtime.md``):

- :meth:`truncate` keeps a prefix (``exact`` mode recomputes the rest);
- :meth:`splice` moves every kept row to its new slot for all layers in one fused
  gather (``megacontext.kernels.kv_splice``) into the second buffer, re-rotating
  each kept key by its own position delta when one is given, and swaps buffers
  (``splice`` mode then computes only the inserted rows).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import ConfigError, InputError, InvariantError, UnsupportedModelError

__all__ = ["MegaContextCache", "rope_inv_freq"]


def _head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def rope_inv_freq(model: Any) -> torch.Tensor:
    """The RoPE inverse frequencies ``float32 [D/2]`` a transformers model rotates with.

    Read from the model's own rotary embedding (``model.model.rotary_emb.inv_freq``,
    else the first submodule holding an ``inv_freq`` tensor), never recomputed from
    ``rope_theta``: whatever ``rope_scaling`` built (``default``, ``linear``,
    ``llama3``, ``yarn``, ...) is what the forward uses, and the buffer is what it
    multiplies the positions by (upcast to fp32, as the forward does). The rotary
    embedding's ``attention_scaling`` multiplies cos and sin; a re-rotation must not
    apply it again (keys already carry it), so only the frequencies are returned.

    ``dynamic`` scaling recomputes ``inv_freq`` only while a forward sees positions
    past the trained context (``max_position_embeddings``) and restores the original
    below it; bounded positions never go there, so the frequencies read here are the
    ones every key in the cache was rotated with. Under global positions past the
    trained length (the seed's ablation) keys written at different lengths would
    carry different frequencies and a re-rotation would not match.

    Raises ``UnsupportedModelError`` when the model has no rotary embedding or one
    that rotates only part of the head dim (``partial_rotary_factor < 1``).
    """
    rotary = None
    for owner in (getattr(model, "model", None), model):
        cand = getattr(owner, "rotary_emb", None)
        if isinstance(getattr(cand, "inv_freq", None), torch.Tensor):
            rotary = cand
            break
    if rotary is None:
        rotary = next(
            (
                m
                for _, m in model.named_modules()
                if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
            ),
            None,
        )
    name = type(model).__name__
    if rotary is None:
        raise UnsupportedModelError(
            f"{name} has no rotary embedding (no module with an inv_freq buffer); the "
            "cache re-rotates keys with the model's RoPE frequencies"
        )
    inv = rotary.inv_freq.detach().to(torch.float32).flatten().clone()
    head_dim = _head_dim(model.config)
    if 2 * inv.numel() != head_dim:
        raise UnsupportedModelError(
            f"{name}'s rotary embedding has {inv.numel()} frequencies but head_dim is "
            f"{head_dim}; only RoPE over the whole head dim (D/2 frequencies) is supported"
        )
    return inv


class _Layer(CacheLayerMixin):
    """One layer's view of the shared buffer (transformers calls ``update`` per layer)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: MegaContextCache, index: int):
        super().__init__()
        self.owner = owner
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ):
        return self.owner._write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner._kv_length(self.index, query_length), 0

    def get_seq_length(self) -> int:
        return self.owner.layer_lengths[self.index]

    def get_max_length(self) -> int:
        return self.owner.capacity

    def reset(self) -> None:
        self.owner.layer_lengths[self.index] = 0


class MegaContextCache(Cache):
    """Preallocated K/V of capacity ``capacity`` slots for ``batch_size`` sequences.

    Args:
        num_layers, num_kv_heads, head_dim: the base model's attention shape.
        batch_size: sequences decoded together.
        capacity: slots per sequence (``W_max + K``).
        dtype, device: of the buffers (the model's).
        double_buffer: allocate the second buffer that :meth:`splice` gathers into.
        inv_freq: the model's RoPE inverse frequencies, float32 ``[head_dim / 2]``
            (:func:`rope_inv_freq`); needed to :meth:`splice` with position deltas.
        sink: attention-sink slots kept before slot 0 (see the module docstring);
            a cache with sink slots is driven by :meth:`plan` only.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        double_buffer: bool = True,
        inv_freq: torch.Tensor | None = None,
        sink: int = 0,
    ):
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ConfigError(
                f"sink must be an int >= 0 (attention-sink slots), got {sink!r}",
                field="sink",
                value=sink,
            )
        sizes = {
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "batch_size": batch_size,
            "capacity": capacity,
        }
        bad = [k for k, v in sizes.items() if v <= 0]
        if bad:
            raise ConfigError(
                "MegaContextCache needs positive sizes, got "
                + ", ".join(f"{k}={v}" for k, v in sizes.items()),
                field=bad[0],
                value=sizes[bad[0]],
            )
        if inv_freq is not None and (head_dim % 2 or tuple(inv_freq.shape) != (head_dim // 2,)):
            raise ConfigError(
                f"inv_freq must be [head_dim / 2] = [{head_dim / 2:g}] (RoPE needs an even "
                f"head_dim), got {tuple(inv_freq.shape)}",
                field="inv_freq",
                value=tuple(inv_freq.shape),
            )
        shape = (num_layers, 2, batch_size, num_kv_heads, sink + capacity, head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device)]
        self.inv_freq = (
            None if inv_freq is None else inv_freq.to(device=device, dtype=torch.float32)
        )
        if double_buffer:
            self.buffers.append(torch.zeros(shape, dtype=dtype, device=device))
        self.active = 0
        self.capacity = capacity
        self.sink = sink
        # per batch row: whether its queries read the sink slots
        self.sink_on = [False] * batch_size
        self.num_rows = batch_size
        # Per batch row: entries held (slots [0, lengths[b]) are valid).
        self.lengths = [0] * batch_size
        # Per layer, for transformers' bookkeeping (append mode writes layer by layer).
        self.layer_lengths = [0] * num_layers
        self._slots: torch.Tensor | None = None
        self._plan_len = 0
        # A pinned cache is a row view of a batch's shared buffers (see stack()).
        self.pinned = False
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])

    @classmethod
    def for_model(
        cls,
        model: Any,
        batch_size: int,
        capacity: int,
        double_buffer: bool = True,
        sink: int = 0,
    ) -> MegaContextCache:
        """A cache shaped for ``model`` (a transformers causal LM), on its device and
        dtype, holding the model's RoPE frequencies (:func:`rope_inv_freq`)."""
        cfg = model.config
        head_dim = _head_dim(cfg)
        weight = model.get_input_embeddings().weight
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            batch_size=batch_size,
            capacity=capacity,
            dtype=weight.dtype,
            device=weight.device,
            double_buffer=double_buffer,
            inv_freq=rope_inv_freq(model),
            sink=sink,
        )

    @classmethod
    def stack(cls, caches: list[MegaContextCache]) -> MegaContextCache:
        """One cache whose row ``b`` holds the rows of ``caches[b]`` (same shapes): the
        shared buffers of a batch. Each input cache is re-pointed at its row of the new
        buffers (a view, no copy) and pinned: its splices copy back instead of swapping,
        so every row keeps living in the shared active buffer."""
        if not caches:
            raise InputError("stack() needs at least one cache")
        first = caches[0]
        fields = ("num_layers", "num_kv_heads", "capacity", "head_dim")
        for i, c in enumerate(caches):
            if c.num_rows != 1:
                raise InputError(
                    f"stack(): cache {i} has batch_size={c.num_rows}; only single-row caches stack"
                )
            shape = dict(zip(fields, (c.kv.shape[0], *c.kv.shape[3:]), strict=True))
            want = dict(zip(fields, (first.kv.shape[0], *first.kv.shape[3:]), strict=True))
            for name in fields:
                if shape[name] != want[name]:
                    raise InputError(
                        f"stack(): cache {i} has {name}={shape[name]} but cache 0 has "
                        f"{name}={want[name]}; a batch needs caches of one model and capacity"
                    )
            if c.sink != first.sink:
                raise InputError(
                    f"stack(): cache {i} has sink={c.sink} but cache 0 has sink={first.sink}"
                )
            if (c.kv.dtype, c.kv.device) != (first.kv.dtype, first.kv.device):
                raise InputError(
                    f"stack(): cache {i} holds {c.kv.dtype} on {c.kv.device} but cache 0 "
                    f"holds {first.kv.dtype} on {first.kv.device} (dtype/device)"
                )
        L, _, _, H, C, D = first.kv.shape
        out = cls(
            L,
            H,
            D,
            len(caches),
            C,
            first.kv.dtype,
            first.kv.device,
            double_buffer=True,
            inv_freq=first.inv_freq,
            sink=first.sink,
        )
        for b, c in enumerate(caches):
            out._copy_rows(slice(b, b + 1), c)
            c.buffers = [buf[:, :, b : b + 1] for buf in out.buffers]
            c.active = 0
            c.pinned = True
        out.lengths = [c.lengths[0] for c in caches]
        out.sink_on = [c.sink_on[0] for c in caches]
        out.layer_lengths = [max(out.lengths)] * L
        return out

    def detached(self) -> MegaContextCache:
        """A cache with buffers of its own holding this cache's rows, sink slots and
        flags (e.g. a batch row's view, copied out so the batch's buffers can go)."""
        L, _, B, H, _, D = self.physical.shape
        out = MegaContextCache(
            L,
            H,
            D,
            B,
            self.capacity,
            self.physical.dtype,
            self.physical.device,
            double_buffer=len(self.buffers) > 1,
            inv_freq=self.inv_freq,
            sink=self.sink,
        )
        out._copy_rows(slice(None), self)
        out.set_lengths(list(self.lengths))
        out.sink_on = list(self.sink_on)
        return out

    def _copy_rows(self, rows: slice, src: MegaContextCache) -> None:
        """Copy ``src``'s sink slots into batch rows ``rows`` of every buffer (a splice
        writes the other one) and its valid slots into the active buffer."""
        S, n = src.sink, src.sink + max(src.lengths)
        for buf in self.buffers:
            buf[:, :, rows, :, :S] = src.physical[:, :, :, :, :S]
        self.physical[:, :, rows, :, S:n] = src.physical[:, :, :, :, S:n]

    # ----------------------------------------------------------------- state

    @property
    def kv(self) -> torch.Tensor:
        """The active buffer's logical slots ``[L, 2, B, Hkv, C, D]`` (a view; the sink
        slots before them are not part of it)."""
        buf = self.buffers[self.active]
        return buf if self.sink == 0 else buf[:, :, :, :, self.sink :]

    @property
    def physical(self) -> torch.Tensor:
        """The active buffer ``[L, 2, B, Hkv, S + C, D]``, sink slots first."""
        return self.buffers[self.active]

    def set_sink(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the sink's K/V, ``keys/values [L, Hkv, S, D]`` (keys after RoPE at the
        sink's positions), into every row of every buffer."""
        L, _, _, H, _, D = self.physical.shape
        want = (L, H, self.sink, D)
        for name, t in (("keys", keys), ("values", values)):
            if tuple(t.shape) != want:
                raise InputError(
                    f"set_sink: {name} must be [L, Hkv, sink, D] = {list(want)}, "
                    f"got {list(t.shape)}"
                )
        for buf in self.buffers:
            buf[:, 0, :, :, : self.sink] = keys[:, None].to(buf.device, buf.dtype)
            buf[:, 1, :, :, : self.sink] = values[:, None].to(buf.device, buf.dtype)

    def attention_mask(self, slots: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """bool ``[B, 1, q, S + max(lengths)]`` (True = attend) for a forward whose
        ``q`` rows of batch row ``b`` sit at logical ``slots[b, :]``: each sees the
        slots up to its own and, when ``sink_on[b]``, the sink slots."""
        width = max(lengths)
        dev = self.physical.device
        slots = slots.to(device=dev, dtype=torch.long)
        mask = torch.arange(width, device=dev)[None, None, None, :] <= slots[:, None, :, None]
        if self.sink == 0:
            return mask
        on = torch.tensor(self.sink_on, dtype=torch.bool, device=dev)
        sink = on[:, None, None, None].expand(-1, 1, slots.shape[1], self.sink)
        return torch.cat([sink, mask], dim=-1)

    def needs_mask(self) -> bool:
        """Whether a plain causal forward would read slots it must not: a sink some
        row does not read."""
        return self.sink > 0 and not all(self.sink_on)

    @property
    def batch_size(self) -> int:
        return self.num_rows

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layer_lengths[layer_idx]

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def reset(self) -> None:
        self.lengths = [0] * self.num_rows
        self.layer_lengths = [0] * self.num_layers
        self._slots = None

    def set_lengths(self, lengths: list[int]) -> None:
        """Declare that row ``b`` holds ``lengths[b]`` valid slots (written by a forward
        that ran on another view of these buffers, e.g. a batch's shared cache)."""
        if len(lengths) != self.num_rows or any(not 0 <= n <= self.capacity for n in lengths):
            raise InputError(
                f"lengths must be {self.num_rows} values in [0, {self.capacity}], got {lengths}"
            )
        self.lengths = [int(n) for n in lengths]
        self.layer_lengths = [max(self.lengths)] * self.num_layers

    def state_dict(self) -> dict[str, Any]:
        """The valid rows: ``{"kv": [L, 2, B, Hkv, n, D] (CPU copy, n = max(lengths)),
        "lengths": [B], "sink_on": [B]}``; :meth:`load_state_dict` restores them (the
        sink's own K/V are constant: :meth:`set_sink`)."""
        n = max(self.lengths)
        return {
            "kv": self.kv[:, :, :, :, :n].cpu().contiguous(),
            "lengths": list(self.lengths),
            "sink_on": list(self.sink_on),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Write :meth:`state_dict`'s rows into the active buffer (this cache's dtype
        and device) and set the lengths; the shape must match this cache's."""
        kv = state["kv"]
        lengths = [int(n) for n in state["lengths"]]
        L, two, B, H, C, D = self.kv.shape
        want = (L, two, B, H, D)
        got = (*tuple(kv.shape[:4]), kv.shape[5]) if kv.ndim == 6 else tuple(kv.shape)
        if got != want or kv.shape[4] > C or kv.shape[4] < max(lengths, default=0):
            raise InputError(
                f"cache state kv {tuple(kv.shape)} does not fit a cache of shape "
                f"{tuple(self.kv.shape)} (num_layers, 2, batch_size, num_kv_heads, capacity, "
                f"head_dim) holding lengths {lengths}"
            )
        sink_on = [bool(x) for x in state.get("sink_on", [False] * self.num_rows)]
        if len(sink_on) != self.num_rows:
            raise InputError(
                f"cache state sink_on must have {self.num_rows} entries, got {sink_on}"
            )
        self.set_lengths(lengths)
        self.kv[:, :, :, :, : kv.shape[4]] = kv.to(self.kv.device, self.kv.dtype)
        self.sink_on = sink_on

    # ----------------------------------------------------------------- writes

    def plan(self, slots: torch.Tensor, lengths: list[int]) -> None:
        """Make the next forward write its ``q`` rows of batch row ``b`` at
        ``slots[b, :]`` (int64 ``[B, q]``) and leave row ``b`` holding ``lengths[b]``
        entries. Attention then reads slots ``[0, max(lengths))``; the caller's mask
        says which of them each query sees."""
        if slots.ndim != 2 or slots.shape[0] != self.num_rows:
            raise InputError(
                f"slots must be [batch_size={self.num_rows}, q], got {tuple(slots.shape)}"
            )
        if len(lengths) != self.num_rows:
            raise InputError(f"lengths must have {self.num_rows} entries, got {len(lengths)}")
        top = max(lengths)
        if top > self.capacity:
            raise InvariantError(
                f"the working context needs {top} cache slots but the cache holds "
                f"{self.capacity} (W_max + K)"
            )
        self._slots = slots.to(device=self.kv.device, dtype=torch.long) + self.sink
        self._plan_len = top
        self.lengths = list(lengths)
        self.layer_lengths = [top] * self.num_layers

    def _kv_length(self, layer: int, query_length: int) -> int:
        if self._slots is not None:
            return self.sink + self._plan_len
        return self.layer_lengths[layer] + query_length

    def _write(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        kv = self.physical
        if self._slots is not None:
            index = self._slots[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
            kv[layer, 0].scatter_(2, index, key.to(kv.dtype))
            kv[layer, 1].scatter_(2, index, value.to(kv.dtype))
            length = self.sink + self._plan_len
            if layer == self.num_layers - 1:
                self._slots = None  # the plan covers exactly one forward
        elif self.sink:
            raise InvariantError(
                "a cache with attention-sink slots is written through plan() only "
                "(the runtime's forwards); append mode cannot mask the sink"
            )
        else:
            start = self.layer_lengths[layer]
            length = start + key.shape[2]
            if length > self.capacity:
                raise InvariantError(
                    f"cache overflow at layer {layer}: {length} rows > capacity {self.capacity}"
                )
            kv[layer, 0, :, :, start:length] = key
            kv[layer, 1, :, :, start:length] = value
            self.layer_lengths[layer] = length
            if layer == self.num_layers - 1:
                self.lengths = [length] * self.num_rows
        return kv[layer, 0, :, :, :length], kv[layer, 1, :, :, :length]

    # ----------------------------------------------------------------- refocus

    def truncate(self, lengths: list[int]) -> None:
        """Keep the first ``lengths[b]`` rows of each batch row (``exact`` refocus)."""
        if len(lengths) != self.num_rows or any(
            not 0 <= n <= old for n, old in zip(lengths, self.lengths, strict=True)
        ):
            raise InputError(f"cannot truncate rows holding {self.lengths} to {lengths}")
        self.lengths = list(lengths)
        self.layer_lengths = [max(lengths)] * self.num_layers

    def splice(
        self,
        index: torch.Tensor,
        lengths: list[int],
        position_delta: torch.Tensor | None = None,
    ) -> None:
        """Move kept rows to their new slots, all layers in one launch.

        ``index`` is int ``[B, C']`` (``C' <= capacity``): new slot ``j`` of row ``b``
        takes old slot ``index[b, j]``, or stays to be written (``-1``, an inserted
        entry). Afterwards row ``b`` holds ``lengths[b]`` entries.

        ``position_delta`` (int ``[B, C']``, optional): new position minus old
        position of the entry at new slot ``j`` (ignored where ``index`` is -1). Kept
        keys are re-rotated by it in the same launch (values untouched; a zero delta
        moves the row bit for bit), so after the splice each kept key is the one a
        forward at its new position writes, to the cache dtype's rounding. Needs the
        model's frequencies (a cache made by :meth:`for_model`).

        Work is proportional to the rows kept; nothing here reads device values on
        the host (no synchronisation on CUDA).
        """
        from .kernels.kv_splice import kv_splice

        if len(self.buffers) < 2:
            raise InvariantError("splice needs the second buffer (double_buffer=True)")
        if index.ndim != 2 or index.shape[0] != self.num_rows or index.shape[1] > self.capacity:
            raise InputError(
                f"index must be [batch_size={self.num_rows}, <= {self.capacity}], "
                f"got {tuple(index.shape)}"
            )
        if max(lengths) > self.capacity:
            raise InvariantError(
                f"the working context needs {max(lengths)} slots but the cache holds {self.capacity}"
            )
        device = self.kv.device
        S = self.sink
        full = torch.full((self.num_rows, self.capacity), -1, dtype=torch.long, device=device)
        full[:, : index.shape[1]] = index.to(device)
        delta = None
        if position_delta is not None:
            if self.inv_freq is None:
                raise ConfigError(
                    "splice(position_delta=...) needs the model's RoPE frequencies: build "
                    "the cache with MegaContextCache.for_model(model, ...) or pass inv_freq",
                    field="inv_freq",
                    value=None,
                )
            if tuple(position_delta.shape) != tuple(index.shape):
                raise InputError(
                    f"position_delta must have index's shape {tuple(index.shape)}, "
                    f"got {tuple(position_delta.shape)}"
                )
            if position_delta.is_floating_point() or position_delta.dtype == torch.bool:
                raise InputError(
                    f"position_delta must be an integer tensor, got {position_delta.dtype}"
                )
            delta = torch.zeros((self.num_rows, self.capacity), dtype=torch.long, device=device)
            delta[:, : index.shape[1]] = position_delta.to(device)
        # the logical slots of both buffers (strided views): the sink slots, written
        # into both buffers by set_sink, are never moved
        src, dst = (
            buf[:, :, :, :, S:]
            for buf in (self.buffers[self.active], self.buffers[1 - self.active])
        )
        kv_splice(src, dst, full, None, None, delta, None if delta is None else self.inv_freq)
        if self.pinned:
            # A row of a batch: the other rows read the active buffer, so copy back.
            n = max(lengths)
            src[:, :, :, :, :n] = dst[:, :, :, :, :n]
        else:
            self.active = 1 - self.active
        self.lengths = list(lengths)
        self.layer_lengths = [max(lengths)] * self.num_layers
