"""Small models and helpers shared by the model-core tests."""

import torch

from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer

VOCAB = 257


def tiny(**kw) -> BlockRecurrentTransformer:
    cfg = dict(depth=3, recurrent_layers=(2,))
    cfg.update(kw)
    return BlockRecurrentTransformer(preset("tiny", **cfg)).eval()


def run_chunks(model, seq, chunks, **kw):
    pos, mems, states, outs = 0, None, None, []
    for c in chunks:
        logits, mems, states = model(seq[:, pos:pos + c], xl_memories=mems, states=states, **kw)
        outs.append(logits)
        pos += c
    assert pos == seq.shape[1]
    return torch.cat(outs, dim=1), mems, states


def make_model(seed=0, **overrides) -> BlockRecurrentTransformer:
    """The tiny preset with overrides, seeded, in eval mode (the decoding tests' model)."""
    torch.manual_seed(seed)
    return BlockRecurrentTransformer(preset("tiny", **overrides)).eval()


def prompt(b, n, seed=1):
    """(b, n) random byte-vocabulary token ids."""
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))
