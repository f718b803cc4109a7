"""Negative log-likelihoods under a base model.

:func:`nll_after` (one definition, used by the runtime's Loss@H, the evaluation's
views and the trainer's forward) scores the ``H`` tokens that follow a context of
arbitrary input rows (a working context's entries, a peer's view): row ``r`` is

    x_r = contexts[r].embeds ++ E[targets[r][:-1]],
    positions_r = contexts[r].positions ++ (start_r, start_r + 1, ..., start_r + H - 2),

left-padded to one length ``L`` with an explicit boolean mask ``[R, 1, L, L]``
(causal in row order, padding hidden; an explicit mask also stops transformers
reading jumps in ``position_ids`` as packed-sequence boundaries), so the last ``H``
positions of every row predict its targets and ``logits_to_keep=H`` keeps the
vocabulary projection at ``[R, H, V]``. :func:`context_logprobs` is that forward for
rows already built.


``token_nll(base, ids, window)`` returns ``nll[t] = -log p(ids[t+1] | ids[max(0, t+1-window) : t+1])``
for ``t = 0 .. n-2`` (``[n-1]`` float32): a sliding window of at most ``window``
tokens of context, evaluated in chunks with stride ``stride`` so every target is
scored exactly once with as much context as the window allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .base import Base
from .errors import InputError

__all__ = ["context_logprobs", "nll_after", "token_nll"]


def context_logprobs(
    base: Any,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    lengths: Sequence[int] | None = None,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """float32 log-probabilities ``[B, k, V]`` at the last ``k = logits_to_keep``
    positions of left-padded rows ``embeds [B, L, d]`` at ``positions`` int64 ``[B, L]``.

    ``lengths[b]``: the valid (rightmost) rows of ``b`` (default: all ``L``). Mask:
    ``m[b, i, j] = (j <= i and j >= L - lengths[b]) or i == j``. Differentiable (no
    ``no_grad`` here; callers that need none add it)."""
    B, L = embeds.shape[:2]
    dev = base.device
    valid = torch.ones(B, L, dtype=torch.bool)
    if lengths is not None:
        if len(lengths) != B:
            raise InputError(f"lengths has {len(lengths)} rows, embeds {B}")
        for b, n in enumerate(lengths):
            valid[b, : L - int(n)] = False
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
    out = base.model(
        inputs_embeds=embeds.to(device=dev, dtype=base.dtype),
        position_ids=positions.to(device=dev, dtype=torch.int64),
        attention_mask=mask[:, None].to(dev),
        logits_to_keep=logits_to_keep,
        use_cache=False,
    )
    return out.logits.float().log_softmax(-1)


def nll_after(
    base: Any,
    contexts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[torch.Tensor],
    starts: Sequence[int],
    log_probs: bool = False,
) -> torch.Tensor:
    """NLL (nats, float32 ``[R, H]``) of ``targets[r]`` (int64 ``[H]``, one ``H`` for
    every row) read after context ``r``; with ``log_probs`` the log-probabilities
    ``[R, H, V]`` instead. One base forward for all rows (see the module docstring).

    ``contexts[r] = (embeds [N_r, d], positions [N_r])``; ``starts[r]``: the first
    target's position (the history length). Differentiable in the embeddings."""
    if not targets:
        raise InputError("nll_after: no rows to score")
    H = int(targets[0].numel())
    if H < 1 or any(int(t.numel()) != H for t in targets):
        raise InputError(
            f"nll_after: every row needs the same H >= 1 targets, got "
            f"{[int(t.numel()) for t in targets]}"
        )
    dev = base.device
    seqs, poss = [], []
    for (emb, pos), tgt, start in zip(contexts, targets, starts, strict=True):
        tail = base.embed(tgt[:-1].cpu().to(torch.int64)) if H > 1 else emb[:0]
        seqs.append(torch.cat([emb.to(dev), tail.to(device=dev, dtype=emb.dtype)]))
        poss.append(torch.cat([pos.cpu().to(torch.int64), torch.arange(start, start + H - 1)]))
    L = max(s.shape[0] for s in seqs)
    # left padding with zeros (F.pad keeps the rows differentiable)
    x = torch.stack([F.pad(s, (0, 0, L - s.shape[0], 0)) for s in seqs])
    position_ids = torch.zeros(len(seqs), L, dtype=torch.int64)
    for r, p in enumerate(poss):
        position_ids[r, L - p.numel() :] = p
    logp = context_logprobs(base, x, position_ids, [p.numel() for p in poss], H)
    if log_probs:
        return logp
    tgt = torch.stack([t.to(torch.int64) for t in targets]).to(logp.device)
    return -logp.gather(-1, tgt[..., None])[..., 0]


@torch.no_grad()
def token_nll(
    base: Base,
    ids: torch.Tensor,
    window: int = 2048,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """NLL (nats) of ``ids[1:]`` under ``base`` with a sliding context window.

    Args:
        base: the model.
        ids: int64 ``[n]`` token ids, ``n >= 2``.
        window: tokens per forward pass (context plus scored targets).
        stride: new targets scored per pass after the first (default ``window // 2``);
            each target after the first window sees at least ``window - stride`` tokens
            of context.
        progress: called as ``progress(done, total)`` targets after each pass.

    Returns:
        float32 ``[n - 1]``: ``out[t]`` is the NLL of ``ids[t + 1]``.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = window // 2 if stride is None else stride
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window-1] = [1, {window - 1}], got {stride}")
    if base.max_positions and window > base.max_positions:
        raise ValueError(
            f"window={window} exceeds the context of {base.name} ({base.max_positions} positions)"
        )
    vocab = base.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"token ids must lie in [0, {vocab}); got range [{ids.min()}, {ids.max()}]"
        )

    out = torch.empty(n - 1, dtype=torch.float32)
    done = 0  # targets scored so far: ids[1 : done + 1]
    while done < n - 1:
        end = min(n, (done + 1) + (window - 1 if done == 0 else stride))
        start = max(0, end - window)
        chunk = ids[start:end].to(base.device).unsqueeze(0)
        logits = base.model(input_ids=chunk, use_cache=False).logits[0].float()
        # logits[i] predicts chunk[i+1] = ids[start+i+1]; keep targets ids[done+1 : end].
        first = done + 1 - start - 1
        lp = torch.log_softmax(logits[first : end - start - 1], dim=-1)
        tgt = ids[done + 1 : end].to(lp.device)
        out[done : end - 1] = -lp.gather(1, tgt[:, None])[:, 0].cpu()
        done = end - 1
        if progress is not None:
            progress(done, n - 1)
    return out
