"""Shared by the session tests: a LensNet stand-in with fixed, legible scores."""

from __future__ import annotations

import torch


class RuleScorer(torch.nn.Module):
    """Fixed, legible LensNet scores, so refocus actions are guaranteed: expand the 3
    newest gists, collapse tokens more than ``far`` tokens from the cursor. (The
    learned LensNet is tested in test_lensnet.py.)"""

    def __init__(self, far: int = 100):
        super().__init__()
        self.far = far
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, entries, tail, levels, span, distance, mask=None):
        gist = levels > 0
        gist_dist = torch.where(gist, distance, torch.full_like(distance, 1 << 40))
        newest = torch.zeros_like(gist)
        newest[0, gist_dist[0].argsort()[:3]] = True
        far_tokens = ~gist & (distance > self.far)
        scores = torch.where(gist & newest, 0.9, torch.where(far_tokens, -0.9, 0.0))
        return scores.float() + 0 * self.w
