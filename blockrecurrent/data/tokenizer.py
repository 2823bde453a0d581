"""Tokenizers: bytes (`ByteTokenizer`), byte-level BPE trained on the corpus (`BPETokenizer`,
`train_bpe`) and any Hugging Face tokenizer.json (`HFTokenizer`); each saves itself with the files
transformers needs, and `load_tokenizer` restores any of them. Every document starts with the
document-start token (bos), `DOC_TOKEN` for ours.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..files import write_atomic, write_json

DOC_TOKEN = "<|doc|>"  # document-start token prepended to every document
_CONFIG = "tokenizer_config.json"
_BOS_CANDIDATES = (DOC_TOKEN, "<s>", "<|endoftext|>", "<bos>")


def _id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors, 0-d ones included
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


class _ByteStream:
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids) -> str:  # an incomplete multi-byte character waits for its remaining bytes
        return self._dec.decode(bytes(i for i in _id_list(ids) if 0 <= i < 256))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _RedecodeStream:
    """Decodes all ids so far on each feed and emits the new suffix, holding back a trailing U+FFFD
    (a character whose bytes are split over tokens) until more ids arrive or flush()."""

    def __init__(self, tokenizer):
        self._tok, self._ids, self._emitted = tokenizer, [], 0

    def feed(self, ids, final: bool = False) -> str:
        self._ids += _id_list(ids)
        text = self._tok.decode(self._ids)
        text = text if final else text.rstrip("\ufffd")
        new, self._emitted = text[self._emitted:], max(self._emitted, len(text))
        return new

    def flush(self) -> str:
        return self.feed([], final=True)


def _hf_files(directory: Path, bos_token: str, bos_id: int) -> None:
    """What transformers needs to load the tokenizer saved here (AutoTokenizer,
    pipeline): tokenizer_config.json keys for PreTrainedTokenizerFast, merged into ours, and
    generate's bos/eos/pad ids. The document-start token is all three: a model ends a document
    by starting the next, and the padding of our batches is bos. add_bos_token is off, as in
    `encode`; a caller starting a document prepends bos (lm-eval's rolling loglikelihood does)."""
    config = json.loads((directory / _CONFIG).read_text("utf-8"))
    write_json(directory / _CONFIG, {**config, "tokenizer_class": "PreTrainedTokenizerFast",
                                     "bos_token": bos_token, "eos_token": bos_token,
                                     "pad_token": bos_token, "add_bos_token": False,
                                     "split_special_tokens": True})
    write_json(directory / "generation_config.json",
               {"bos_token_id": bos_id, "eos_token_id": bos_id, "pad_token_id": bos_id})


def _byte_level_chars() -> list[str]:
    """The printable character standing for each byte in byte-level BPE (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def byte_tokenizer_json() -> dict:
    """ByteTokenizer as a Hugging Face tokenizer.json (written without the tokenizers package):
    byte-level pre-tokenization, one vocabulary entry per byte (id = byte value), no merges,
    and <|doc|> = 256 as a special token."""
    char = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": ByteTokenizer.bos_id, "content": DOC_TOKEN, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "pre_tokenizer": char, "post_processor": None, "decoder": char,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: i for i, c in enumerate(_byte_level_chars())}, "merges": []},
    }


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 is the document-start token."""
    kind, vocab_size, bos_id, fingerprint = "byte", 257, 256, "byte-v1"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """encode as a uint8 array, at memory speed (no Python loop over the bytes)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def byte_lengths(self) -> np.ndarray:
        return np.array([1] * 256 + [0], np.int64)

    def decode(self, ids) -> str:
        return bytes(i for i in _id_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _ByteStream:
        return _ByteStream()

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer_config.json, and the same tokenizer as tokenizer.json for transformers."""
        write_json(Path(directory) / _CONFIG, {"kind": self.kind})
        write_json(Path(directory) / "tokenizer.json", byte_tokenizer_json())
        _hf_files(Path(directory), DOC_TOKEN, self.bos_id)


class ByteCounter:
    """ids -> the UTF-8 bytes of their text, exact at any cut (bits per byte of a document
    prefix); from a tokenizer's byte_lengths table."""

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table, np.int64)

    def __call__(self, ids) -> int:
        return int(self.table[np.asarray(ids, np.int64)].sum())


