"""docs/transformers.md and the README's transformers example run as written (on
tiny-llama instead of the embedded model: same code, a random 2-layer Llama)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run(blocks: list[str], name: str) -> dict:
    scope: dict = {"__name__": name}
    for i, block in enumerate(blocks):
        code = block.replace('"smollm2-135m"', '"tiny-llama"')
        exec(compile(code, f"{name}[{i}]", "exec"), scope)
    return scope


def test_transformers_doc_runs():
    blocks = _python_blocks((ROOT / "docs" / "transformers.md").read_text())
    assert len(blocks) >= 7
    scope = _run(blocks, "docs/transformers.md")
    assert scope["chat"].ingested < 100 < scope["chat"].session.num_tokens


def test_readme_transformers_example_runs():
    readme = (ROOT / "README.md").read_text()
    use = readme.split("## Use", 1)[1].split("\n## ", 1)[0]
    blocks = _python_blocks(use)
    first = blocks[0]
    assert "MegaContextForCausalLM" in first and "pipeline" in first and "Streamer" in first
    scope = _run([first], "README.md")
    assert scope["model"].sessions, "the example generated nothing"


@pytest.mark.parametrize("page", ["docs/transformers.md"])
def test_pages_name_only_public_names(page):
    import megacontext as mc

    text = (ROOT / page).read_text()
    for name in re.findall(r"\bmc\.([A-Za-z_]+)", text):
        assert name in mc.__all__, f"{page} uses mc.{name}, which is not exported"
