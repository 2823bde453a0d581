"""evaluate/evaluation.py: bits-per-byte bookkeeping, every token counted once, buckets, the
carried-state equivalence with one full forward per document, the state ablation. Tiny CPU models
(W=16). (The reports: test_eval_report.)"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import eval_model, mixed_length_corpus

from blockrecurrent.data.corpus import Document, tokenize_corpus
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.evaluate.documents import chosen_parts, describe_parts, lane_plan
from blockrecurrent.evaluate.evaluation import bucket_label, cheapest_batch_size, evaluate
from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer

LN2 = math.log(2)
BUCKETS = (0, 16, 64, 128)


@pytest.fixture(scope="module")
def model():
    return eval_model()


@pytest.fixture(scope="module")
def corpus():
    return mixed_length_corpus()


def full_forward_nll(model, corpus) -> list[torch.Tensor]:
    """Per-token nats of each document from one forward over the whole document, no carry."""
    out = []
    with torch.no_grad():
        for i in range(len(corpus)):
            ids = torch.from_numpy(corpus.doc(i).astype(np.int64))[None]
            logits, _, _ = model(ids[:, :-1])
            out.append(F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="none"))
    return out


def test_bits_per_byte_is_nats_over_ln2_over_bytes(model, corpus):
    res = evaluate(model, corpus, batch_size=3, buckets=BUCKETS, progress=False)
    nats = res["loss"] * res["tokens"]
    # Byte tokenizer: one token per UTF-8 byte (more than the 846 characters), plus each bos.
    assert res["bytes"] == corpus.total_bytes == corpus.total_tokens - len(corpus) > 846
    assert res["bits_per_byte"] == pytest.approx(nats / LN2 / res["bytes"], rel=1e-12)
    assert res["bits_per_token"] == pytest.approx(res["loss"] / LN2, rel=1e-12)
    assert res["bytes_per_token"] == pytest.approx(res["bytes"] / res["tokens"])
    # The byte tokenizer: one token per byte, so the bucket approximation is exact.
    for b in res["buckets"]:
        assert b["bits_per_byte_approx"] == pytest.approx(b["bits_per_token"])


def test_every_token_counted_once_and_buckets_sum(model, corpus):
    res = evaluate(model, corpus, batch_size=3, buckets=BUCKETS, progress=False)
    lengths = corpus.doc_lengths - 1  # everything after each bos is predicted
    assert res["tokens"] == lengths.sum() and res["documents"] == len(corpus)
    assert [d["tokens"] for d in res["per_document"]] == lengths.tolist()
    assert [d["name"] for d in res["per_document"]] == corpus.names
    assert sum(b["tokens"] for b in res["buckets"]) == res["tokens"]
    bucket_nats = sum(b["loss"] * b["tokens"] for b in res["buckets"])
    assert bucket_nats == pytest.approx(res["loss"] * res["tokens"], rel=1e-10)
    # Positions are those of the predicting token: 0 is the bos.
    want = [int(sum(min(max(n - lo, 0), hi - lo) for n in lengths))
            for lo, hi in zip(BUCKETS, BUCKETS[1:] + (10**9,), strict=True)]
    assert [b["tokens"] for b in res["buckets"]] == want
    labels = [b["label"] for b in res["buckets"]]
    assert labels == ["[0, 16)", "[16, 64)", "[64, 128)", "[128, inf)"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_carried_segments_equal_one_full_forward(model, corpus, batch_size):
    """Documents up to 300 tokens read in segments of 32 with memories and states carried (and
    rows reset mid-stream) give the losses of one uncarried forward over each whole document."""
    ref = full_forward_nll(model, corpus)
    res = evaluate(model, corpus, batch_size=batch_size, buckets=BUCKETS, progress=False)
    for doc, nll in zip(res["per_document"], ref, strict=True):
        assert doc["bits_per_byte"] == pytest.approx(
            float(nll.sum()) / LN2 / doc["bytes"], rel=1e-5, abs=1e-6)
    every = torch.cat(ref)
    pos = torch.cat([torch.arange(len(n)) for n in ref])
    for b in res["buckets"]:
        hi = b["end"] if b["end"] is not None else 10**9
        sel = every[(pos >= b["start"]) & (pos < hi)]
        assert b["tokens"] == len(sel)
        assert b["loss"] == pytest.approx(float(sel.mean()), rel=1e-5)
    assert res["loss"] == pytest.approx(float(every.mean()), rel=1e-5)


def test_segment_length_does_not_change_the_result(model, corpus):
    a = evaluate(model, corpus, batch_size=2, segment_len=16, progress=False)
    b = evaluate(model, corpus, batch_size=4, segment_len=64, progress=False)
    assert a["tokens"] == b["tokens"]
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-5)


def test_empty_buckets_are_null_and_default_buckets(model, corpus):
    res = evaluate(model, corpus, batch_size=2, progress=False)  # (0, 1k, 4k, 16k): one filled
    assert [b["tokens"] for b in res["buckets"]] == [res["tokens"], 0, 0, 0]
    for b in res["buckets"][1:]:
        assert b["loss"] is b["bits_per_token"] is b["bits_per_byte_approx"] is None
    json.dumps(res)  # JSON-serialisable, nulls included


def test_max_docs_and_max_tokens(model, corpus):
    res = evaluate(model, corpus, max_docs=3, progress=False)
    assert [d["index"] for d in res["per_document"]] == [0, 1, 2] and res["batch_size"] == 3
    n0, n1, n2 = (corpus.doc_lengths[:3] - 1).tolist()
    res = evaluate(model, corpus, max_tokens=n0 + n1 + n2 - 1, progress=False)  # whole documents
    assert [d["index"] for d in res["per_document"]] == [0, 1] and res["tokens"] == n0 + n1
    res = evaluate(model, corpus, max_tokens=5, progress=False)  # at least one document
    assert res["documents"] == 1


def test_max_tokens_below_every_document_scores_prefixes(model, corpus):
    """No whole document fits: the first max_tokens tokens of the first document are scored,
    named as a prefix, with the bytes they hold (the byte tokenizer: one per token); the
    losses are those of the full document's first positions (causal)."""
    res = evaluate(model, corpus, max_tokens=40, buckets=BUCKETS, progress=False)
    assert res["documents"] == 1 and res["tokens"] == 40 and res["bytes"] == 40
    assert res["per_document"][0]["name"] == "doc0[:41]"
    nll = full_forward_nll(model, corpus)[0][:40]
    assert res["loss"] * 40 == pytest.approx(float(nll.sum()), rel=1e-4)
    assert res["bits_per_byte"] == pytest.approx(float(nll.sum()) / LN2 / 40, rel=1e-4)
    line = describe_parts(corpus, chosen_parts(corpus, None, 40))
    assert line == ("no whole document fits in max_tokens: scoring the first 40 tokens (after "
                    "the bos) of 1 document (prefixes, 40 bytes; bits per byte over those bytes)")
    assert describe_parts(corpus, chosen_parts(corpus, None, int(corpus.doc_lengths[0]))) is None


