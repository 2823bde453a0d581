"""generate/generation.py: cached decoding equals a full forward, chunked prefill, sampling, eos,
continuing, streaming, input checks. Tiny CPU models (W=16, max_seq_len=64). (Sampling's
filters: test_sampling; text in and out: test_text.)"""

import pytest
import torch
from models import make_model, prompt

from blockrecurrent.generate.generation import GenerationResult, generate, prefill, stream

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model():
    return make_model()


class Calls:
    """Records the length of every model call and the last-position logits it produced."""

    def __init__(self, model):
        self.lengths, self.logits = [], []
        self.handles = [model.register_forward_pre_hook(self._pre),
                        model.to_logits.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self.lengths.append(args[0].shape[1])

    def _post(self, module, args, out):
        self.logits.append(out[:, -1].float())

    def remove(self):
        for h in self.handles:
            h.remove()


# --- cached decoding == one full forward ---------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},
    dict(use_flash_attn=False),
    dict(gate="lstm", variant="dual"),
    dict(use_compressed_mem=True),
    dict(recurrent_layers=(1, 2)),
    dict(window="block"),
], ids=["default", "plain-attn", "lstm-dual", "compressed", "two-recurrent", "block-window"])
def test_decoding_logits_equal_full_forward(overrides):
    model = make_model(**overrides)
    p = prompt(2, 21)
    calls = Calls(model)
    new = generate(model, p, 60, do_sample=False)  # 81 tokens: 5 blocks, past max_seq_len
    calls.remove()
    assert new.shape == (2, 60)
    assert calls.lengths == [21] + [1] * 59  # one prefill call, then one token per call
    full, _, _ = model(torch.cat([p, new], dim=1))
    expected = full[:, 20:-1]  # logits that predicted each new token
    got = torch.stack(calls.logits, dim=1)
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(expected.argmax(-1), new)


def test_prefill_long_prompt_equals_full_forward(model):
    p = prompt(2, 200)
    calls = Calls(model)
    logits, mems, states = prefill(model, p)
    calls.remove()
    assert calls.lengths == [64, 64, 64, 8]  # chunks of max_seq_len: memory independent of n
    full, _, full_states = model(p)
    torch.testing.assert_close(logits, full[:, -1], **TOL)
    torch.testing.assert_close(states, full_states, **TOL)
    assert mems.cache_len < 2 * model.config.block_width


def test_prefill_finishes_a_partial_block_first(model):
    p = prompt(1, 150)
    _, mems, states = model(p[:, :10])  # the cache ends 10 tokens into a block
    calls = Calls(model)
    logits, _, _ = prefill(model, p[:, 10:], mems, states)
    calls.remove()
    assert calls.lengths == [6, 64, 64, 6]  # then whole blocks
    torch.testing.assert_close(logits, model(p)[0][:, -1], **TOL)


# --- sampling ------------------------------------------------------------------------------


def test_sampling_limits_equal_greedy(model):
    p = prompt(2, 30)
    greedy = generate(model, p, 40, do_sample=False)
    assert torch.equal(generate(model, p, 40, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, p, 40, top_p=1e-6, seed=0), greedy)
    assert torch.equal(generate(model, p, 40, temperature=0, seed=0), greedy)  # 0 means greedy
    assert torch.equal(model.generate(p, 40, do_sample=False), greedy)  # the model's method


def test_seeded_sampling_is_reproducible(model):
    p = prompt(2, 30)
    a = generate(model, p, 40, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert torch.equal(a, generate(model, p, 40, temperature=1.5, top_k=50, top_p=0.95, seed=7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(a, generate(model, p, 40, temperature=1.5, top_k=50, top_p=0.95,
                                   generator=g))
    assert not torch.equal(a, generate(model, p, 40, temperature=1.5, seed=8))


# --- eos, continuing, streaming ------------------------------------------------------------


def test_eos_stops_each_row_and_pads(model):
    p = prompt(2, 30)
    greedy = generate(model, p, 30, do_sample=False)
    eos = int(greedy[0, 4])
    first = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None
             for row in greedy]
    out = generate(model, p, 30, do_sample=False, eos_token_id=eos)
    ends = [30 if f is None else f + 1 for f in first]
    assert out.shape == (2, max(ends))  # stops once every row is done
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == eos).all()
    # A single row stops right after its eos.
    one = generate(model, p[:1], 30, do_sample=False, eos_token_id=eos)
    assert one.shape == (1, first[0] + 1) and int(one[0, -1]) == eos


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(seed=3, top_k=20)])
def test_continuing_from_returned_state(model, sampling):
    p = prompt(2, 25)
    whole = generate(model, p, 50, **sampling)
    first = generate(model, p, 17, return_state=True, **sampling)
    assert isinstance(first, GenerationResult) and first.tokens.shape == (2, 17)
    assert first.xl_memories.lengths.tolist() == [25 + 17] * 2  # read every returned token
    rest = generate(model, None, 33, past=first, **{k: v for k, v in sampling.items()
                                                    if k != "seed"})
    assert torch.equal(torch.cat([first.tokens, rest], dim=1), whole)


