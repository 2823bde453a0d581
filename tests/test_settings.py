"""train/settings.py: config files (TOML, YAML) and key=value overrides, impossible settings
refused with a message, the baselines' model configs."""
import pytest

from blockrecurrent.model.config import BlockRecurrentConfig
from blockrecurrent.train.settings import (
    TrainConfig,
    apply_baseline,
    load_train_config,
    resolve_model_config,
)


def test_config_file_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\ndepth = 3\nrecurrent_layers = [2]\n\n'
                    '[train]\nbatch_size = 2\nlr = 3e-4\nbetas = [0.8, 0.9]\n')
    mc, tc = load_train_config(toml, overrides=["model.dim=32", "max_steps=700", "tokenizer=bpe",
                                                "betas=[0.9, 0.99]", "out_dir=runs/a b",
                                                "compile=true"])
    assert (mc.dim, mc.depth, mc.recurrent_layers, mc.max_seq_len) == (32, 3, (2,), 64)
    assert (tc.batch_size, tc.lr, tc.max_steps, tc.tokenizer) == (2, 3e-4, 700, "bpe")
    assert tc.betas == (0.9, 0.99) and tc.out_dir == "runs/a b" and tc.compile is True
    # The preset argument beats the file's preset; a model.preset override beats both.
    assert load_train_config(toml, preset="small")[0].max_seq_len == 512
    assert load_train_config(toml, "small", ["model.preset=tiny"])[0].max_seq_len == 64
    assert load_train_config()[0].dim == 256  # default: the small preset

    yaml = tmp_path / "run.yaml"
    yaml.write_text("model:\n  preset: tiny\ntrain:\n  lr: 3e-4\n  betas: [0.8, 0.9]\n")
    mc, tc = load_train_config(yaml)  # YAML reads 3e-4 as a string; it becomes a float
    assert mc.dim == 64 and tc.lr == 3e-4 and tc.betas == (0.8, 0.9)

    bad = tmp_path / "bad.toml"
    for text, match in [("[train]\nbogus = 1\n",
                         r"unknown train setting 'bogus'.*valid train settings.*batch_size"),
                        ("[model]\nwidth = 1\n", r"unknown model setting 'width'.*dim"),
                        ("[optim]\nlr = 1\n", r"unknown section.*optim"),
                        ("[train\n", "not valid TOML")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_train_config(bad)
    with pytest.raises(ValueError, match=r"unknown model setting 'bogus' \(command line\)"):
        load_train_config(overrides=["model.bogus=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_train_config(overrides=["max_steps"])
    with pytest.raises(ValueError, match="prefix"):
        load_train_config(overrides=["optim.lr=1"])
    with pytest.raises(ValueError, match="does not exist"):
        load_train_config(tmp_path / "missing.toml")
    (tmp_path / "run.ini").write_text("")
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml"):
        load_train_config(tmp_path / "run.ini")


@pytest.mark.parametrize("overrides, error, match", [
    (["batch_size=0"], ValueError, "batch_size=0"),
    (["lr=-1"], ValueError, "lr=-1.0"),
    (["warmup_steps=20", "max_steps=10"], ValueError, "warmup_steps=20.*max_steps=10"),
    (["min_lr=1", "lr=0.1"], ValueError, "min_lr"),
    (["dtype=float8"], ValueError, "dtype"),
    (["baseline=rnn"], ValueError, "baseline"),
    (["betas=[0.9]"], ValueError, "betas"),
    (["tokenizer=/no/such/dir"], ValueError, "tokenizer"),
    (["batch_size=two"], TypeError, "batch_size must be int"),
    (["compile=1"], TypeError, "compile must be bool"),
    (["parallel=zero"], ValueError, "parallel.*ddp.*fsdp"),
    (["activation_checkpointing=yes"], TypeError, "activation_checkpointing must be bool"),
    (["model.max_seq_len=50"], ValueError, "max_seq_len=50.*multiple of block_width"),
])
def test_impossible_settings(overrides, error, match):
    with pytest.raises(error, match=match):
        load_train_config(None, "tiny", overrides)


def test_baselines():
    mc = load_train_config(None, "tiny")[0]
    slide = apply_baseline(mc, "slide")
    xl = apply_baseline(mc, "xl")
    assert slide.recurrent_layers == () and slide.max_seq_len == mc.max_seq_len
    assert xl.recurrent_layers == () and xl.max_seq_len == mc.block_width
    assert resolve_model_config(mc, TrainConfig(baseline="xl"), 300).num_tokens == 300


def test_one_table_of_dtype_names():
    """model.dtypes: torch's names are the canonical ones, the short aliases are accepted on input
    and read as them; the trainer takes "auto" and the canonical names it can train in."""
    import torch

    from blockrecurrent.model import dtypes
    from blockrecurrent.train import settings

    assert dtypes.DTYPES == ("float32", "bfloat16", "float16")
    assert [dtypes.dtype_name(n) for n in ("fp32", "bf16", "fp16", "bfloat16")] == \
        ["float32", "bfloat16", "float16", "bfloat16"]
    assert dtypes.torch_dtype("bf16") is torch.bfloat16 is settings.torch_dtype("bfloat16")
    assert dtypes.short_name("float32") == "fp32" and dtypes.short_name("bf16") == "bf16"
    assert dtypes.names_of(("float32", "bf16")) == ("float32", "bfloat16", "fp32", "bf16")
    for bad in ("float8", "torch.float32", None):
        with pytest.raises(ValueError, match="unknown dtype"):
            dtypes.dtype_name(bad)
    assert settings.DTYPES == ("auto", "float32", "bfloat16")
    assert TrainConfig(dtype="bfloat16").dtype == "bfloat16"
    for bad in ("bf16", "float16"):  # stored settings keep one spelling; no fp16 grad scaler
        with pytest.raises(ValueError, match="dtype"):
            TrainConfig(dtype=bad)


def test_every_setting_has_a_meaning():
    """--help gives every train setting its default and meaning, from the dataclass itself (no
    source file is read)."""
    from dataclasses import fields

    from blockrecurrent.train.settings import settings_help

    help_text = settings_help()
    for f in fields(TrainConfig):
        meaning = f.metadata.get("help")
        assert isinstance(meaning, str) and meaning.strip(), f"{f.name} has no meaning"
        assert f"{f.name}={f.default!r}: {meaning}" in help_text
    assert help_text.startswith("train settings (defaults): data='stdlib': ")
    assert help_text.endswith(". model.* settings: " + ", ".join(
        f.name for f in fields(BlockRecurrentConfig)) + ".")