def test_bfloat16_autocast_is_close(model, corpus):
    ref = evaluate(model, corpus, max_docs=2, progress=False)
    res = evaluate(model, corpus, max_docs=2, dtype="bfloat16", progress=False)
    assert res["dtype"] == "bfloat16"
    assert res["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], abs=0.05)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(segment_len=24), ValueError, "multiple of block_width"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=2.0), TypeError, "batch_size must be an int"),
    (dict(buckets=(16, 64)), ValueError, "must start at 0"),
    (dict(buckets=(0, 64, 64)), ValueError, "strictly increasing"),
    (dict(buckets="0,1k"), TypeError, "buckets must be a sequence"),
    (dict(dtype="float8"), ValueError, "unknown dtype"),
    (dict(max_docs=0), ValueError, "max_docs must be >= 1"),
])
def test_bad_arguments_raise_before_work(model, corpus, kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate(model, corpus, progress=False, **kwargs)


def test_bad_model_corpus_and_vocabulary(model, corpus):
    with pytest.raises(TypeError, match="model must be a BlockRecurrentTransformer"):
        evaluate("model", corpus)
    with pytest.raises(TypeError, match="corpus must be a TokenizedCorpus"):
        evaluate(model, [[1, 2, 3]])
    small = BlockRecurrentTransformer(preset("tiny", num_tokens=100))
    with pytest.raises(ValueError, match="num_tokens=100"):
        evaluate(small, corpus)


def test_restores_training_mode(corpus):
    torch.manual_seed(0)
    m = BlockRecurrentTransformer(preset("tiny", dropout=0.5)).train()
    a = evaluate(m, corpus, max_docs=2, progress=False)
    b = evaluate(m, corpus, max_docs=2, progress=False)
    assert m.training and a["loss"] == b["loss"]  # dropout off during evaluation


def test_bucket_label():
    assert bucket_label(0, 1024) == "[0, 1k)" and bucket_label(16384, None) == "[16k, inf)"
    assert bucket_label(100, 200) == "[100, 200)"


def test_lane_plan_balances_and_covers_every_document():
    lengths = [52_000, 8_800, 22_800, 8_600, 28_900, 2_000, 24_000, 5_000, 34_500]
    for lanes in range(1, 10):
        order, longest = lane_plan(lengths, lanes)
        assert sorted(order.tolist()) == list(range(len(lengths)))
        per_lane = [sum(lengths[i] for i in order[k::lanes]) for k in range(lanes)]
        assert longest == max(per_lane) and longest < max(lengths) + sum(lengths) / lanes
    # 9 documents on 4 lanes: each lane takes >= 2, so the best is 52k + the 2k one.
    assert lane_plan(lengths, 4)[1] == 54_000
    assert lane_plan(lengths, 1)[1] == sum(lengths)


def test_cheapest_batch_size(corpus):
    # Documents of 300+ tokens among short ones: a few lanes keep padding low.
    g = cheapest_batch_size(corpus, max_batch=8)
    # The largest batch whose positions (batch x longest lane) are within 5% of the fewest.
    lengths = corpus.doc_lengths - 1
    cost = {b: b * lane_plan(lengths, b)[1] for b in range(1, min(8, len(corpus)) + 1)}
    assert cost[g] <= 1.05 * min(cost.values())
    assert all(cost[b] > 1.05 * min(cost.values()) for b in cost if b > g)
    assert cheapest_batch_size(corpus, max_batch=1) == 1


def test_state_ablation_resets_only_the_state(model, corpus):
    """Resetting the state at every segment changes the losses of documents longer than one
    segment (their first segment is unchanged), and nothing for a model without state."""
    from blockrecurrent.evaluate.evaluation import state_ablation
    from blockrecurrent.evaluate.report import ablation_table

    ab = state_ablation(model, corpus, batch_size=2, buckets=BUCKETS, progress=False)
    carry, reset = ab["carry"], ab["reset"]
    assert reset["reset_state"] == "every-segment" and carry["reset_state"] == "carry"
    assert carry["tokens"] == reset["tokens"]
    first = [b for b in carry["buckets"] if b["end"] is not None and b["end"] <= 32]
    for b, r in zip(first, reset["buckets"], strict=False):  # positions in the first segment
        assert b["loss"] == pytest.approx(r["loss"], rel=1e-6)
    assert carry["loss"] != pytest.approx(reset["loss"], rel=1e-6)
    gain = {g["label"]: g for g in ab["gain"]}
    assert gain["all"]["gain_bits"] == pytest.approx(
        reset["bits_per_token"] - carry["bits_per_token"])
    assert "state reset" in ablation_table(ab)

    torch.manual_seed(0)
    slide = BlockRecurrentTransformer(preset("tiny", max_seq_len=32, recurrent_layers=())).eval()
    ab = state_ablation(slide, corpus, batch_size=2, buckets=BUCKETS, progress=False)
    assert ab["carry"]["loss"] == ab["reset"]["loss"]
    with pytest.raises(ValueError, match="reset_state"):
        evaluate(model, corpus, reset_state="never", progress=False)


def test_other_document_state_carries_nothing_of_this_document(model):
    """"other-document" hands each row the state its neighbour row reached: with two copies of
    one document side by side the states are the same, so it equals "carry"; with two different
    documents it changes the loss after the first segment, not within it."""
    rng = np.random.default_rng(1)
    text = "".join(rng.choice(list("abcdefgh \n"), 200))
    other = "".join(rng.choice(list("abcdefgh \n"), 200))
    twins = tokenize_corpus([Document("a", text), Document("b", text)], ByteTokenizer())
    pair = tokenize_corpus([Document("a", text), Document("c", other)], ByteTokenizer())
    kw = dict(batch_size=2, buckets=BUCKETS, progress=False)
    carry = evaluate(model, twins, **kw)
    assert evaluate(model, twins, reset_state="other-document", **kw)["loss"] == pytest.approx(
        carry["loss"], rel=1e-6)
    carry, swap = (evaluate(model, pair, reset_state=r, **kw) for r in ("carry", "other-document"))
    assert swap["reset_state"] == "other-document"
    assert carry["buckets"][0]["loss"] == pytest.approx(swap["buckets"][0]["loss"], rel=1e-6)
    assert carry["loss"] != pytest.approx(swap["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="two or more documents"):
        evaluate(model, pair, reset_state="other-document", batch_size=1, progress=False)


def test_select_longest_documents_first(model, corpus):
    """With max_tokens, select="longest" keeps the longest whole documents (late positions
    filled), "first" the first ones in corpus order."""
    text = corpus.doc_lengths - 1  # tokens to predict per document: doc0 longest, doc5 next
    budget = int(text[0] + text[1])
    assert text[5] > text[1]
    first = evaluate(model, corpus, max_tokens=budget, buckets=BUCKETS, progress=False)
    longest = evaluate(model, corpus, max_tokens=int(text[0] + text[5]), buckets=BUCKETS,
                       progress=False, select="longest")
    names = lambda res: sorted(d["name"] for d in res["per_document"])
    assert names(first) == ["doc0", "doc1"]
    assert names(longest) == ["doc0", "doc5"]
    assert longest["buckets"][-1]["tokens"] == text[0] + text[5] - 2 * 128
    with pytest.raises(ValueError, match="select"):
        evaluate(model, corpus, select="random", progress=False)
