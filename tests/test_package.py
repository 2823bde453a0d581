"""blockrecurrent/__init__.py: the public names are the defining modules' own objects, imported
on first use, so that `import blockrecurrent` alone does not import torch."""

import subprocess
import sys

import pytest

import blockrecurrent
from blockrecurrent.model import config, memories, transformer


def test_public_names_are_the_defining_modules_objects():
    assert blockrecurrent.BlockRecurrentTransformer is transformer.BlockRecurrentTransformer
    assert blockrecurrent.XLMemories is memories.XLMemories
    assert blockrecurrent.BlockRecurrentConfig is config.BlockRecurrentConfig
    assert blockrecurrent.preset is config.preset and blockrecurrent.PRESETS is config.PRESETS
    assert set(blockrecurrent.__all__) <= set(dir(blockrecurrent))
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        blockrecurrent.Trainer  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = "import sys, blockrecurrent; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
