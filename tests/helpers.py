"""Helpers shared by several test modules, where a fixture does not fit (the fixtures are in
conftest.py; the small models of the model-core tests in models.py, the naive reference model in
reference.py): corpora built here, the settings of a short training run and reading what it
wrote, and calling the `brt` command line."""

import hashlib
import json

import numpy as np
import torch

from blockrecurrent.cli import main
from blockrecurrent.data.corpus import Document, TokenizedCorpus, tokenize_corpus
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.model.config import preset as model_preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer
from blockrecurrent.train.settings import load_train_config
from blockrecurrent.train.train_data import build_data
from blockrecurrent.train.trainer import Trainer

# ----------------------------------------------------------------------------------- corpora

WORDS = "the cat sat on a mat and then it ran far away from home while dogs barked at night".split()


def write_word_corpus(root, max_words: int, docs: int = 16, seed: int = 0):
    """`docs` text files doc00.txt ... of 20 to max_words - 1 random WORDS each (seeded)."""
    rng = np.random.default_rng(seed)
    for i in range(docs):
        words = rng.choice(WORDS, int(rng.integers(20, max_words)))
        (root / f"doc{i:02d}.txt").write_text(" ".join(words))
    return root


def corpus_of(lengths, bos=0):
    """A corpus whose document i has ids bos, 1000*i+1, 1000*i+2, ... (len == lengths[i])."""
    docs = [np.array([bos] + [1000 * i + k for k in range(1, n)]) for i, n in enumerate(lengths)]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return TokenizedCorpus(np.concatenate(docs), offsets, np.array(lengths) - 1,
                           [f"d{i}" for i in range(len(lengths))], bos_id=bos, vocab_size=100_000)


def mixed_length_corpus():
    """Documents from 1 to 300 tokens (segments are 32), with multi-byte UTF-8 characters."""
    rng = np.random.default_rng(0)
    alphabet = list("abcdefgh \n") + ["é", "€", "😀"]
    lengths = [300, 7, 150, 1, 45, 220, 33, 90]
    docs = [Document(f"doc{i}", "".join(rng.choice(alphabet, n))) for i, n in enumerate(lengths)]
    return tokenize_corpus(docs, ByteTokenizer())


def eval_model():
    """The evaluation tests' tiny model: W=16, segments of 32, seeded."""
    torch.manual_seed(0)
    return BlockRecurrentTransformer(model_preset("tiny", max_seq_len=32)).eval()


# ------------------------------------------------------------------------------ training runs

def settings(corpus, out_dir, *extra, preset="tiny"):
    """(model config, train config) of the training tests' short run (8 steps, 4 lanes) on
    `corpus`, with `extra` key=value overrides."""
    overrides = [f"data={corpus}", f"out_dir={out_dir}", f"cache_dir={corpus.parent / 'cache'}",
                 "batch_size=4", "max_steps=8", "warmup_steps=2", "lr=3e-3", "log_interval=1",
                 "eval_interval=4", "save_interval=4", "eval_tokens=2000", *extra]
    return load_train_config(None, preset, overrides)


def step_losses(corpus, *extra, steps=3):
    """(losses, final weights) of `steps` optimizer steps of a Trainer with the short run's
    settings and `extra`: no files written."""
    mc, tc = settings(corpus, "unused", *extra)
    tok, train_corpus, _ = build_data(tc)
    trainer = Trainer(mc, tc, train_corpus, None, tok)
    losses = [trainer.train_step()[0] for _ in range(steps)]
    return losses, trainer.model.state_dict()


def records(out_dir, event):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def tree_digest(path):
    """Hash of every file under path (names and bytes): detects any change."""
    h = hashlib.sha1()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


# -------------------------------------------------------------------------- the command line

def run(capsys, *argv):
    """`brt ARGV` in this process -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_config(tmp_path, corpus_dir) -> str:
    """A config file of a 2-step tiny run on corpus_dir."""
    path = tmp_path / "tiny.toml"
    path.write_text(f"""[model]
preset = "tiny"
[train]
data = "{corpus_dir}"
cache_dir = "{tmp_path / 'cache'}"
batch_size = 2
max_steps = 2
warmup_steps = 1
eval_interval = 0
eval_tokens = 4096
save_interval = 0
log_interval = 1
""")
    return str(path)
