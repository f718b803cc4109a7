"""The guide's toy coding session, replayable: ``megacontext demo walkthrough``.

1. Setup: a ~4k-token TypeScript project summary (``demo_data/toy_ts_project.md``)
   is ingested into the MegaContext tree; the working context (WC) starts by recency.
2. User turn: "Add logging to the `fetchUser` helper." is ingested as a chat turn.
3. LensNet pass: every WC entry gets a score; the report lists the highest and lowest
   scored entries with the text they cover.
4. Focus allocator: the actions taken (expand / collapse), their scores and the text
   of each span; whether the span holding ``fetchUser`` is at full detail.
5. Decode: the base model answers under the budget; blocks refocus every 32 tokens.
6. Trace: every action with its residency, and the telemetry of each iteration.

Everything printed comes from the run; nothing is scripted. With an untrained
LensNet (the default without ``--lensnet``) the scores carry no learned signal,
and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

__all__ = ["USER_TURN", "WalkthroughResult", "project_text", "run_walkthrough"]

USER_TURN = "Add logging to the `fetchUser` helper."
_MARKER = "export async function fetchUser"


def project_text() -> str:
    """The walkthrough's TypeScript project summary (shipped with the package)."""
    return resources.files("megacontext.demo_data").joinpath("toy_ts_project.md").read_text()


@dataclass
class WalkthroughResult:
    lines: list[str] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)
    answer: str = ""
    fetchuser_lod0_before: bool = False
    fetchuser_lod0_after: bool = False

    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n"


def _span_text(session: Any, level: int, node: int, limit: int = 70) -> str:
    bs = session.config.block_size
    start, end = node * bs**level, (node + 1) * bs**level
    text = session.base.decode(session.tree.tokens(start, min(end, session.num_tokens)))
    text = " ".join(text.split())
    return (text[:limit] + "…") if len(text) > limit else text


def _lod_of_token(session: Any, token: int) -> int:
    wc = session.wc
    starts, spans = wc.starts.cpu(), wc.spans.cpu()
    i = int(torch.searchsorted(starts, torch.tensor([token]), right=True)[0]) - 1
    assert starts[i] <= token < starts[i] + spans[i]
    return int(wc.levels[i])


