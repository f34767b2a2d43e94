"""The README and docs/ stay true: the config table is generated from the config, the commands are the real ones,
the README stays short and points at every docs page, and every relative link lands on a file and a heading."""

import re
from pathlib import Path

from diffusion_dpo.config import markdown_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONFIG_PAGE = (ROOT / "docs" / "config.md").read_text()


def _block(name: str, text: str = README) -> str:
    m = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert m, name
    return m.group(1).replace("```", "").strip()


def test_config_reference_matches_the_code():
    # regenerate with: python -m diffusion_dpo.config  (the table lives in docs/config.md)
    assert _block("config-reference", CONFIG_PAGE) == markdown_reference()


def test_cli_reference_matches_the_parser():
    from diffusion_dpo.cli import cli_reference

    # regenerate with: python -c "from diffusion_dpo.cli import cli_reference; print(cli_reference())"
    assert _block("cli-reference", (ROOT / "docs" / "cli.md").read_text()) == cli_reference().strip()


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


# --- the README is the entry, docs/ holds the rest ---

def _prose(text: str) -> str:
    """The text with fenced code blocks blanked (their lines kept empty, so a `#` comment is no heading)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def _links(text: str) -> list[str]:
    """Markdown link targets outside code: [text](target), images included."""
    prose = re.sub(r"`[^`\n]*`", "", _prose(text))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def _anchors(text: str) -> set[str]:
    """GitHub's heading ids: rendered text lower-cased, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(text), re.M):
        rendered = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", rendered.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def test_readme_is_short():
    assert len(README.splitlines()) <= 250, "move the detail into a docs/ page and link it from the README's table"


def test_relative_links_resolve():
    assert DOCS, "docs/*.md"
    bad = []
    for page in [ROOT / "README.md", *DOCS]:
        for target in _links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest.read_text())):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_every_docs_page_is_in_the_readme_table():
    section = re.search(r"^## Documentation\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert section, "the README's Documentation table"
    rows = [line for line in section.group(1).splitlines() if line.startswith("| [")]
    linked = {(ROOT / re.search(r"\]\(([^)#]+)", row).group(1)).resolve() for row in rows}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages missing from the README's table: {missing}"
    for page in DOCS:  # each page: a one-line title, then what it covers, with a way back to the README
        text = page.read_text()
        assert text.startswith("# ") and "](../README.md" in text.split("\n## ")[0], page.name


def test_the_demo_headline_table_is_the_demo_pages():
    table = re.search(r"^\| sampling \|.*?\n(?!\|)", README, re.M | re.S)
    assert table, "the demo's headline table"
    assert table.group(0).strip() in (ROOT / "docs" / "demo.md").read_text()
