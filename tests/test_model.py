import json
import math

import pytest
import torch
import torch.nn.functional as F

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer, XLMemories, preset
from blockrecurrent.attention import Rotary

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


# --- the seed API ------------------------------------------------------------------------------

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


def test_outputs_are_detached_and_any_length_accepted():
    model = tiny().train()
    seq = torch.randint(0, VOCAB, (2, 3 * model.config.max_seq_len + 5))  # longer than a segment
    logits, mems, states = model(seq)
    assert logits.requires_grad and not states.requires_grad
    assert not any(t.requires_grad for t in mems.keys + mems.values)


# --- equivalences ------------------------------------------------------------------------------

CHUNKINGS = [[1] * 150, [5] * 30, [16] * 9 + [6], [56, 94], [3, 29, 7, 100, 11], [150]]


@pytest.mark.parametrize("kw", [
    dict(), dict(use_flash_attn=False), dict(use_compressed_mem=True, compressed_mem_factor=4),
    dict(gate="lstm", variant="dual"), dict(recurrent_layers=()), dict(recurrent_layers=(1, 3)),
    dict(window="block"), dict(window="block", use_compressed_mem=True),
], ids=["fixed-skip", "plain", "compressed", "lstm-dual", "slide", "two-recurrent", "block-window",
        "block-window-compressed"])
def test_chunking_invariance(kw):
    """Feeding a stream in any chunk sizes with carried memories and states equals one call."""
    model = tiny(**kw)
    seq = torch.randint(0, VOCAB, (2, 150))
    with torch.no_grad():
        full, full_mems, full_states = model(seq)
        for chunks in CHUNKINGS:
            logits, mems, states = run_chunks(model, seq, chunks)
            torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(states, full_states, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(mems.keys[-1], full_mems.keys[-1], atol=2e-5, rtol=1e-4)


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
    for m, snap in zip(chain, snapshots):
        for t, u in zip(m.keys + m.values, snap.keys + snap.values):
            assert torch.equal(t, u)


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


@pytest.mark.parametrize("kw", [dict(), dict(use_compressed_mem=True), dict(gate="lstm")])
def test_flash_and_plain_paths_agree(kw):
    fused = tiny(use_flash_attn=True, **kw)
    plain = tiny(use_flash_attn=False, **kw)
    plain.load_state_dict(fused.state_dict())
    seq = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        a, _, sa = fused(seq)
        b, _, sb = plain(seq)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", ["sliding", "block"])
def test_window_attention_matches_a_dense_reference(window):
    """One ordinary layer equals dense attention with absolute rotary and the mask i-W < j <= i
    (sliding) or (i // W - 1) * W <= j <= i (block: the previous block and its own so far)."""
    model = tiny(depth=1, recurrent_layers=(), use_flash_attn=False, window=window)
    cfg, layer = model.config, model.layers[0]
    W, h, d = cfg.block_width, cfg.heads, cfg.dim_head
    seq = torch.randint(0, VOCAB, (2, 75))
    n = seq.shape[1]
    with torch.no_grad():
        logits, _, _ = model(seq)
        x = model.token_emb(seq)
        q, k, v = layer.attn.qkv(layer.attn_norm(x)).view(2, n, 3, h, d).unbind(2)
        rot = Rotary(d, n, cfg.rotary_base)  # absolute positions 0..n-1
        q, k = rot(q, 0), rot(k, 0)
        i = torch.arange(n)
        first = i - W + 1 if window == "sliding" else (i // W - 1) * W
        mask = (i[None, :] <= i[:, None]) & (i[None, :] >= first[:, None])
        att = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * d ** -0.5)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(2, n, h * d)
        x = x + layer.attn.out(y)
        x = x + layer.mlp(layer.mlp_norm(x))
        ref = model.to_logits(model.norm(x))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)


def test_causal():
    model = tiny(use_compressed_mem=True)
    seq = torch.randint(0, VOCAB, (1, 120))
    t = 61
    other = seq.clone()
    other[:, t:] = torch.randint(0, VOCAB, (1, 120 - t))
    with torch.no_grad():
        a, _, _ = model(seq)
        b, _, _ = model(other)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


# --- state and resets --------------------------------------------------------------------------

def test_information_passes_through_the_state_beyond_the_window():
    """Changing block 0 changes logits many windows later only when there is recurrence."""
    for recurrent, expect_change in (((2,), True), ((), False)):
        model = tiny(recurrent_layers=recurrent)
        W, depth = model.config.block_width, model.config.depth
        seq = torch.randint(0, VOCAB, (1, 10 * W))
        other = seq.clone()
        other[:, :W] = torch.randint(0, VOCAB, (1, W))
        far = (depth + 2) * W  # beyond the receptive field of depth windows
        with torch.no_grad():
            a = run_chunks(model, seq, [2 * W] * 5)[0]
            b = run_chunks(model, other, [2 * W] * 5)[0]
        changed = (a[:, far:] - b[:, far:]).abs().max().item()
        assert (changed > 1e-4) == expect_change, (recurrent, changed)


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


