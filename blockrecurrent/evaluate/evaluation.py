"""Evaluation: bits per byte overall and by position in the document, and the state ablation.

    results = evaluate(model, corpus)            # every held-out document once, in full
    write_eval_report(results, "report", "eval-test")   # eval-test.json + eval-test.png

Documents are streamed through `DocumentLanes` exactly as in training, by the loop that the
trainer's own evaluation runs (train.streaming.stream_segments): each batch row reads one
document segment after segment, carrying the XL memories and recurrent states between segments,
and `reset` clears them where a row starts a new document. So the loss at position 20,000 of a
document is the loss of a model that has read the 20,000 tokens before it, which is what the
paper's long-document claim is about (Hutchins et al. 2022, section 4: "loss at late positions").
documents.py chooses the documents and lays them out on the lanes; heldout.py reads them.

Bits per byte (sum of nats / ln 2 / UTF-8 bytes of the text) compares models with different
tokenizers; bits per token is the paper's unit and the one the position buckets use.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.corpus import TokenizedCorpus
from ..data.lanes import DocumentLanes
from ..model.dtypes import DTYPE_NAMES, DTYPES, torch_dtype
from ..model.state_tune import apply_state_tune
from ..model.transformer import BlockRecurrentTransformer
from ..train.streaming import RESET_STATE, stream_segments
from .documents import chosen_parts, describe_parts, lane_plan, select_documents
from .heldout import load_heldout, training_data
from .report import write_eval_report

DEFAULT_BUCKETS = (0, 1024, 4096, 16384)
LN2 = math.log(2)


# --- argument checks ---------------------------------------------------------------------


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_buckets(buckets) -> tuple[int, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise TypeError(f"buckets must be a sequence of ints like {DEFAULT_BUCKETS}, "
                        f"got {type(buckets).__name__}")
    for b in buckets:
        _check_int("each bucket start", b, 0)
    buckets = tuple(int(b) for b in buckets)
    if not buckets or buckets[0] != 0:
        raise ValueError(f"buckets must start at 0 (the first position), got {buckets}")
    if any(a >= b for a, b in zip(buckets, buckets[1:], strict=False)):
        raise ValueError(f"bucket starts must be strictly increasing, got {buckets}")
    return buckets


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype or a name of model.dtypes ('bfloat16', 'bf16', 'float16', 'fp16',
    'float32', 'fp32')."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in {torch_dtype(d) for d in DTYPES}:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return torch_dtype(dtype)
    raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPE_NAMES} or a torch.dtype")


def bucket_label(start: int, end: int | None) -> str:
    """'[1k, 4k)' for (1024, 4096); 'inf' for an open end."""
    def k(n):
        return "inf" if n is None else f"{n // 1024}k" if n and n % 1024 == 0 else str(n)
    return f"[{k(start)}, {k(end)})"


def _check_args(model, batch_size, segment_len, buckets, dtype, max_docs, max_tokens):
    """Every check of evaluate's arguments (no work) -> (segment_len, buckets, dtype)."""
    if not isinstance(model, BlockRecurrentTransformer):
        raise TypeError(f"model must be a BlockRecurrentTransformer, got {type(model).__name__}")
    cfg = model.config
    _check_int("batch_size", batch_size, 1)
    segment_len = cfg.max_seq_len if segment_len is None else segment_len
    _check_int("segment_len", segment_len, 1)
    if segment_len % cfg.block_width:
        raise ValueError(f"segment_len={segment_len} must be a multiple of block_width="
                         f"{cfg.block_width}: a row can start a new document only on a block "
                         f"boundary")
    _check_int("max_docs", max_docs, 1, allow_none=True)
    _check_int("max_tokens", max_tokens, 1, allow_none=True)
    return segment_len, _check_buckets(buckets), resolve_dtype(dtype)


def _check_evaluate(model, corpus, reset_state: str, *args):
    """evaluate's checks, in this order: the corpus, the other arguments (_check_args, whose
    result it returns), reset_state, the corpus's vocabulary against the model's."""
    if not isinstance(corpus, TokenizedCorpus):
        raise TypeError(f"corpus must be a TokenizedCorpus (see data.tokenize_corpus), "
                        f"got {type(corpus).__name__}")
    checked = _check_args(model, *args)
    if reset_state not in RESET_STATE:
        raise ValueError(f"reset_state must be one of {RESET_STATE}, got {reset_state!r}")
    if corpus.vocab_size > model.config.num_tokens:
        raise ValueError(f"the corpus was tokenized with a vocabulary of {corpus.vocab_size} but "
                         f"the model has num_tokens={model.config.num_tokens}: tokenize it with "
                         f"the model's own tokenizer (load_tokenizer(model_dir))")
    return checked


