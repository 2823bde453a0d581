"""data/lanes.py: document lanes: segments, targets, padding and resets, every token once,
rank sharding equal to one process, and exact resume from the state dict."""
import json

import numpy as np
import pytest
import torch
from helpers import corpus_of

from blockrecurrent.data.lanes import DocumentLanes


def test_lanes_small_example():
    corpus = corpus_of([9, 3])  # 8 and 2 targets
    lanes = DocumentLanes(corpus, 1, 4, shuffle=False)
    batches = [lanes.next_batch() for _ in range(4)]
    assert [b["inputs"][0].tolist() for b in batches] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [0, 1001, 0, 0], [0, 1, 2, 3]]
    assert [b["targets"][0].tolist() for b in batches] == [
        [1, 2, 3, 4], [5, 6, 7, 8], [1001, 1002, 0, 0], [1, 2, 3, 4]]
    assert [b["positions"][0].tolist() for b in batches] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [0, 1, -1, -1], [0, 1, 2, 3]]
    assert [bool(b["reset"][0]) for b in batches] == [True, False, True, True]
    assert [int(b["doc_index"][0]) for b in batches] == [0, 0, 1, 0]
    assert lanes.padding_fraction == 2 / 16


def test_lanes_segments_targets_padding_resets():
    lengths = [1 + int(n) for n in np.random.default_rng(0).integers(1, 40, 24)]
    corpus = corpus_of(lengths)
    lanes = DocumentLanes(corpus, 4, 8, seed=3)
    previous = {}  # lane -> (document, where its next segment must start)
    for _ in range(60):
        b = lanes.next_batch()
        assert b["inputs"].dtype == b["targets"].dtype == torch.int64
        assert b["loss_mask"].dtype == torch.bool
        for k in range(4):
            m, i = b["loss_mask"][k], int(b["doc_index"][k])
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
            ids = torch.from_numpy(corpus.doc(i).astype(np.int64))
            p = int(b["positions"][k, 0])
            assert i % 4 == k  # each lane keeps to its own documents
            assert torch.equal(b["inputs"][k, :n], ids[p:p + n])
            assert torch.equal(b["targets"][k, :n], ids[p + 1:p + 1 + n])
            assert torch.equal(b["positions"][k, :n], torch.arange(p, p + n))
            assert (b["positions"][k, n:] == -1).all() and (b["targets"][k, n:] == 0).all()
            assert (b["inputs"][k, n:] == corpus.bos_id).all()
            assert bool(b["reset"][k]) == (p == 0)
            if k in previous:
                prev_doc, prev_end = previous[k]
                if p:  # continues the document exactly where the last segment stopped
                    assert (i, p) == (prev_doc, prev_end)
                else:  # a new document starts only after the previous one finished
                    assert prev_end == len(corpus.doc(prev_doc)) - 1
            previous[k] = (i, p + n)
            assert n == 8 or p + n == len(ids) - 1  # padding only at a document's end
    assert 0 < lanes.padding_fraction < 1


def test_lanes_cover_every_token_once_without_loop():
    # last: bos only
    lengths = [1 + int(n) for n in np.random.default_rng(1).integers(1, 30, 23)] + [1]
    corpus = corpus_of(lengths)
    lanes = DocumentLanes(corpus, 5, 7, shuffle=True, loop=False)
    got = {i: [] for i in range(len(lengths))}
    batches = 0
    for b in lanes:
        batches += 1
        for k in range(5):
            m = b["loss_mask"][k]
            if not m.any():
                assert bool(b["reset"][k]) and int(b["doc_index"][k]) == -1
                continue
            got[int(b["doc_index"][k])] += list(zip(b["positions"][k][m].tolist(),
                                                    b["targets"][k][m].tolist(), strict=True))
    assert lanes.exhausted and batches < 100
    for i in range(len(lengths)):
        assert got[i] == list(enumerate(corpus.doc(i)[1:].tolist()))
    padded = lanes.next_batch()  # after exhaustion: fully padded rows, harmless to run
    assert not padded["loss_mask"].any() and padded["reset"].all()


def test_lanes_rank_sharding_matches_single_process():
    corpus = corpus_of([1 + int(n) for n in np.random.default_rng(2).integers(1, 50, 40)])
    single = DocumentLanes(corpus, 6, 5, seed=7)
    ranks = [DocumentLanes(corpus, 3, 5, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):
        whole, parts = single.next_batch(), [lanes.next_batch() for lanes in ranks]
        for key in whole:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key


def test_lanes_state_dict_exact_resume():
    corpus = corpus_of([1 + int(n) for n in np.random.default_rng(3).integers(1, 20, 9)])
    a = DocumentLanes(corpus, 3, 4, seed=11)
    for _ in range(37):  # past the first epoch of every lane
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = DocumentLanes(corpus, 3, 4, seed=11)
    b.load_state_dict(state)
    for _ in range(30):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.padding_fraction == b.padding_fraction
    with pytest.raises(ValueError, match="batch_size"):
        DocumentLanes(corpus, 1, 4, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DocumentLanes(corpus, 3, 4, seed=12).load_state_dict(state)


def test_lanes_argument_errors():
    corpus = corpus_of([5, 6, 7])
    with pytest.raises(ValueError, match="lower batch_size or world_size"):
        DocumentLanes(corpus, 2, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        DocumentLanes(corpus, 1, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="segment_len"):
        DocumentLanes(corpus, 1, 0)
    with pytest.raises(TypeError, match="batch_size"):
        DocumentLanes(corpus, 1.5, 4)