def test_gradients_reach_the_state_parameters():
    for gate, variant in (("fixed", "skip"), ("lstm", "dual")):
        model = tiny(gate=gate, variant=variant).train()
        seq = torch.randint(0, VOCAB, (2, 4 * model.config.block_width))
        logits, _, _ = model(seq)
        F.cross_entropy(logits.flatten(0, 1), seq.flatten()).backward()
        cell = model.recurrent_cells[0]
        names = ["initial_state", "state_ids", "state_proj.weight", "state_out.weight", "scales"]
        names += ["gate.bias"] if gate == "fixed" else ["gate.proj.weight", "mlp_gate.proj.weight",
                                                        "state_mlp.0.weight"]
        params = dict(cell.named_parameters())
        for name in names:
            g = params[name].grad
            assert g is not None and g.abs().sum() > 0, (gate, name)


def test_gradient_flows_through_the_state_across_blocks():
    """Within one call, a loss on the last block reaches the tokens of the first block."""
    model = tiny().train()
    W = model.config.block_width
    seq = torch.randint(0, VOCAB, (1, 8 * W))
    emb = model.token_emb.weight
    logits, _, _ = model(seq)
    logits[:, -1].sum().backward()
    first = seq[0, :W].unique()
    late = seq[0, 4 * W:].unique()
    only_first = first[~torch.isin(first, late)]
    assert len(only_first) and emb.grad[only_first].abs().sum() > 0


# --- configuration, save and load --------------------------------------------------------------

def test_config_validation_messages():
    with pytest.raises(ValueError, match="max_seq_len"):
        BlockRecurrentConfig(max_seq_len=100, block_width=64)
    with pytest.raises(ValueError, match="recurrent_layers"):
        BlockRecurrentConfig(depth=4, recurrent_layers=(5,))
    with pytest.raises(ValueError, match="recurrent_layers"):
        BlockRecurrentConfig(depth=4, recurrent_layers=(0,))
    with pytest.raises(ValueError, match="gate"):
        BlockRecurrentConfig(gate="gru")
    with pytest.raises(ValueError, match="variant"):
        BlockRecurrentConfig(variant="single")
    with pytest.raises(ValueError, match="mlp"):
        BlockRecurrentConfig(mlp="swiglu")
    with pytest.raises(TypeError, match="dim"):
        BlockRecurrentConfig(dim=64.0)
    with pytest.raises(ValueError, match="compressed_mem_factor"):
        BlockRecurrentConfig(block_width=30, max_seq_len=60, use_compressed_mem=True,
                             compressed_mem_factor=4)
    with pytest.raises(ValueError, match="unknown config keys"):
        BlockRecurrentConfig.from_dict({"dim": 64, "bogus": 1})
    with pytest.raises(TypeError):
        BlockRecurrentTransformer(BlockRecurrentConfig(), dim=3)


def test_config_json_round_trip(tmp_path):
    cfg = preset("small", gate="lstm", recurrent_layers=(2, 3))
    cfg.to_json(tmp_path / "c.json")
    assert BlockRecurrentConfig.from_json(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["recurrent_layers"] == [2, 3]
    assert BlockRecurrentConfig(depth=12).recurrent_layers == (10,)  # the paper's placement
    # A config saved before the `mlp` field existed describes a GELU MLP.
    old = json.loads((tmp_path / "c.json").read_text())
    del old["mlp"]
    assert BlockRecurrentConfig.from_dict(old).mlp == "gelu"


def test_config_reads_files_with_and_without_transformers_keys():
    cfg = preset("tiny")
    d = cfg.to_dict()
    hf = {"model_type": "block_recurrent", "architectures": ["BlockRecurrentForCausalLM"],
          "auto_map": {}, "transformers_version": "5.24.0", **d}
    assert BlockRecurrentConfig.from_dict(d) == BlockRecurrentConfig.from_dict(hf) == cfg
    with pytest.raises(ValueError, match="model_type='llama'"):
        BlockRecurrentConfig.from_dict({**d, "model_type": "llama"})


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


# --- bad input ---------------------------------------------------------------------------------

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


def test_memories_select_and_state_dict_round_trip():
    model = tiny(use_compressed_mem=True)
    _, mems, _ = model(torch.randint(0, VOCAB, (3, 21)))
    row = mems.select(slice(1, 2))
    assert row.batch_size == 1 and row.keys[0].shape[0] == 1
    back = XLMemories.from_state_dict(mems.state_dict())
    for a, b in zip(back.keys + back.compressed_values, mems.keys + mems.compressed_values):
        assert torch.equal(a, b)
    assert torch.equal(back.lengths, mems.lengths)


def test_logits_to_keep_returns_the_last_positions_only():
    model = tiny()
    seq = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        full, mems, states = model(seq)
        last, mems2, states2 = model(seq, logits_to_keep=3)
    torch.testing.assert_close(last, full[:, -3:])
    torch.testing.assert_close(states2, states)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(seq, logits_to_keep=0)
