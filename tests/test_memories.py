"""memories.py: XLMemories behave as values, select, concatenate and round-trip."""

import torch
from models import VOCAB, tiny

from blockrecurrent.model.memories import XLMemories


def test_decoding_steps_never_change_memories_handed_out():
    """Decoding steps grow the cache in place; memories already returned keep their values, and
    continuing twice from the same memories gives the same result as from a copy."""
    model = tiny()
    seq = torch.randint(0, VOCAB, (2, 40))  # W = 16: the cache ends inside a block
    copy = lambda m: XLMemories.from_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    with torch.no_grad():
        _, mems, states = model(seq[:, :35])
        chain = [mems]
        for i in range(35, 40):  # one token at a time, each step from the last
            _, mems, states = model(seq[:, i:i + 1], xl_memories=mems, states=states)
            chain.append(mems)
        snapshots = [copy(m) for m in chain]
        a = model(seq[:, 37:38], xl_memories=chain[2], states=states)  # branch from the middle
        b = model(seq[:, 37:38], xl_memories=copy(chain[2]), states=states)
        c = model(seq[:, 38:39], xl_memories=chain[2], states=states)  # and again, another token
        d = model(seq[:, 38:39], xl_memories=copy(chain[2]), states=states)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(c[0], d[0], rtol=0, atol=0)
    for m, snap in zip(chain, snapshots, strict=True):
        for t, u in zip(m.keys + m.values, snap.keys + snap.values, strict=True):
            assert torch.equal(t, u)


def test_memories_select_and_state_dict_round_trip():
    model = tiny(use_compressed_mem=True)
    _, mems, _ = model(torch.randint(0, VOCAB, (3, 21)))
    row = mems.select(slice(1, 2))
    assert row.batch_size == 1 and row.keys[0].shape[0] == 1
    back = XLMemories.from_state_dict(mems.state_dict())
    for a, b in zip(back.keys + back.compressed_values, mems.keys + mems.compressed_values,
                    strict=True):
        assert torch.equal(a, b)
    assert torch.equal(back.lengths, mems.lengths)


def test_copies_of_memories_never_share_a_growth_buffer():
    """A decoding step's memories carry the buffers their caches grow into; every copy (select,
    to, detach, cat, a state_dict round trip) leaves them behind, so its first step copies."""
    model = tiny()
    seq = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        _, mems, states = model(seq[:, :18])
        _, mems, states = model(seq[:, 18:19], xl_memories=mems, states=states)  # fast step
        assert mems.all_valid and all(buf.last is t for buf, t in
                                      zip(mems.key_buffers, mems.keys, strict=True))
        copies = [mems.select(slice(0, 2)), mems.to("cpu"), mems.detach(), XLMemories.cat([mems]),
                  XLMemories.from_state_dict(mems.state_dict())]
        for c in copies:
            assert c.key_buffers is None and c.value_buffers is None and not c.all_valid
            _, nxt, _ = model(seq[:, 19:20], xl_memories=c, states=states)
            assert all(a.data_ptr() != b.data_ptr() for a, b in
                       zip(nxt.keys, mems.keys, strict=True))
        _, again, _ = model(seq[:, 19:20], xl_memories=mems, states=states)
        # the original still grows in place (its caches are its buffers' last views)
        assert all(a.data_ptr() == b.data_ptr() for a, b in
                   zip(again.keys, mems.keys, strict=True))
