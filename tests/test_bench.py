import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent import bench as B


def tiny(**kw):
    # Two blocks per segment so that the recurrent state advances inside a segment.
    return preset("tiny", dim=32, heads=2, dim_head=16, max_seq_len=32, block_width=16,
                  num_state_vectors=8, **kw)


# ------------------------------------------------------------------------------- FLOP counter


def test_flops_hand_count_plain_layer():
    # E=4, one head of width 2, W=2, MLP 8, vocabulary 10; per token:
    # qkv 2*4*6=48, attention 4*(2W=4)*2=32, out 2*2*4=16, MLP 4*4*8=128, logits 2*4*10=80.
    cfg = B.BlockRecurrentConfig(num_tokens=10, dim=4, depth=1, heads=1, dim_head=2,
                                 block_width=2, max_seq_len=2, num_state_vectors=1,
                                 recurrent_layers=(), mlp_mult=2.0)
    assert B.flops_per_token(cfg) == 48 + 32 + 16 + 128 + 80
    assert B.flops_per_token(cfg, training=True) == 3 * 304


def test_flops_hand_count_recurrent_layer():
    # Same sizes, the one layer recurrent with S=1. Token side: projections 2*4*8=64,
    # window attention 32, cross-attention to S=1 state keys 4*1*2=8, output 2*4*4=32, MLP 128.
    # State side per block: projections 64, S x S 8, S x 2W 32, output 32 = 136, over W=2 tokens.
    cfg = B.BlockRecurrentConfig(num_tokens=10, dim=4, depth=1, heads=1, dim_head=2,
                                 block_width=2, max_seq_len=2, num_state_vectors=1,
                                 recurrent_layers=(1,), mlp_mult=2.0)
    assert B.flops_per_token(cfg) == 64 + 32 + 8 + 32 + 128 + 136 / 2 + 80
    # A partial block does not advance the state: 3 tokens = 3 token-side counts + 1 state step.
    assert B.count_flops(cfg, 3) == 3 * (64 + 32 + 8 + 32 + 128 + 80) + 136


@pytest.mark.parametrize("kw", [{}, dict(recurrent_layers=()), dict(gate="lstm", variant="dual")])
def test_flops_linear_in_length(kw):
    cfg = tiny(**kw)
    per_token = [B.count_flops(cfg, n) / n for n in (16, 64, 1024, 65536)]
    assert per_token == pytest.approx([B.flops_per_token(cfg)] * 4, rel=1e-12)
    assert B.count_flops(cfg, 64, training=True) == 3 * B.count_flops(cfg, 64)


@pytest.mark.parametrize("kw", [{}, dict(recurrent_layers=()), dict(gate="lstm", variant="dual")])
def test_flops_match_torch_flop_counter(kw):
    # The plain attention path runs every matmul the analytic count assumes, no more: torch's
    # own counter must agree exactly on a steady-state segment (memories carried in).
    cfg = tiny(use_flash_attn=False, **kw)
    model = BlockRecurrentTransformer(cfg).eval()
    x = torch.randint(0, cfg.num_tokens, (2, 32))
    with torch.no_grad():
        _, mems, states = model(x)
        with FlopCounterMode(display=False) as counter:
            model(x, xl_memories=mems, states=states)
    assert counter.get_total_flops() == 2 * B.count_flops(cfg, 32)


# ------------------------------------------------------------------------------- benchmark


def test_baseline_configs():
    cfg = tiny()
    models = B.baseline_configs(cfg)
    assert list(models) == ["rec", "slide", "xl"]
    assert models["slide"].recurrent_layers == () and models["slide"].max_seq_len == 32
    assert models["xl"].recurrent_layers == () and models["xl"].max_seq_len == 16
    assert list(B.baseline_configs(cfg, baselines=False)) == ["rec"]
    assert list(B.baseline_configs(tiny(recurrent_layers=()), baselines=False)) == ["slide"]


