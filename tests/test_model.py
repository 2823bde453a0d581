"""model.py: the documented API, chunking invariance, resets, save/load and input checks."""

import os

import pytest
import torch
from models import VOCAB, run_chunks, tiny

from blockrecurrent import BlockRecurrentTransformer, XLMemories
from blockrecurrent.model.transformer import ModelOutput

# --- the seed API ---------------------------------------------------------------------------------

@pytest.mark.slow  # ~3 s: the README's sizes; test_the_seed_api_at_a_small_size is the same calls
def test_seed_example_shapes():
    model = BlockRecurrentTransformer(
        num_tokens=20000, dim=512, depth=6, dim_head=64, heads=8, max_seq_len=1024,
        block_width=512, num_state_vectors=512, recurrent_layers=(4,), use_compressed_mem=False,
        compressed_mem_factor=4, use_flash_attn=True)
    seq = torch.randint(0, 2000, (1, 1024))
    with torch.no_grad():
        out, mems1, states1 = model(seq)
        out, mems2, states2 = model(seq, xl_memories=mems1, states=states1)
    assert out.shape == (1, 1024, 20000)
    assert states2.shape == (1, 1, 512, 512)
    assert len(mems2.keys) == 6 and mems2.keys[0].shape == (1, 512, 8, 64)
    assert mems2.lengths.tolist() == [2048]
    assert model.layers[3].recurrent and sum(layer.recurrent for layer in model.layers) == 1


def test_the_seed_api_at_a_small_size():
    """The README's calls (keywords, three outputs, chained memories) on a model small enough
    for every test run."""
    model = BlockRecurrentTransformer(
        num_tokens=300, dim=32, depth=3, dim_head=8, heads=2, max_seq_len=32, block_width=16,
        num_state_vectors=8, recurrent_layers=(2,), use_compressed_mem=False,
        compressed_mem_factor=4, use_flash_attn=True)
    seq = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        out, mems1, states1 = model(seq)
        out, mems2, states2 = model(seq, xl_memories=mems1, states=states1)
        out3, mems3, states3 = model(seq, xl_memories=mems2, states=states2)
    assert out.shape == out3.shape == (1, 32, 300)
    assert states2.shape == (1, 1, 8, 32)
    assert len(mems2.keys) == 3 and mems2.keys[0].shape == (1, 16, 2, 8)
    assert mems2.lengths.tolist() == [64] and mems3.lengths.tolist() == [96]
    assert model.layers[1].recurrent and sum(layer.recurrent for layer in model.layers) == 1
    assert not torch.equal(out, out3)  # the carried memories and state are read


def test_the_output_unpacks_as_three_and_names_its_parts():
    model = tiny()
    seq = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        out = model(seq)
        step = model(seq[:, :1], xl_memories=out.mems, states=out.states)  # the fast step
    for o in (out, step):
        assert isinstance(o, ModelOutput) and len(o) == 3
        logits, mems, states = o
        assert logits is o.logits and mems is o.mems and states is o.states
        assert isinstance(mems, XLMemories)
    assert out.logits.shape == (2, 20, VOCAB) and step.logits.shape == (2, 1, VOCAB)


def test_outputs_are_detached_and_any_length_accepted():
    model = tiny().train()
    seq = torch.randint(0, VOCAB, (2, 3 * model.config.max_seq_len + 5))  # longer than a segment
    logits, mems, states = model(seq)
    assert logits.shape == (2, seq.shape[1], VOCAB)
    assert logits.requires_grad and not states.requires_grad
    assert not any(t.requires_grad for t in mems.keys + mems.values)
    assert mems.lengths.tolist() == [seq.shape[1]] * 2


# --- equivalences ---------------------------------------------------------------------------------

CHUNKINGS = [[1] * 150, [5] * 30, [16] * 9 + [6], [56, 94], [3, 29, 7, 100, 11], [150]]


