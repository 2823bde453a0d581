"""The decoding benchmark (bench_decode): bytes a step reads and the speed rows."""
import pytest

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.bench import decode as B


def tiny(**kw):
    # Two blocks per segment so that the recurrent state advances inside a segment.
    return preset("tiny", dim=32, heads=2, dim_head=16, max_seq_len=32, block_width=16,
                  num_state_vectors=8, **kw)


# ------------------------------------------------------------------------------- decoding


def test_decode_bytes_and_speed_rows():
    cfg = tiny()
    model = BlockRecurrentTransformer(cfg).eval()
    nb = B.decode_bytes(model, batch=2, cache_len=20)
    # Every weight of the step but the embedding table (one row is read) and the state side.
    skip = ("token_emb", "state_proj", "state_out", "state_norm", "state_ids", "initial_state",
            "gate")
    want = sum(p.numel() * 4 for n, p in model.named_parameters() if not any(s in n for s in skip))
    assert nb["weights"] == want
    read = min(21, cfg.block_width)  # the sliding window reads at most W cached keys
    per_row = 4 * (2 * cfg.depth * read * cfg.inner_dim
                   + 2 * len(cfg.recurrent_layers) * cfg.num_state_vectors * cfg.inner_dim)
    assert nb["cache_per_row"] == per_row and nb["total"] == want + 2 * per_row
    rows = B.decode_speed(model, batches=(1, 2), prompt_len=5, new_tokens=3, repeats=1)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["fast"]["tokens_per_s"] > 0 and r["legacy"]["tokens_per_s"] > 0
        assert r["weights_read_s"] > 0 and r["fast_over_legacy"] > 0
    assert "| 2 |" in B.format_decode(rows)
    assert model.fast_decode and model._compiled_decode is None  # left as found
    with pytest.raises(ValueError, match="unknown decode paths"):
        B.decode_speed(model, batches=(1,), paths=("turbo",))
