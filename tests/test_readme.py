"""The README stays true: its config table is generated from the config, its commands are the real ones."""

import re
from pathlib import Path

from diffusion_dpo.config import markdown_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(name: str) -> str:
    m = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", README, re.S)
    assert m, name
    return m.group(1).replace("```", "").strip()


def test_config_reference_matches_the_code():
    # regenerate with: python -m diffusion_dpo.config
    assert _block("config-reference") == markdown_reference()


def test_the_two_set_up_and_go_commands():
    demo, test = _block("demo-command"), _block("test-command")
    for cmd in (demo, test):
        assert "pip install torch==2.13.0" in cmd and ".venv" in cmd and "\n" not in cmd
    assert "diffusion-dpo demo --output-dir demo" in demo
    assert "diffusion-dpo train --config configs/tiny.yaml" in README  # the quick mechanics check stays documented
    assert "pytest" in test
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "configs" / "tiny.yaml").is_file()
