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


def test_the_python_example_runs_as_written(tmp_path):
    """The README's Python API script, verbatim, in a fresh directory after `make-tiny`: it trains on an in-memory
    dataset with a callback, generates with both models and compares them with a Python function as the reward."""
    import os
    import subprocess
    import sys

    script = _block("python-api").removeprefix("python").strip()
    (tmp_path / "example.py").write_text(script + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    made = subprocess.run([sys.executable, "-m", "diffusion_dpo", "make-tiny", "--output-dir", "tiny"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    res = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"steps 31-40: implicit accuracy \d\.\d\d", res.stdout), res.stdout
    assert re.search(r"DPO vs base: win rate per image \d\.\d\d \[\d\.\d\d, \d\.\d\d\], per prompt", res.stdout)
    assert (tmp_path / "runs" / "api" / "final" / "model_index.json").is_file()
    assert (tmp_path / "runs" / "api-compare" / "compare.json").is_file()