def run_walkthrough(
    session: Any, max_new_tokens: int = 96, top: int = 5, lensnet_trained: bool = False
) -> WalkthroughResult:
    """Replay the walkthrough on ``session`` (a fresh :class:`megacontext.Session`)."""
    out = WalkthroughResult()
    say = out.lines.append
    cfg = session.config
    text = project_text()
    ids = session.base.encode(text)
    marker_at = len(session.base.encode(text[: text.index(_MARKER)]))

    say("## 1. Setup")
    say("")
    session.ingest(ids)
    say(
        f"Ingested the project summary: {ids.numel():,} tokens. Budget W_max = {cfg.w_max}; "
        f"the recency-based WC: `{session.wc!r}`."
    )
    out.fetchuser_lod0_before = _lod_of_token(session, marker_at) == 0
    say(
        f"`fetchUser`'s definition starts at token {marker_at}; it is held at LOD"
        f"{_lod_of_token(session, marker_at)} before the user turn."
    )
    say("")

    say("## 2. User turn")
    say("")
    say(f"> {USER_TURN}")
    say("")
    recorded: dict[str, Any] = {}
    # the refocus step reads its scores from the session's focus loop
    original = session.focus.scores

    def scores_spy() -> torch.Tensor:
        s = original()
        if "scores" not in recorded:
            recorded["scores"] = s.clone()
            recorded["levels"] = session.wc.levels.clone()
            recorded["nodes"] = session.wc.nodes.clone()
        return s

    session.focus.scores = scores_spy
    n_actions = len(session.actions)
    tok = session.base.tokenizer
    turn = (
        tok.apply_chat_template(
            [{"role": "user", "content": USER_TURN}], tokenize=False, add_generation_prompt=True
        )
        if getattr(tok, "chat_template", None)
        else f"\n\n{USER_TURN}\n"
    )
    session.ingest(turn)
    session.focus.scores = original

    say("## 3. LensNet pass")
    say("")
    if session.system.lensnet is None:
        say("No LensNet: recency-only focus, no scores.")
    else:
        note = (
            "" if lensnet_trained else " (untrained LensNet: these scores carry no learned signal)"
        )
        s, lv, nd = recorded["scores"], recorded["levels"], recorded["nodes"]
        say(
            f"Scores over {s.numel()} entries: min {float(s.min()):+.3f}, mean "
            f"{float(s.mean()):+.3f}, max {float(s.max()):+.3f}{note}."
        )
        say("")
        say("| rank | score | LOD | node | covers |")
        say("| ---: | ---: | ---: | ---: | --- |")
        order = torch.argsort(s, descending=True)
        picks = [*order[:top].tolist(), *order[-top:].tolist()]
        for rank, i in enumerate(picks):
            label = rank + 1 if rank < top else s.numel() - (len(picks) - rank) + 1
            covers = _span_text(session, int(lv[i]), int(nd[i]), 60).replace("|", "\\|")
            say(f"| {label} | {float(s[i]):+.3f} | {int(lv[i])} | {int(nd[i])} | {covers} |")
    say("")

    say("## 4. Focus allocator")
    say("")
    turn_actions = session.actions[n_actions:]
    if not turn_actions and "scores" in recorded:
        s, lv = recorded["scores"], recorded["levels"]
        hot = int(((lv > 0) & (s > cfg.tau_expand)).sum())
        cold = int(((lv < cfg.levels) & (s < -cfg.tau_collapse)).sum())
        say(
            f"No action. {hot} gist entries scored above tau_expand = {cfg.tau_expand} and "
            f"{cold} entries below -tau_collapse = -{cfg.tau_collapse}; an expand costs "
            f"{cfg.block_size - 1} entries and the WC held {len(recorded['levels'])} of "
            f"{cfg.w_max}, so an expand needed a collapse first."
            if hot
            else f"No action: no entry scored above tau_expand = {cfg.tau_expand} or "
            f"below -tau_collapse = -{cfg.tau_collapse}."
        )
    elif not turn_actions:
        say("No action (recency-only focus: only the budget forces collapses).")
    for a in turn_actions:
        say(
            f"- **{a.kind}** LOD{a.level} node {a.node} (score {a.score:+.3f}, cost "
            f"{a.cost_delta:+d}): {_span_text(session, a.level, a.node)}"
        )
    out.fetchuser_lod0_after = _lod_of_token(session, marker_at) == 0
    say("")
    say(
        f"`fetchUser`'s definition is now at LOD{_lod_of_token(session, marker_at)}. "
        f"WC: `{session.wc!r}`."
    )
    say("")

    say("## 5. Decode")
    say("")
    out.answer = session.generate(max_new_tokens)
    say("```")
    say(out.answer.strip())
    say("```")
    say("")

    say("## 6. Trace")
    say("")
    out.actions = list(session.actions)
    if out.actions:
        say("| step | kind | LOD | node | score | cost | residency |")
        say("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for a, r in zip(out.actions, session.residencies, strict=True):
            say(
                f"| {a.step} | {a.kind} | {a.level} | {a.node} | {a.score:+.3f} | "
                f"{a.cost_delta:+d} | {r} |"
            )
    else:
        say("No allocator actions in this run.")
    say("")
    say("| iteration | tokens | WC cost | utilization | actions | latency ms |")
    say("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in session.history:
        say(
            f"| {row['iteration']} | {row['num_tokens']} | {row['wc_cost']} | "
            f"{row['token_budget_utilization']:.2f} | {row['n_expand'] + row['n_collapse']} | "
            f"{row['latency_ms']:.0f} |"
        )
    return out
