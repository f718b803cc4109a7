"""Per-token negative log-likelihood of a token stream under a base model.

``token_nll(base, ids, window)`` returns ``nll[t] = -log p(ids[t+1] | ids[max(0, t+1-window) : t+1])``
for ``t = 0 .. n-2`` (``[n-1]`` float32): a sliding window of at most ``window``
tokens of context, evaluated in chunks with stride ``stride`` so every target is
scored exactly once with as much context as the window allows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Base

__all__ = ["token_nll"]


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
