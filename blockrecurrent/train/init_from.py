"""Runs that start from a saved model (the `init_from` setting: fine-tuning): which of its model
settings a run may change, the settings it takes from the saved directory, its weights, and
state tuning (`tune="state"` or `"state+ids"`: every other weight frozen, the tuned state
exported to a small file of its own).

    brt train init_from=runs/brt/model data=my_texts/ max_steps=300 lr=1e-3 out_dir=runs/tuned
    brt train init_from=runs/brt/model tune=state+ids data=my_texts/ lr=3 out_dir=runs/st
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model.config import BlockRecurrentConfig

__all__ = ["FINE_TUNABLE", "export_state_tune", "freeze_but_state", "init_model_settings",
           "initial_weights"]

# What a run started from a saved model (init_from) may change of it: no weight depends on them.
FINE_TUNABLE = ("max_seq_len", "dropout", "use_flash_attn")


def init_model_settings(preset: str | None, model_values: dict, train_values: dict) -> dict:
    """The model settings of a run with init_from: the saved model's, with those of FINE_TUNABLE
    given; its tokenizer becomes the run's (train_values["tokenizer"])."""
    directory = str(train_values["init_from"])
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise ValueError(f"init_from={directory!r} is not a saved model directory (no "
                         "config.json); name one written by brt train, e.g. runs/brt/model")
    fixed = sorted(k for k in model_values if k not in FINE_TUNABLE)
    if preset or fixed:
        given = ([f"preset {preset}"] if preset else []) + [f"model.{k}" for k in fixed]
        raise ValueError(f"init_from={directory!r} trains the saved model as it is: drop "
                         f"{', '.join(given)} (a run from a saved model may only change "
                         f"{', '.join('model.' + k for k in FINE_TUNABLE)})")
    if train_values.get("tune", "all") != "all" and model_values:
        raise ValueError(f"tune={train_values['tune']} tunes the state of the saved model as it "
                         f"is (its file is keyed to that model's settings): drop "
                         f"{', '.join('model.' + k for k in sorted(model_values))}")
    for key, own in (("tokenizer", directory), ("baseline", "recurrent")):
        if train_values.get(key, own) != own:
            raise ValueError(f"init_from={directory!r} uses the saved model's {key}; drop "
                             f"{key}={train_values[key]!r}")
    if not (Path(directory) / "model.safetensors").is_file():
        raise ValueError(f"init_from={directory!r} holds no weights (model.safetensors)")
    train_values["tokenizer"] = directory
    try:
        raw = json.loads(config.read_text("utf-8"))
    except (UnicodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config} is not a model configuration: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config} is not a model configuration (a JSON object)")
    saved = BlockRecurrentConfig.from_dict(raw)
    if train_values.get("tune", "all") != "all" and not saved.recurrent_layers:
        raise ValueError(f"init_from={directory!r} has no recurrent layer: there is no state to "
                         "tune")
    return {**saved.to_dict(), **model_values}


def initial_weights(directory: str, model_config: BlockRecurrentConfig) -> dict:
    """The saved model's weights, for a model of model_config (the saved config, with at most
    the FINE_TUNABLE settings changed)."""
    # Here, not at the top: settings.py imports this module, and `brt --help` must not load torch.
    from ..model.transformer import BlockRecurrentTransformer

    saved = BlockRecurrentTransformer.from_pretrained(directory)
    own = saved.config.to_dict()
    for key, value in model_config.to_dict().items():
        if key not in FINE_TUNABLE + ("num_tokens",) and own[key] != value:
            raise ValueError(f"init_from={directory!r}: the run's model.{key}={value!r} is not "
                             f"the saved model's ({own[key]!r})")
    return saved.state_dict()


def freeze_but_state(model, tune: str) -> None:
    """Every parameter frozen but those `tune` ("state" or "state+ids") names."""
    from ..model.state_tune import tuned_parameters

    keep = {id(p) for p in tuned_parameters(model, with_ids=tune == "state+ids").values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def export_state_tune(out_dir: Path, model_dir: Path, tune: str, base_model: str) -> dict:
    """out_dir/state_tune.safetensors from the exported model's tuned tensors (the base model's
    fingerprint is the same: nothing else changed) -> summary entries."""
    from ..model.state_tune import STATE_TUNE_FILE, save_state_tune
    from ..model.transformer import BlockRecurrentTransformer

    model = BlockRecurrentTransformer.from_pretrained(model_dir)
    with_ids = tune == "state+ids"
    header = save_state_tune(out_dir / STATE_TUNE_FILE, model, with_ids,
                             extra={"base_model": base_model})
    sizes = {n: model.get_parameter(n).numel() for n in header["tensors"]}
    return {"state_tune": str(out_dir / STATE_TUNE_FILE), "tuned": sorted(sizes),
            "tuned_values": sum(sizes.values())}