def cheapest_batch_size(corpus: TokenizedCorpus, max_batch: int = 8, max_docs=None,
                        max_tokens=None) -> int:
    """The largest batch size up to max_batch that evaluates `corpus` within 5% of the fewest
    token positions (batch x longest lane), i.e. with little padding. Where time grows with the
    positions computed, as on a CPU, this is about the fastest (fewer, larger calls win ties);
    on a GPU a larger batch is nearly free: use max_batch there."""
    _check_int("max_batch", max_batch, 1)
    sub, _ = select_documents(corpus, max_docs, max_tokens, 1)
    lengths = sub.doc_lengths - 1
    cost = {g: g * lane_plan(lengths, g)[1] for g in range(1, min(max_batch, len(sub)) + 1)}
    return max(g for g in cost if cost[g] <= 1.05 * min(cost.values()))


# --- evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: BlockRecurrentTransformer, corpus: TokenizedCorpus, *, batch_size: int = 8,
             segment_len: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
             dtype=None, max_docs: int | None = None, max_tokens: int | None = None,
             device=None, progress: bool = True, desc: str = "eval",
             reset_state: str = "carry", select: str = "first") -> dict:
    """Loss of `model` on every document of `corpus`, each read once in full from its start.

    select: which whole documents max_docs / max_tokens keep: "first" in corpus order, or the
    "longest" first (so that every position bucket has tokens).
    reset_state: "carry" (the default, as in training) carries the recurrent states from segment
    to segment; "every-segment" starts every segment from the learned initial state while the
    block caches still carry the window across segments: the state ablation, whose difference
    from "carry" by position is the gain due to the state; "other-document" gives every row,
    at every segment, the state that the previous row's document reached (rows read different
    documents side by side): a state of the usual kind that holds nothing about this document,
    so its difference from "carry" is what the state knows, without the surprise of an initial
    state in mid-document. It needs batch_size >= 2 and at least two documents.

    segment_len: tokens per model call (default model.config.max_seq_len; a multiple of
    block_width, so documents start on block boundaries). max_docs: only the first max_docs
    documents; max_tokens: then only as many whole documents (in corpus order, at least one) as
    fit in max_tokens predicted tokens. dtype: autocast dtype (None: the model's own). device:
    where to run (default: the model's device; the model is moved there).
    batch_size is lowered to the number of documents when there are fewer.

    Returns a JSON-serialisable dict: bits_per_byte (sum of nats / ln 2 / UTF-8 bytes of the
    evaluated documents), bits_per_token, loss (nats per token), tokens, bytes, documents,
    and `buckets`: one entry per position range [start, end) of the predicting token's position
    in its document (0 = the bos), with tokens, loss, bits_per_token and bits_per_byte_approx.
    The per-bucket bits per byte are approximate: the bucket's bits per token times the
    corpus-wide tokens per byte (byte counts belong to whole documents, not to positions; exact
    for the byte tokenizer). Buckets without tokens report null (None) for their losses."""
    segment_len, buckets, dtype = _check_evaluate(model, corpus, reset_state, batch_size,
                                                  segment_len, buckets, dtype, max_docs,
                                                  max_tokens)
    cfg = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device

    sub, original = select_documents(corpus, max_docs, max_tokens, batch_size, select)
    batch_size = min(batch_size, len(sub))
    if reset_state == "other-document" and batch_size < 2:
        raise ValueError("reset_state='other-document' reads two or more documents side by side: "
                         f"got batch_size {batch_size} over {len(sub)} document(s)")
    lanes = DocumentLanes(sub, batch_size, segment_len, shuffle=False, loop=False)
    sums, seconds = _stream(model, lanes, sub, buckets, dtype, device, reset_state,
                            _progress(int((sub.doc_lengths - 1).sum()), desc, progress))
    out = _totals(sub, original, buckets, *sums)
    out.update(segment_len=segment_len, batch_size=batch_size, reset_state=reset_state,
               dtype=str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
               padding_fraction=lanes.padding_fraction, seconds=seconds,
               tokens_per_s=out["tokens"] / seconds if seconds > 0 else None,
               params=model.num_params(non_embedding=False),
               non_embedding_params=model.num_params(), model_config=cfg.to_dict())
    return out


