"""The decoding step (BlockRecurrentTransformer._step, eager and compiled) against the general
path, batched generation of prompts of different lengths, per-row continuation. Tiny CPU models
(W=16)."""

import pytest
import torch
from models import make_model, prompt

from blockrecurrent.generate.generation import GenerationResult, generate

TOL = dict(atol=1e-5, rtol=1e-5)


def steps(model, seq, start, fast):
    """Feed seq[:, start:] one token per call after a forward over seq[:, :start]."""
    model.fast_decode = fast
    out = []
    with torch.inference_mode():
        _, mems, states = model(seq[:, :start])
        for i in range(start, seq.shape[1]):
            logits, mems, states = model(seq[:, i:i + 1], xl_memories=mems, states=states)
            out.append(logits)
    model.fast_decode = True
    return torch.cat(out, dim=1), mems, states


@pytest.mark.parametrize("overrides", [
    {}, dict(window="block"), dict(use_flash_attn=False), dict(gate="lstm", variant="dual"),
    dict(recurrent_layers=(1, 2)), dict(recurrent_layers=()), dict(tie_embeddings=True),
    dict(mlp="gelu"),
], ids=["default", "block-window", "plain-attn", "lstm-dual", "two-recurrent", "no-recurrent",
        "tied", "gelu"])
def test_fast_step_equals_general_path(overrides):
    model = make_model(**overrides)
    seq = prompt(3, 70)  # from 21 tokens, 49 steps: several blocks complete on the general path
    fast, mems_f, states_f = steps(model, seq, 21, True)
    slow, mems_s, states_s = steps(model, seq, 21, False)
    torch.testing.assert_close(fast, slow, **TOL)
    torch.testing.assert_close(states_f, states_s, **TOL)
    assert mems_f.cache_len == mems_s.cache_len
    for a, b in zip(mems_f.keys + mems_f.values, mems_s.keys + mems_s.values, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.equal(mems_f.lengths, mems_s.lengths)


def test_fast_step_under_no_grad_and_training_mode_without_dropout():
    model = make_model()
    seq = prompt(2, 30)
    with torch.no_grad():
        ref, _, _ = steps(model, seq, 20, False)
        model.train()  # dropout 0: the step is the same function
        got, _, _ = steps(model, seq, 20, True)
        model.eval()
    torch.testing.assert_close(got, ref, **TOL)


def test_ragged_prompts_decode_as_one_batch():
    model = make_model()
    # W = 16: 40 and 56 tokens both leave 16 + 8 cached tokens, so the rows line up.
    a, b = prompt(1, 40, seed=2)[0], prompt(1, 56, seed=3)[0]
    together = generate(model, [a.tolist(), b], 30, do_sample=False)
    alone = [generate(model, row, 30, do_sample=False)[0] for row in (a, b)]
    assert torch.equal(together, torch.stack(alone))


def test_ragged_prompts_that_do_not_line_up_are_refused_before_any_work():
    model = make_model()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="cannot be decoded as one batch"):
            generate(model, [[1, 2, 3], [1, 2]], 5)
        with pytest.raises(ValueError, match="xl_memories"):
            _, mems, states = model(prompt(2, 5))
            calls.clear()
            generate(model, [[1, 2, 3], [1, 2]], 5, xl_memories=mems)
    finally:
        handle.remove()
    assert calls == []


def test_rows_continue_alone_and_together():
    model = make_model()
    p = prompt(3, 25)
    first = generate(model, p, 10, do_sample=False, return_state=True)
    whole = generate(model, None, 20, do_sample=False, past=first)
    row = generate(model, None, 20, do_sample=False, past=first.select(1))
    assert torch.equal(row[0], whole[1])
    again = GenerationResult.cat([first.select(2), first.select(0)])
    assert again.tokens.shape == (2, 10)
    assert torch.equal(generate(model, None, 20, do_sample=False, past=again), whole[[2, 0]])


def test_memories_of_different_cache_lengths_are_not_batched():
    model = make_model()
    _, a, _ = model(prompt(1, 20))
    _, b, _ = model(prompt(1, 21))
    with pytest.raises(ValueError, match="caches of different lengths"):
        type(a).cat([a, b])


def test_compiled_step_equals_eager_and_keeps_memories():
    """compile_decode runs the layers' own step methods in one graph (~25 s to compile here)."""
    model = make_model()
    p = prompt(2, 21)
    ref = generate(model, p, 40, do_sample=False, return_state=True)
    model.compile_decode()
    try:
        got = generate(model, p, 40, do_sample=False, return_state=True)
        # A branch from memories already extended by the compiled step: values unchanged.
        branch = generate(model, None, 5, do_sample=False, past=got)
        again = generate(model, None, 5, do_sample=False, past=got)
    finally:
        model.compile_decode(False)
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(branch, again)
    assert torch.equal(branch, generate(model, None, 5, do_sample=False, past=ref))
