"""What users already rely on keeps working: every module and name the README and docs import,
`python -m` targets they run, and a model directory saved by release 0.1.0 (before the package
had subpackages), loaded by both loaders to the logits that release computed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockrecurrent.model.transformer import BlockRecurrentTransformer

ROOT = Path(__file__).resolve().parents[1]
SAVED = Path(__file__).resolve().parent / "data" / "saved-0.1.0"  # written by 0.1.0's code
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_imports() -> set[tuple[str, str | None]]:
    """(module, name) for every `from blockrecurrent... import a, b` and (module, None) for every
    `import blockrecurrent...` in the docs."""
    found = set()
    for path in DOCS:
        text = path.read_text()
        imports = re.findall(r"from (blockrecurrent[\w.]*) import (?:\(([\w, \n]+)\)|([\w, ]+))",
                             text)
        for mod, wrapped, names in imports:
            names = (wrapped or names).replace("\n", ",").split(",")
            found.update((mod, n.split(" as ")[0].strip()) for n in names if n.strip())
        found.update((mod, None) for mod in re.findall(r"^\s*import (blockrecurrent[\w.]*)", text,
                                                       re.M))
    return found


def doc_run_modules() -> set[str]:
    return {m for path in DOCS for m in re.findall(r"-m (blockrecurrent[\w.]*)", path.read_text())}


def test_the_docs_import_something():
    assert ("blockrecurrent", "BlockRecurrentTransformer") in doc_imports()
    assert "blockrecurrent.train" in doc_run_modules()


@pytest.mark.parametrize("module,name", sorted(doc_imports(), key=str))
def test_names_the_docs_import_exist(module, name):
    mod = importlib.import_module(module)
    if name is not None:
        assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), \
            f"{module} has no {name}"


@pytest.mark.parametrize("module", sorted(doc_run_modules()))
def test_modules_the_docs_run_exist(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_hf_module_stays_importable():
    """Every saved model directory carries a block_recurrent_hf.py that imports from here."""
    assert "from blockrecurrent.hf import" in (SAVED / "block_recurrent_hf.py").read_text()
    importlib.import_module("blockrecurrent.hf")


@pytest.fixture(scope="module")
def reference():
    return load_file(str(SAVED / "reference.safetensors"))


def test_directory_saved_before_the_move_loads(reference):
    model = BlockRecurrentTransformer.from_pretrained(SAVED).eval()
    with torch.no_grad():
        logits, _, states = model(reference["input_ids"])
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, reference["states"], rtol=1e-5, atol=1e-5)


def test_directory_saved_before_the_move_loads_in_transformers(reference, tmp_path):
    """The Hugging Face loader with trust_remote_code, in a fresh process that never imports the
    package itself: the directory's own block_recurrent_hf.py does."""
    pytest.importorskip("transformers")
    d = shutil.copytree(SAVED, tmp_path / "model")
    code = f"""
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(d)!r}, trust_remote_code=True).eval()
assert "blockrecurrent.hf" in sys.modules and type(m).__name__ == "BlockRecurrentForCausalLM"
ids = load_file({str(d / "reference.safetensors")!r})["input_ids"]
with torch.no_grad():
    save_file({{"logits": m(ids).logits.contiguous()}}, {str(tmp_path / "hf.safetensors")!r})
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    got = load_file(str(tmp_path / "hf.safetensors"))["logits"]
    # transformers reads a document longer than one segment in chunks: equal up to rounding.
    torch.testing.assert_close(got, reference["logits"], rtol=1e-5, atol=1e-5)
