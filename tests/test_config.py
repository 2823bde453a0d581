"""config.py: validation messages and the JSON round trip."""

import dataclasses
import json

import pytest

from blockrecurrent.model.config import BlockRecurrentConfig, preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer


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
    # ... and one saved before `state_self_attention` existed has the paper's cell (its weights).
    del old["state_self_attention"]
    assert BlockRecurrentConfig.from_dict(old).state_self_attention is True
    assert cfg.state_self_attention is False
    with pytest.raises(TypeError, match="state_self_attention must be a bool"):
        preset("tiny", state_self_attention=1)
    # ... and one saved before `gate_write` existed has the paper's convex fixed gate.
    del old["gate_write"]
    assert BlockRecurrentConfig.from_dict(old).gate_write == "convex"
    assert cfg.gate_write == "normalized"  # the default: the write that met every probe target
    with pytest.raises(ValueError, match="gate_write"):
        preset("tiny", gate_write="sqrt")


def test_config_reads_files_with_and_without_transformers_keys():
    cfg = preset("tiny")
    d = cfg.to_dict()
    hf = {"model_type": "block_recurrent", "architectures": ["BlockRecurrentForCausalLM"],
          "auto_map": {}, "transformers_version": "5.24.0", **d}
    assert BlockRecurrentConfig.from_dict(d) == BlockRecurrentConfig.from_dict(hf) == cfg
    with pytest.raises(ValueError, match="model_type='llama'"):
        BlockRecurrentConfig.from_dict({**d, "model_type": "llama"})


def test_settings_saved_before_the_mlp_field_compare_equal_to_gelu(tmp_path):
    """A checkpoint's trainer.json and a finished run's summary.json written before `mlp`
    existed: resumable / reusable with mlp="gelu", and a clear difference against GEGLU."""
    from blockrecurrent.evaluate.compare import check_reusable
    from blockrecurrent.train.checkpoint import check_model_config
    from blockrecurrent.train.settings import TrainConfig

    gelu, geglu = preset("tiny", mlp="gelu"), preset("tiny", mlp="geglu")
    old = gelu.to_dict()
    del old["mlp"]
    check_model_config(old, gelu)
    with pytest.raises(ValueError, match=r"'mlp': \('gelu', 'geglu'\)"):
        check_model_config(old, geglu)
    tc = TrainConfig(out_dir=str(tmp_path))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"model_config": old, "train_config": json.loads(json.dumps(tc.to_dict()))}))
    assert check_reusable(gelu, tc)
    named = r"other settings .*'model_config.mlp': \('gelu', 'geglu'\)"  # says which
    with pytest.raises(ValueError, match=named):
        check_reusable(geglu, dataclasses.replace(tc))


def test_gate_max_blocks_sets_the_fixed_gates_longest_timescale():
    """The chrono init spreads sigmoid(b) over 2..gate_max_blocks blocks: 1 / (1 - g) <= max."""
    import torch

    from blockrecurrent.model.cell import FixedGate

    for longest in (64.0, 1024.0):
        torch.manual_seed(0)
        model = BlockRecurrentTransformer(preset("tiny", gate_max_blocks=longest))
        gates = [m for m in model.modules() if isinstance(m, FixedGate)]
        timescales = 1 / (1 - torch.sigmoid(torch.cat([g.bias for g in gates])))
        assert timescales.min() >= 2 - 1e-4 and timescales.max() <= longest + 1e-3
        assert timescales.max() > longest / 2  # the range is used
    with pytest.raises(ValueError, match="gate_max_blocks"):
        preset("tiny", gate_max_blocks=2.0)
    assert BlockRecurrentConfig.from_dict({}).gate_max_blocks == 64.0  # older files: the default