def test_run_benchmark_structure(tmp_path):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    res = B.run_benchmark(tiny(), batch_size=2, lengths=(16, 32), dtypes=("fp32", "bf16"),
                          repeats=1, out_json=out_json, out_md=out_md, verbose=False)
    assert json.loads(out_json.read_text())["summary"] == res["summary"]
    md = out_md.read_text()
    assert "| train | fp32 | rec | 2 x 32 |" in md and "step time / Slide" in md

    assert set(res["peak_flops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in res["peak_flops"].values())
    assert set(res["models"]) == {"rec", "slide", "xl"}
    assert res["models"]["rec"]["flops_per_token"]["train"] > \
        res["models"]["slide"]["flops_per_token"]["train"] > 0
    rows = res["results"]
    assert len(rows) == 3 * 2 * 2 * 2  # models x modes x dtypes x lengths
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["segment_ms_median"] > 0
        assert r["mfu"] > 0 and r["model_tflops_per_s"] > 0 and r["cpu_share"] >= 0
        assert r["tokens_per_cpu_s"] > 0
        assert len(r["tokens_per_s_runs"]) == 1
        if res["meta"]["memory_method"] != "unavailable":
            assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0
    assert {r["segment"] for r in rows if r["model"] == "xl"} == {16}
    assert len(res["summary"]) == 3 * 2 * 2
    for s in res["summary"]:
        assert (s["smallest"], s["largest"]) == (16, 32) and s["throughput_ratio"] > 0
        assert (s["step_time_vs_slide"] is None) == (s["model"] == "slide")
    assert len(res["step_time_vs_slide"]) == 2 * 2 * 2 * 2  # (rec, xl) x modes x dtypes x lengths


def test_run_benchmark_rejects_bad_options():
    with pytest.raises(ValueError, match="dtypes"):
        B.run_benchmark(tiny(), dtypes=("fp16",), verbose=False)
    with pytest.raises(ValueError, match="modes"):
        B.run_benchmark(tiny(), modes=("eval",), verbose=False)
    with pytest.raises(ValueError, match="lengths"):
        B.run_benchmark(tiny(), lengths=(0,), verbose=False)


def test_command_line(tmp_path, capsys):
    cfg_path = tmp_path / "config.json"
    tiny(recurrent_layers=()).to_json(cfg_path)
    assert B.cli(["--config", str(cfg_path), "--lengths", "16", "--modes", "infer",
                  "--no-baselines", "--repeats", "1", "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    # "auto" dtypes: bf16 too where this CPU has native bf16 kernels (AVX512-BF16 / AMX)
    dtypes = ["fp32", "bf16"] if B.bf16_is_fast(torch.device("cpu")) else ["fp32"]
    assert [(r["model"], r["mode"], r["length"], r["dtype"]) for r in res["results"]] == \
        [("slide", "infer", 16, d) for d in dtypes]
    assert "| infer | fp32 | slide | 1 x 16 |" in capsys.readouterr().out
    assert B.cli(["--preset", "tiny", "depth=3", "recurrent_layers=[2]", "--lengths", "16",
                  "--modes", "infer", "--no-baselines", "--repeats", "1",
                  "--json", str(tmp_path / "o.json")]) == 0
    cfg = json.loads((tmp_path / "o.json").read_text())["config"]
    assert (cfg["depth"], cfg["recurrent_layers"], cfg["dim"]) == (3, [2], 64)  # tiny, overridden
    capsys.readouterr()
    for bad, message in ((["--reference", "--lengths", "4096"], "--reference fixes"),
                         (["--preset", "tiny", "dept=3"], "unknown model setting 'dept'"),
                         (["--config", str(cfg_path), "depth=3"], "apply to a --preset")):
        with pytest.raises(SystemExit) as exit:
            B.cli(bad)
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_short_streams_are_timed_several_times_a_pass():
    assert [B.streams_per_pass(n, seg) for n, seg in
            ((1024, 512), (4096, 512), (65536, 512), (2048, 1024), (1000, 512), (16, 16))] == \
        [4, 1, 1, 4, 4, 8]


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
