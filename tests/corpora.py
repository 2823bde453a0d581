"""Test data shared by test modules, built here: a small corpus of random words."""

import numpy as np

WORDS = "the cat sat on a mat and then it ran far away from home while dogs barked at night".split()


def write_word_corpus(root, max_words: int, docs: int = 16, seed: int = 0):
    """`docs` text files doc00.txt ... of 20 to max_words - 1 random WORDS each (seeded)."""
    rng = np.random.default_rng(seed)
    for i in range(docs):
        words = rng.choice(WORDS, int(rng.integers(20, max_words)))
        (root / f"doc{i:02d}.txt").write_text(" ".join(words))
    return root