def _stream(model, lanes: DocumentLanes, sub: TokenizedCorpus, buckets: tuple, dtype, device,
            reset_state: str, bar) -> tuple[tuple, float]:
    """Stream every document through the model once (train.streaming.stream_segments, the
    trainer's loop too) -> ((nats and tokens per bucket, nats and tokens per document),
    seconds)."""
    nb = len(buckets)
    bounds = torch.tensor(buckets[1:], dtype=torch.long)
    bucket_nats, bucket_tokens = np.zeros(nb), np.zeros(nb, np.int64)
    doc_nats, doc_tokens = np.zeros(len(sub)), np.zeros(len(sub), np.int64)
    expected = int((sub.doc_lengths - 1).sum())  # every token after each document's bos

    def add(batch: dict, logits: torch.Tensor) -> None:
        # float32 cross entropy whatever the autocast dtype: the sums run over 1e5+ tokens.
        targets = batch["targets"].to(device)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                              reduction="none").view_as(targets).double().cpu()
        mask = batch["loss_mask"]
        nats = nll[mask]
        which = torch.bucketize(batch["positions"][mask], bounds, right=True)  # bucket index
        bucket_nats[:] += torch.bincount(which, weights=nats, minlength=nb).numpy()
        bucket_tokens[:] += torch.bincount(which, minlength=nb).numpy()
        rows = batch["doc_index"][:, None].expand_as(mask)[mask]
        doc_nats[:] += torch.bincount(rows, weights=nats, minlength=len(sub)).numpy()
        doc_tokens[:] += torch.bincount(rows, minlength=len(sub)).numpy()
        bar.update(int(mask.sum()))

    model.to(device)
    start = time.perf_counter()
    try:
        stream_segments(model, lanes, add, device=device, autocast=dtype,
                        reset_state=reset_state)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    assert int(doc_tokens.sum()) == expected and (doc_tokens == sub.doc_lengths - 1).all(), \
        "every token of every document must be predicted exactly once"
    return (bucket_nats, bucket_tokens, doc_nats, doc_tokens), seconds


def _totals(sub: TokenizedCorpus, original, buckets: tuple, bucket_nats, bucket_tokens,
            doc_nats, doc_tokens) -> dict:
    """evaluate's losses: overall, by position bucket and by document."""
    nb = len(buckets)
    tokens, total_bytes = int(bucket_tokens.sum()), sub.total_bytes
    nats = float(bucket_nats.sum())
    tokens_per_byte = tokens / total_bytes if total_bytes else float("nan")
    out_buckets = []
    for i, lo in enumerate(buckets):
        hi = buckets[i + 1] if i + 1 < nb else None
        n, bucket = int(bucket_tokens[i]), float(bucket_nats[i])
        bpt = bucket / n / LN2 if n else None
        out_buckets.append({"start": lo, "end": hi, "label": bucket_label(lo, hi), "tokens": n,
                            "loss": bucket / n if n else None, "bits_per_token": bpt,
                            "bits_per_byte_approx": bpt * tokens_per_byte if n else None})
    per_doc = [{"index": int(original[j]), "name": sub.names[j], "tokens": int(doc_tokens[j]),
                "bytes": sub.num_bytes(j),
                "bits_per_byte": float(doc_nats[j]) / LN2 / sub.num_bytes(j)
                if sub.num_bytes(j) else None}
               for j in np.argsort(original, kind="stable")]
    return {
        "bits_per_byte": nats / LN2 / total_bytes if total_bytes else None,
        "bits_per_token": nats / tokens / LN2,
        "loss": nats / tokens,
        "tokens": tokens,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / tokens,
        "documents": len(sub),
        "buckets": out_buckets,
        "per_document": per_doc,
    }


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, leave=False)


def state_ablation(model: BlockRecurrentTransformer, corpus: TokenizedCorpus, *,
                   carry: dict | None = None, **kwargs) -> dict:
    """The same model evaluated with the state carried and with it reset at every segment
    (`evaluate` keywords otherwise; `carry`: the carried evaluation if already made with the
    same keywords), and the gain due to the state by position bucket:
    {"carry": ..., "reset": ..., "gain": [{"label", "tokens", "carry", "reset",
    "gain_bits", "gain_percent"}]} where gain = reset - carry bits per token (> 0: the state
    helps)."""
    if carry is None:
        carry = evaluate(model, corpus, reset_state="carry", desc="eval, state carried",
                         **kwargs)
    reset = evaluate(model, corpus, reset_state="every-segment", desc="eval, state reset",
                     **kwargs)
    gain = []
    for c, r in zip(carry["buckets"] + [dict(carry, label="all")],
                    reset["buckets"] + [dict(reset, label="all")], strict=True):
        ok = c["bits_per_token"] is not None
        gain.append({"label": c["label"], "tokens": c["tokens"], "carry": c["bits_per_token"],
                     "reset": r["bits_per_token"],
                     "gain_bits": r["bits_per_token"] - c["bits_per_token"] if ok else None,
                     "gain_percent": 100 * (r["bits_per_token"] / c["bits_per_token"] - 1)
                     if ok else None})
    return {"carry": carry, "reset": reset, "gain": gain}


