import argparse
import json

import pytest
import torch

from blockrecurrent import preset
from blockrecurrent.bench import command as C
from blockrecurrent.bench import run as B
from blockrecurrent.bench.machine import bf16_is_fast
from blockrecurrent.train.settings import baseline_configs


def tiny(**kw):
    # Two blocks per segment so that the recurrent state advances inside a segment.
    return preset("tiny", dim=32, heads=2, dim_head=16, max_seq_len=32, block_width=16,
                  num_state_vectors=8, **kw)


# ------------------------------------------------------------------------------- benchmark


def test_bench_models():
    cfg = tiny()
    models = B.bench_models(cfg)
    assert list(models) == ["recurrent", "slide", "xl"]
    assert models["slide"].recurrent_layers == () and models["slide"].max_seq_len == 32
    assert models["xl"].recurrent_layers == () and models["xl"].max_seq_len == 16
    # One definition of the baselines, the one `brt compare` trains: XL as deep as Slide:(N+1)L.
    assert models == {k: v for k, v in baseline_configs(cfg).items() if k != "slide+1"}
    assert models["slide"].depth == cfg.depth and models["xl"].depth == cfg.depth + 1
    assert list(B.bench_models(cfg, baselines=False)) == ["recurrent"]
    assert list(B.bench_models(tiny(recurrent_layers=()), baselines=False)) == ["slide"]
    assert B.bench_models(tiny(recurrent_layers=()))["xl"].depth == cfg.depth


def test_run_benchmark_structure(tmp_path):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    res = B.run_benchmark(tiny(), batch_size=2, lengths=(16, 32), dtypes=("fp32", "bf16"),
                          repeats=1, out_json=out_json, out_md=out_md, verbose=False)
    assert json.loads(out_json.read_text())["summary"] == res["summary"]
    md = out_md.read_text()
    assert "| train | fp32 | recurrent | 2 x 32 |" in md and "step time / Slide" in md

    # Input takes the short aliases; results name dtypes canonically, tables label them short.
    assert set(res["peak_flops"]) == {"float32", "bfloat16"}
    assert {r["dtype"] for r in res["results"]} == {"float32", "bfloat16"}
    assert "| infer | bf16 | xl | 2 x 16 |" in md
    assert all(v > 0 for v in res["peak_flops"].values())
    assert set(res["models"]) == {"recurrent", "slide", "xl"}
    assert res["models"]["recurrent"]["flops_per_token"]["train"] > \
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
    for bad in (("fp16",), ("float16",), ("float8",), ()):
        with pytest.raises(ValueError, match="dtypes"):
            B.run_benchmark(tiny(), dtypes=bad, verbose=False)
    with pytest.raises(ValueError, match="modes"):
        B.run_benchmark(tiny(), modes=("eval",), verbose=False)
    with pytest.raises(ValueError, match="lengths"):
        B.run_benchmark(tiny(), lengths=(0,), verbose=False)


def test_command_line(tmp_path, capsys):
    cfg_path = tmp_path / "config.json"
    tiny(recurrent_layers=()).to_json(cfg_path)
    assert C.cli(["--config", str(cfg_path), "--lengths", "16", "--modes", "infer",
                  "--no-baselines", "--repeats", "1", "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    # "auto" dtypes: bf16 too where this CPU has native bf16 kernels (AVX512-BF16 / AMX)
    dtypes = ["float32", "bfloat16"] if bf16_is_fast(torch.device("cpu")) else ["float32"]
    assert [(r["model"], r["mode"], r["length"], r["dtype"]) for r in res["results"]] == \
        [("slide", "infer", 16, d) for d in dtypes]
    assert "| infer | fp32 | slide | 1 x 16 |" in capsys.readouterr().out
    assert C.cli(["--preset", "tiny", "depth=3", "recurrent_layers=[2]", "--lengths", "16",
                  "--modes", "infer", "--no-baselines", "--repeats", "1",
                  "--json", str(tmp_path / "o.json")]) == 0
    cfg = json.loads((tmp_path / "o.json").read_text())["config"]
    assert (cfg["depth"], cfg["recurrent_layers"], cfg["dim"]) == (3, [2], 64)  # tiny, overridden
    capsys.readouterr()
    for bad, message in ((["--reference", "--lengths", "4096"], "--reference fixes"),
                         (["--preset", "tiny", "dept=3"], "unknown model setting 'dept'"),
                         (["--config", str(cfg_path), "depth=3"], "apply to a --preset"),
                         (["--dtypes", "fp16"], "invalid choice: 'fp16'")):
        with pytest.raises(SystemExit) as exit:
            C.cli(bad)
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_dtypes_option_takes_canonical_names_and_aliases():
    parse = C.add_arguments(argparse.ArgumentParser()).parse_args
    assert parse(["--dtypes", "fp32", "bf16"]).dtypes == ["fp32", "bf16"]
    assert parse(["--dtypes", "float32", "bfloat16"]).dtypes == ["float32", "bfloat16"]
    assert B._resolve_dtypes(["fp32", "bfloat16", "float32"], torch.device("cpu")) == \
        (("float32", "bfloat16"), None)


def test_short_streams_are_timed_several_times_a_pass():
    assert [B.streams_per_pass(n, seg) for n, seg in
            ((1024, 512), (4096, 512), (65536, 512), (2048, 1024), (1000, 512), (16, 16))] == \
        [4, 1, 1, 4, 4, 8]
