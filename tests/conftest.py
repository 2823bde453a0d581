"""Fixtures shared by the test modules (helper functions that are not fixtures: helpers.py)."""

import pytest
import torch

# The fixtures import the package inside: a module that fails to import fails the tests that use
# it, not the collection of every test.

# The test models are tiny: one thread avoids threading overhead and contention on small machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def quiet_training(monkeypatch):
    """One thread and no progress bars during a test (tiny models: much faster on a busy 2-core
    machine); the thread count is restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ a saved tiny model

@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """(directory, model): a tiny random model (W=16, segment 64, seed 0) saved by our
    save_pretrained, with the byte tokenizer. Tests copy the directory before changing it."""
    from blockrecurrent.data.tokenizer import ByteTokenizer
    from blockrecurrent.model.config import preset
    from blockrecurrent.model.transformer import BlockRecurrentTransformer

    d = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(preset("tiny")).eval()
    model.save_pretrained(d)
    ByteTokenizer().save(d)
    return d, model


@pytest.fixture(scope="session")
def model_dir(saved):
    """The directory of `saved`."""
    return saved[0]


# -------------------------------------------------------------------------------- corpora

@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The training tests' corpus: 16 files of random words (a module may define its own)."""
    from helpers import write_word_corpus

    return write_word_corpus(tmp_path_factory.mktemp("corpus"), max_words=120)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """40 small text files: every split (5% val, 5% test) gets at least one."""
    d = tmp_path_factory.mktemp("corpus_dir")
    for i in range(40):
        (d / f"f{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}  # é\n" * (1 + i % 7))
    return d


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="session")
def finished(corpus, tmp_path_factory):
    """A completed 8-step run (checkpoints at 4 and 8), shared by tests that only read or copy
    it: (out_dir, summary)."""
    from helpers import settings

    from blockrecurrent.train.trainer import train

    out = tmp_path_factory.mktemp("finished") / "out"
    torch.set_num_threads(1)
    summary = train(*settings(corpus, out, "keep_last=1"))
    return out, summary
