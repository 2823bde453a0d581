"""Passkey documents (Mohtashami & Jaggi 2023, "Landmark Attention"): a 5-digit key stated once in
a long run of filler sentences, asked for at the end.

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there. The grass is green. The sky is blue.
    ... The pass key is 71432. Remember it. 71432 is the pass key. ... The sun is yellow. Here
    we go. There and back again. What is the pass key? The pass key is 71432.

Two forms:
- `passkey_prompt(tokenizer, length, depth, key)`: token ids of exactly `length` tokens (the
  document-start token first) ending with "The pass key is"; the answer is `answer_ids`. The
  evaluation (evaluate/passkey.py) streams these through a model.
- `passkey_text(num_chars, depth, key)`, `passkey_documents(count, ...)`, `mix_passkey(docs,
  share)` and `write_passkey_documents(folder, ...)`: whole documents
  with the answer, as text, for mixing into a training corpus (`data=FOLDER`).

`depth` in [0, 1] is where the key sits: the fraction of the filler sentences before it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PREFIX", "FILLER", "QUESTION", "key_line", "answer_text", "random_key",
           "passkey_text", "passkey_prompt", "PasskeyPrompt", "passkey_documents", "mix_passkey",
           "write_passkey_documents", "KEY_DIGITS"]

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about the important information there.")
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
          " There and back again.")
QUESTION = " What is the pass key? The pass key is"
KEY_DIGITS = 5


def key_line(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def answer_text(key: str) -> str:
    """What follows the question: " 71432" (the exact-match target)."""
    return f" {key}"


def random_key(rng: np.random.Generator) -> str:
    """A uniformly random 5-digit key, 10000..99999 (no leading zero)."""
    return str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS)))


def _check_depth(depth: float) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1] (the fraction of the filler before "
                         f"the key), got {depth!r}")
    return float(depth)


def _check_key(key: str) -> str:
    if not (isinstance(key, str) and len(key) == KEY_DIGITS and key.isdigit()):
        raise ValueError(f"key must be a string of {KEY_DIGITS} digits, got {key!r}")
    return key


def _filler_sentences(n: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(n)]


def passkey_text(num_chars: int, depth: float, key: str, answer: bool = True) -> str:
    """A passkey document of exactly `num_chars` characters, laid out as `passkey_prompt` lays out
    its tokens (so that training documents look like the evaluation's: whole filler sentences,
    then the few characters left over as spaces before the question), with the key after
    `depth` of the filler; `answer` appends " 71432." and a newline (within `num_chars`)."""
    from .tokenizer import ByteTokenizer

    _check_key(key)
    tail = answer_text(key) + ".\n" if answer else ""
    tok = ByteTokenizer()
    prompt = passkey_prompt(tok, num_chars - len(tail) + 1, depth, key)  # + 1: the bos
    return tok.decode(prompt.ids[1:]) + tail


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]  # exactly `length` token ids, the document-start token first
    answer_ids: list[int]  # the answer's tokens (" 71432")
    key: str
    depth: float  # the depth asked for
    key_position: int  # index in ids of the key line's first token

    def __len__(self) -> int:
        return len(self.ids)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A passkey prompt of exactly `length` tokens: bos, prefix, filler, the key line after `depth`
    of the filler, filler, question. Whole filler sentences; the few tokens left over (less than
    one sentence) are single spaces before the question. Raises if `length` cannot hold the
    prefix, key line and question."""
    _check_depth(depth)
    _check_key(key)
    enc = tokenizer.encode
    head = [tokenizer.bos_id] + enc(PREFIX)
    mid = enc(key_line(key))
    question = enc(QUESTION)
    fixed = len(head) + len(mid) + len(question)
    if isinstance(length, bool) or not isinstance(length, int) or length < fixed:
        raise ValueError(f"length must be an int >= {fixed} (prefix, key line and question), "
                         f"got {length!r}")
    sentence_ids = [enc(s) for s in FILLER]
    # the filler is periodic: whole periods first, then sentence by sentence
    period = sum(len(s) for s in sentence_ids)
    budget = length - fixed
    n = len(FILLER) * (budget // period)
    used = period * (budget // period)
    while used + len(sentence_ids[n % len(FILLER)]) <= budget:
        used += len(sentence_ids[n % len(FILLER)])
        n += 1
    a = int(round(depth * n))
    before = [t for i in range(a) for t in sentence_ids[i % len(FILLER)]]
    after = [t for i in range(a, n) for t in sentence_ids[i % len(FILLER)]]
    pad = enc(" ") * (budget - used)
    ids = head + before + mid + after + pad + question
    assert len(ids) == length
    return PasskeyPrompt(ids, enc(answer_text(key)), key, depth, len(head) + len(before))


def passkey_documents(count: int, min_chars: int, max_chars: int, seed: int = 0,
                      prefix: str = "passkey") -> list:
    """`count` passkey Documents with answers, named PREFIX/00000 ..., each of a length drawn
    uniformly from [min_chars, max_chars] characters (byte tokens), a random key and a depth
    uniform in [0, 1] (seeded)."""
    from .corpus import Document

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not (isinstance(min_chars, int) and isinstance(max_chars, int)
            and 0 < min_chars <= max_chars):
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars!r}, {max_chars!r}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(min_chars, max_chars + 1))
        out.append(Document(f"{prefix}/{i:05d}", passkey_text(n, float(rng.random()),
                                                               random_key(rng))))
    return out


def mix_passkey(docs: list, share: float, min_chars: int = 300, max_chars: int = 1536,
                seed: int = 0) -> list:
    """`docs` with passkey documents added, as many as make `share` of all characters (0: docs
    unchanged); sorted by name, as load_documents returns them. What a training setting
    `passkey_share` would apply to the loaded corpus before the split."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f"share must be a number in [0, 1), got {share!r}")
    if share == 0:
        return list(docs)
    chars = sum(len(d.text) for d in docs)
    count = max(1, int(chars * share / (1 - share) / ((min_chars + max_chars) / 2)))
    return sorted([*docs, *passkey_documents(count, min_chars, max_chars, seed)],
                  key=lambda d: d.name)


def write_passkey_documents(folder: str | os.PathLike, count: int, min_chars: int,
                            max_chars: int, seed: int = 0, prefix: str = "passkey") -> list[Path]:
    """The documents of `passkey_documents` as text files FOLDER/passkey_00000.txt ...; mixed
    with other text files in the folder they form a training corpus (`brt train data=FOLDER`)."""
    folder = Path(folder)
    docs = passkey_documents(count, min_chars, max_chars, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"{prefix}_{i:05d}.txt"
        path.write_text(doc.text)
        paths.append(path)
    return paths
