"""train/train_data.py: the trainer's fixed evaluation set, whole validation documents in name
order taken while they fit in eval_tokens. (Building the corpora: test_trainer, test_corpus.)"""

import pytest
from helpers import corpus_of

from blockrecurrent.train.train_data import eval_subset, fixed_eval_set


def test_eval_subset_takes_whole_documents_while_they_fit():
    corpus = corpus_of([5, 1, 9, 4, 3])  # tokens per document, bos included
    sub = eval_subset(corpus, 12)
    # d0 fits (5), d1 has nothing to predict, d2 does not fit (14 > 12), d3 (9) and d4 (12) do.
    assert sub.names == ["d0", "d3", "d4"] and sub.total_tokens == 12
    assert [sub.doc(i).tolist() for i in range(3)] == [corpus.doc(i).tolist() for i in (0, 3, 4)]
    assert [sub.num_bytes(i) for i in range(3)] == [corpus.num_bytes(i) for i in (0, 3, 4)]
    assert (sub.bos_id, sub.vocab_size) == (corpus.bos_id, corpus.vocab_size)
    assert eval_subset(corpus, 1) is None


def test_fixed_eval_set():
    corpus = corpus_of([5, 9])
    assert fixed_eval_set(None, 100) is None and fixed_eval_set(corpus, 0) is None
    assert fixed_eval_set(corpus, 5).names == ["d0"]
    with pytest.raises(ValueError, match=r"eval_tokens=4 is smaller than every validation "
                                         r"document \(shortest: 5 tokens\)"):
        fixed_eval_set(corpus, 4)