@pytest.mark.parametrize("kw", [
    dict(), dict(use_flash_attn=False), dict(use_compressed_mem=True, compressed_mem_factor=4),
    dict(gate="lstm", variant="dual"), dict(recurrent_layers=()), dict(recurrent_layers=(1, 3)),
    dict(window="block"), dict(window="block", use_compressed_mem=True),
    dict(gate_write="normalized", window="block", use_compressed_mem=True),
], ids=["fixed-skip", "plain", "compressed", "lstm-dual", "slide", "two-recurrent", "block-window",
        "block-window-compressed", "normalized-write-block-window-compressed"])
def test_chunking_invariance(kw):
    """Feeding a stream in any chunk sizes with carried memories and states equals one call."""
    model = tiny(**kw)
    seq = torch.randint(0, VOCAB, (2, 150))
    with torch.no_grad():
        full, full_mems, full_states = model(seq)
        # float32 rounding grows with the state's spread, which the gate's write sets (about 3.8
        # with the normalized write, 0.8 with the convex one): states compare in its units.
        # Slide has no states (an empty tensor, whose std is undefined).
        unit = full_states.std().clamp(min=1.0) if full_states.numel() > 1 else 1.0
        for chunks in CHUNKINGS:
            logits, mems, states = run_chunks(model, seq, chunks)
            torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(states / unit, full_states / unit, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(mems.keys[-1], full_mems.keys[-1], atol=2e-5, rtol=1e-4)


def test_inference_mode_then_training():
    """Rotary tables and masks first built under torch.inference_mode also serve training."""
    model, n = tiny(), 20 * tiny().config.block_width
    seq = torch.randint(0, VOCAB, (1, 2 * n))
    with torch.inference_mode():
        _, mems, _ = model(seq[:, :n])  # grows the tables
        model(seq[:, n:], xl_memories=mems)
    with torch.no_grad():
        ref, _, _ = model(seq)  # the same stream in one call, after the tables exist
    model.train()
    _, mems, states = model(seq[:, :n])
    logits, _, _ = model(seq[:, n:], xl_memories=mems, states=states)
    logits.mean().backward()  # would fail on inference tensors inside the tables or masks
    torch.testing.assert_close(logits.detach(), ref[:, n:], atol=2e-5, rtol=1e-4)
    assert all(p.grad is not None for p in model.token_emb.parameters())


# --- resets ---------------------------------------------------------------------------------------

def test_reset_rows_start_fresh_and_others_continue():
    model = tiny(use_compressed_mem=True)
    W = model.config.block_width
    docs = torch.randint(0, VOCAB, (2, 3 * W))
    new = torch.randint(0, VOCAB, (2, 2 * W))
    with torch.no_grad():
        _, mems, states = model(docs)
        out, _, out_states = model(new, xl_memories=mems, states=states,
                                   reset=torch.tensor([True, False]))
        fresh, _, fresh_states = model(new[:1])  # row 0 alone, from the document start
        cont, _, cont_states = model(torch.cat([docs[1:], new[1:]], dim=1))  # row 1 continues
    torch.testing.assert_close(out[:1], fresh, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_states[:, :1], fresh_states, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1:], cont[:, 3 * W:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_states[:, 1:], cont_states, atol=2e-5, rtol=1e-4)


def test_token_by_token_after_a_reset_row():
    """Decoding one token at a time right after one row starts a new document: the steps inside
    that document's first block need its mask (the other row still reads the old cache), later
    ones take the single-token path; both equal full calls."""
    model = tiny()
    W = model.config.block_width
    docs = torch.randint(0, VOCAB, (2, 2 * W))
    new = torch.randint(0, VOCAB, (2, W + 7))  # crosses the reset row's first block boundary
    with torch.no_grad():
        _, mems, states = model(docs)
        # Row 0 starts a new document at a block boundary; row 1 goes on with its own.
        steps = [model(new[:, :1], xl_memories=mems, states=states,
                       reset=torch.tensor([True, False]))]
        for i in range(1, new.shape[1]):
            _, mems_i, states_i = steps[-1]
            steps.append(model(new[:, i:i + 1], xl_memories=mems_i, states=states_i))
        out = torch.cat([s[0] for s in steps], dim=1)
        fresh, _, _ = model(new[:1])
        cont, _, _ = model(torch.cat([docs[1:], new[1:]], dim=1))
    torch.testing.assert_close(out[:1], fresh, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1:], cont[:, 2 * W:], atol=2e-5, rtol=1e-4)