def test_continuing_with_new_prompt_and_zero_tokens(model):
    p, q = prompt(1, 40), prompt(1, 9, seed=2)
    first = generate(model, p, 0, return_state=True)  # prefill only
    assert first.tokens.shape == (1, 0)
    torch.testing.assert_close(first.logits, model(p)[0][:, -1], **TOL)
    second = generate(model, p[:, :1], 12, do_sample=False, return_state=True,
                      xl_memories=first.xl_memories, states=first.states)  # carried memories
    then = generate(model, q, 10, do_sample=False, past=second)
    context = torch.cat([p, p[:, :1], second.tokens, q], dim=1)
    assert torch.equal(then, generate(model, context, 10, do_sample=False))


def test_stream_matches_generate(model):
    p = prompt(1, 30)
    toks = list(stream(model, p[0], 25, seed=4, temperature=0.9))
    assert all(isinstance(t, int) for t in toks)
    assert toks == generate(model, p, 25, seed=4, temperature=0.9)[0].tolist()
    p2 = prompt(2, 30)
    rows = list(stream(model, p2, 12, do_sample=False))
    assert torch.equal(torch.stack(rows, dim=1), generate(model, p2, 12, do_sample=False))


def test_modes_are_restored(model):
    model.train()
    generate(model, prompt(1, 5), 3)
    assert model.training
    it = stream(model, prompt(1, 5), 3)
    for _ in it:
        assert not torch.is_inference_mode_enabled()  # never leaked to the caller between tokens
        assert not model.training
    assert model.training
    model.eval()


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.zeros(1, 0, dtype=torch.long), 5), {}, ValueError, "empty"),
    (([], 5), {}, ValueError, "empty"),
    ((torch.tensor([[1, 300]]), 5), {}, ValueError, r"\[0, num_tokens=257\)"),
    ((torch.tensor([[-1, 3]]), 5), {}, ValueError, r"\[0, num_tokens=257\)"),
    ((torch.tensor([[1.0, 2.0]]), 5), {}, TypeError, "integer"),
    (("hello", 5), {}, TypeError, "prompt"),
    ((torch.zeros(1, 2, 3, dtype=torch.long), 5), {}, ValueError, "shape"),
    ((None, 5), {}, ValueError, "past"),
    (([1, 2], -1), {}, ValueError, "max_new_tokens"),
    (([1, 2], 2.5), {}, TypeError, "max_new_tokens"),
    (([1, 2], 5), dict(top_p=0.0), ValueError, "top_p"),
    (([1, 2], 5), dict(top_p=1.5), ValueError, "top_p"),
    (([1, 2], 5), dict(top_k=0), ValueError, "top_k"),
    (([1, 2], 5), dict(top_k=2.0), TypeError, "top_k"),
    (([1, 2], 5), dict(temperature=-0.5), ValueError, "temperature"),
    (([1, 2], 5), dict(temperature=float("nan")), ValueError, "temperature"),
    (([1, 2], 5), dict(do_sample="yes"), TypeError, "do_sample"),
    (([1, 2], 5), dict(eos_token_id=257), ValueError, "eos_token_id"),
    (([1, 2], 5), dict(seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
    (([1, 2], 5), dict(generator=3), TypeError, "generator"),
    (([1, 2], 5), dict(past="x"), TypeError, "past"),
])
def test_bad_input_fails_before_any_work(model, args, kwargs, exc, match):
    calls = Calls(model)
    try:
        with pytest.raises(exc, match=match):
            generate(model, *args, **kwargs)
        with pytest.raises(exc, match=match):
            stream(model, *args, **kwargs)  # checked at the call, not at the first next()
    finally:
        calls.remove()
    assert calls.lengths == []


def test_carried_state_must_match_batch(model):
    _, mems, states = model(prompt(2, 20))
    calls = Calls(model)
    with pytest.raises(ValueError, match=r"xl_memories hold 2 rows.*batch size 3"):
        generate(model, prompt(3, 5), 4, xl_memories=mems)
    with pytest.raises(ValueError, match=r"states of shape \(1, 2, 16, 64\).*batch size 3"):
        generate(model, prompt(3, 5), 4, states=states)
    with pytest.raises(ValueError, match="past or xl_memories"):
        generate(model, prompt(2, 5), 4, xl_memories=mems,
                 past=generate(model, prompt(2, 5), 1, return_state=True))
    with pytest.raises(TypeError, match="model must be"):
        generate("model", prompt(1, 5), 4)
    calls.remove()
    assert calls.lengths == [5, 1]  # only the calls that built `past` (prefill, read last token)


# --- text ------------------------------------------------------------------------------------