def evaluate_checkpoint(model_dir: str | os.PathLike, *, data=None, split: str = "test",
                        text_field: str | None = None, val_fraction: float = 0.05,
                        test_fraction: float = 0.05, cache_dir="data_cache",
                        batch_size: int = 8, segment_len: int | None = None,
                        buckets: Sequence[int] = DEFAULT_BUCKETS, dtype=None,
                        max_docs: int | None = None, max_tokens: int | None = None,
                        device: str = "cpu", out_dir=None, name: str | None = None,
                        progress: bool = True, reset_state: str = "carry", log=None,
                        state_tune=None) -> dict:
    """Load a saved model directory (config.json, model.safetensors, tokenizer files), evaluate
    it on the held-out `split` of `data` (the other arguments as in `evaluate`) and, with
    out_dir, write <name>.json and <name>.png there (name default 'eval-<split>').
    data/text_field None: those of the training run (training_data), else "stdlib"/"text".
    log: called with a line before reading the documents and one with their size before the
    (long) evaluation, e.g. print to stderr; None: silent. state_tune: a state tuning file
    (model/state_tune.py) applied to the model first.
    Returns evaluate's results plus "model_dir", "data", "split" and "report" (the paths)."""
    from ..data.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"checkpoint directory {str(model_dir)!r} does not exist; pass a model "
                         f"directory such as runs/small/model (config.json + model.safetensors)")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test' (held-out documents), got {split!r}")
    recorded = training_data(model_dir) or ("stdlib", "text")
    data = recorded[0] if data is None else data
    text_field = recorded[1] if text_field is None else text_field
    model = BlockRecurrentTransformer.from_pretrained(model_dir, map_location=device)
    if state_tune is not None:
        apply_state_tune(model, state_tune)
    _check_args(model, batch_size, segment_len, buckets, dtype, max_docs, max_tokens)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > model.config.num_tokens:
        raise ValueError(f"the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the "
                         f"model num_tokens={model.config.num_tokens}: are they from one run?")
    log = log or (lambda line: None)
    log(f"reading the {split} split of {os.fspath(data)!r}")
    corpus = load_heldout(data, tokenizer, split, text_field=text_field, val_fraction=val_fraction,
                          test_fraction=test_fraction, cache_dir=cache_dir)
    log(_eval_size(corpus, split, data, max_docs, max_tokens))
    results = evaluate(model, corpus, batch_size=batch_size, segment_len=segment_len,
                       buckets=buckets, dtype=dtype, max_docs=max_docs, max_tokens=max_tokens,
                       device=device, progress=progress, desc=f"eval {split}",
                       reset_state=reset_state)
    results.update(model_dir=str(model_dir), data=os.fspath(data), split=split)
    if out_dir is not None:
        results["report"] = write_eval_report(results, out_dir, name or f"eval-{split}")
    return results


def _eval_size(corpus: TokenizedCorpus, split: str, data, max_docs, max_tokens) -> str:
    """One line: how much of the split will be evaluated, and the caps that make it less."""
    parts = chosen_parts(corpus, max_docs, max_tokens)
    tokens = sum(int(corpus.doc_lengths[i] if n is None else n) - 1 for i, n in parts)
    nbytes = sum(corpus.num_bytes(i) if n is None else corpus.prefix_bytes(i, n)
                 for i, n in parts)
    size = f"{tokens:,} tokens, {nbytes:,} bytes"
    if describe_parts(corpus, parts):
        size += " (prefixes: no whole document fits in --max-tokens)"
    docs = len(parts)
    if docs < len(corpus):
        caps = " and ".join(f"{name} {v}" for name, v in (("--max-docs", max_docs),
                                                          ("--max-tokens", max_tokens)) if v)
        return (f"evaluating {docs} of the {len(corpus)} documents of the {split} split of "
                f"{os.fspath(data)!r} ({caps}): {size}")
    return (f"evaluating all {docs} document{'s' * (docs != 1)} of the {split} split of "
            f"{os.fspath(data)!r}: {size}; --max-tokens N or --max-docs N evaluate fewer")


def auto_batch_size(corpus: TokenizedCorpus, device: str, max_tokens=None) -> int:
    """8 lanes on a GPU; on a CPU, where time follows the positions computed (padding
    included), the batch size with the least padding (cheapest_batch_size)."""
    if torch.device(device).type != "cpu":
        return 8
    return cheapest_batch_size(corpus, 8, max_tokens=max_tokens)