def test_reset_inside_a_block_is_refused():
    model = tiny()
    _, mems, states = model(torch.randint(0, VOCAB, (2, 5)))
    with pytest.raises(ValueError, match="block boundary"):
        model(torch.randint(0, VOCAB, (2, 5)), xl_memories=mems, states=states,
              reset=torch.tensor([True, False]))


# --- save and load --------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny(tie_embeddings=tie, use_compressed_mem=True)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "block_recurrent_hf.py", "config.json", "model.safetensors"]
    loaded = BlockRecurrentTransformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    seq = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(seq)[0], loaded(seq)[0])
    if tie:
        assert loaded.to_logits.weight is loaded.token_emb.weight


def test_saved_files_get_the_usual_mode(tmp_path):
    """Others on a shared machine can load a saved model: safetensors' private 0600 is not kept."""
    umask = os.umask(0o022)
    os.umask(umask)
    tiny().save_pretrained(tmp_path / "m")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_load_rejects_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        BlockRecurrentTransformer.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        BlockRecurrentTransformer.from_pretrained(tmp_path / "a")
    # weights of one size with the config of another
    tiny().save_pretrained(tmp_path / "b")
    tiny(dim=32).config.to_json(tmp_path / "b" / "config.json")
    with pytest.raises(ValueError, match="do not match"):
        BlockRecurrentTransformer.from_pretrained(tmp_path / "b")


# --- bad input ------------------------------------------------------------------------------------

def test_bad_inputs_are_rejected_before_any_work():
    model = tiny()
    ok = torch.randint(0, VOCAB, (2, 10))
    with pytest.raises(ValueError, match="num_tokens"):
        model(torch.full((2, 10), VOCAB))
    with pytest.raises(ValueError, match="num_tokens"):
        model(torch.full((2, 10), -1))
    with pytest.raises(TypeError, match="integer"):
        model(ok.float())
    with pytest.raises(ValueError, match="shape"):
        model(ok[0])
    with pytest.raises(ValueError, match="empty"):
        model(ok[:, :0])
    with pytest.raises(TypeError, match="Tensor"):
        model(ok.tolist())
    _, mems, states = model(ok)
    with pytest.raises(ValueError, match="states"):
        model(ok[:1], states=states)  # batch 2 states for batch 1
    with pytest.raises(ValueError, match="xl_memories"):
        model(ok[:1], xl_memories=mems)
    with pytest.raises(TypeError, match="XLMemories"):
        model(ok, xl_memories=[mems.keys])
    with pytest.raises(TypeError, match="reset"):
        model(ok, reset=torch.tensor([1, 0]))
    other = tiny(dim=32, heads=2)  # memories and states of a model of another size
    _, other_mems, other_states = other(ok)
    with pytest.raises(ValueError):
        model(ok, xl_memories=other_mems)
    with pytest.raises(ValueError, match="states"):
        model(ok, states=other_states)


def test_logits_to_keep_returns_the_last_positions_only():
    model = tiny()
    seq = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        full, mems, states = model(seq)
        last, mems2, states2 = model(seq, logits_to_keep=3)
    assert last.shape == (2, 3, VOCAB)
    torch.testing.assert_close(last, full[:, -3:])
    torch.testing.assert_close(states2, states)
    for a, b in zip(mems2.keys + mems2.values, mems.keys + mems.values, strict=True):
        assert torch.equal(a, b)  # only the logits are cut
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(seq, logits_to_keep=0)