def byte_counter(tokenizer) -> ByteCounter | None:
    """The tokenizer's ByteCounter; None where its tokens have no fixed bytes."""
    table = getattr(tokenizer, "byte_lengths", lambda: None)()
    return None if table is None else ByteCounter(table)


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("BPE and Hugging Face tokenizers need the `tokenizers` package: "
                          "pip install blockrecurrent[bpe]") from None
    return tokenizers


class HFTokenizer:
    """Wraps a `tokenizers.Tokenizer`, e.g. from a local Hugging Face tokenizer.json."""
    kind = "hf"

    def __init__(self, tokenizer, bos_token: str | None = None):
        tokenizer.no_truncation()  # a corpus document must never be cut or padded
        tokenizer.no_padding()
        if hasattr(tokenizer, "encode_special_tokens"):
            # text is data: a literal "<|doc|>" in it is not bos
            tokenizer.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        bos_token = bos_token or next((t for t in _BOS_CANDIDATES if t in vocab), None)
        if bos_token not in vocab:
            raise ValueError(f"the tokenizer has no document-start token (looked for "
                             f"{bos_token or _BOS_CANDIDATES}); add {DOC_TOKEN!r} as a special "
                             "token or use tokenizer 'bpe' or 'byte'")
        self._tok, self.bos_token, self.bos_id = tokenizer, bos_token, vocab[bos_token]
        self.vocab_size = max(vocab.values()) + 1
        # unchanged by save/load
        canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True)
        self.fingerprint = hashlib.sha1(canonical.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:  # parallel in Rust
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def byte_lengths(self) -> np.ndarray | None:
        """UTF-8 bytes of each token id's text (special tokens: 0) where every token stands for
        fixed bytes (a byte-level tokenizer, as ours); None otherwise."""
        spec = json.loads(self._tok.to_str())
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            return None
        alphabet = set(_byte_level_chars())
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        table = np.zeros(self.vocab_size, np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i not in special:
                if not set(token) <= alphabet:
                    return None
                table[i] = len(token)
        return table

    def decode(self, ids) -> str:
        return self._tok.decode(_id_list(ids), skip_special_tokens=True)

    def stream_decoder(self) -> _RedecodeStream:
        return _RedecodeStream(self)

    def save(self, directory: str | os.PathLike) -> None:
        text = self._tok.to_str().encode("utf-8")
        write_atomic(Path(directory) / "tokenizer.json", lambda f: f.write(text))
        write_json(Path(directory) / _CONFIG, {"kind": self.kind, "bos_token": self.bos_token})
        _hf_files(Path(directory), self.bos_token, self.bos_id)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained on the corpus (`train_bpe`); bos is <|doc|>."""
    kind = "bpe"


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Byte-level, so any text round-trips exactly. A tiny corpus may yield fewer merges than
    asked."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"BPE vocab_size must be an int >= 257 (256 bytes + {DOC_TOKEN}), got "
                         f"{vocab_size!r}")
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[DOC_TOKEN], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    return BPETokenizer(tok, DOC_TOKEN)


def load_tokenizer(directory: str | os.PathLike):
    """Restore a tokenizer saved with `.save()`, or load a plain Hugging Face tokenizer.json
    directory."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"tokenizer directory {str(d)!r} does not exist")
    config = None
    if (d / _CONFIG).is_file():
        try:  # a JSONDecodeError from json itself would be a traceback (errors.is_expected)
            config = json.loads((d / _CONFIG).read_text("utf-8"))
        except (UnicodeError, json.JSONDecodeError) as err:
            config = err
        if not isinstance(config, dict):
            raise ValueError(f"{d / _CONFIG} is not a tokenizer configuration (a JSON object): "
                             f"{config}; save the tokenizer again")
    if config is None and not (d / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer in {str(d)!r}: expected {_CONFIG} (saved by this library) "
                         "or tokenizer.json")
    kind = config.get("kind") if config else "hf"
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("bpe", "hf"):
        raise ValueError(f"{d / _CONFIG} names unknown tokenizer kind {kind!r}; expected 'byte', "
                         "'bpe' or 'hf'")
    cls = BPETokenizer if kind == "bpe" else HFTokenizer
    tok = _import_tokenizers().Tokenizer.from_file(str(d / "tokenizer.json"))
    return cls(tok, (config or {}).get("bos_token"))
