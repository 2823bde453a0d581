"""The manual is code: every fenced block in README.md, CHANGELOG.md and docs/ runs (python and
bash blocks, in order, in one scratch folder per page, with `brt` and `python` on the PATH and
the repository's configs/ beside them), toml and json blocks parse, and every relative link
points at a file that exists.

Two markers, on the line just before a fence, change what happens to its block:
`<!-- not run: REASON -->` for a block that cannot run in a test (the set-up scripts themselves,
a GPU, several machines, hours), and `<!-- needs: MODULE -->` for one that runs only where an
optional package is installed (transformers is absent on Python 3.10)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, installed with the package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [p for p in [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "experiments" / "README.md",
                     *sorted((ROOT / "docs").rglob("*.md"))] if p.exists()]
FENCE = re.compile(r"(?:^[ \t]*<!-- (?P<marker>not run|needs): (?P<reason>[^>]*?) -->\n)?"
                   r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)\n(?P<code>.*?)^(?P=indent)```",
                   re.S | re.M)
RUN = {"python", "bash", "sh", "console"}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path) -> list[dict]:
    """Fenced blocks in order; a block indented under a list item is dedented."""
    return [{**m.groupdict(), "code": textwrap.dedent(m["code"])}
            for m in FENCE.finditer(page.read_text())]


def test_pages_have_blocks():
    readme = blocks(ROOT / "README.md")
    assert any(b["lang"] == "python" and b["marker"] is None for b in readme)
    assert any(b["lang"] == "bash" and b["marker"] is None for b in readme)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path = page.parent / target if target else page
        assert path.exists(), f"{page_id(page)}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page_id(page)}: no section #{anchor} in {target}"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    text = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_markers_say_why(page):
    for i, block in enumerate(blocks(page)):
        if block["marker"] is not None:
            assert block["reason"].strip(), f"{page_id(page)}, block {i + 1}: say why"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenized-corpus cache for all pages, so a corpus two pages read is tokenized once."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_blocks_run(page, tmp_path, data_cache):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data_cache").symlink_to(data_cache)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for i, block in enumerate(blocks(page)):
        lang, code, marker = block["lang"], block["code"], block["marker"]
        where = f"{page_id(page)}, block {i + 1} ({lang})"
        if marker == "not run":
            continue
        if marker == "needs" and importlib.util.find_spec(block["reason"].strip()) is None:
            continue
        if lang == "toml":
            tomllib.loads(code)
        elif lang == "json":
            json.loads(code)
        elif lang in RUN:
            cmd = [sys.executable, "-c", code] if lang == "python" else \
                ["bash", "-euo", "pipefail", "-c", code]
            out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, f"{where} failed:\n{code}\n{out.stdout[-2000:]}" \
                                        f"\n{out.stderr[-3000:]}"


def test_model_page_lists_every_config_field():
    """docs/model.md's table has a row for every BlockRecurrentConfig field."""
    import dataclasses

    from blockrecurrent.model.config import BlockRecurrentConfig

    rows = set(re.findall(r"^\| `(\w+)` \|", (ROOT / "docs" / "model.md").read_text(), re.M))
    missing = [f.name for f in dataclasses.fields(BlockRecurrentConfig) if f.name not in rows]
    assert not missing, f"docs/model.md: add a row for {missing}"
