"""Training settings: TrainConfig (the [train] section), config files and `key=value` overrides,
the paper's baselines, and the help text listing every setting with its meaning.

    model_config, train_config = load_train_config("configs/small.toml",
                                                   overrides=["max_steps=200"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

from ..model import dtypes
from ..model.config import PRESETS, BlockRecurrentConfig
from ..model.dtypes import torch_dtype as torch_dtype  # re-exported: train.optim imports it here
from .init_from import init_model_settings

BASELINES = ("recurrent", "slide", "xl")
# Settings fitted to the run and the corpus when the user leaves them unset: warmup_steps to
# max_steps (here), batch_size and eval_tokens to the documents (train.train).
FITTED = ("warmup_steps", "batch_size", "eval_tokens")
# TrainConfig.dtype: "auto" or a canonical name of model.dtypes, not float16 (its autocast needs
# a gradient scaler, which the trainer does not run).
DTYPES = ("auto", *(d for d in dtypes.DTYPES if d != "float16"))
PARALLEL = ("ddp", "fsdp")
TUNE = ("all", "state", "state+ids")  # which parameters a run trains


# ------------------------------------------------------------------------------- settings

def valid_betas(betas) -> bool:
    """Adam's (beta1, beta2): two numbers in [0, 1), as the trainer and the probes take them."""
    return (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                    for b in betas))


def _setting(default, meaning: str):
    """A TrainConfig field: its default and its meaning (what --help prints beside it)."""
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclass
class TrainConfig:
    """Training settings: the [train] section of a config file, or `key=value` on the command
    line. Each field is _setting(default, meaning); settings_help prints the meanings."""
    # data
    data: str = _setting("stdlib",
                         '"stdlib", a .jsonl file, a directory or a glob pattern of text files')
    text_field: str = _setting("text", "field holding the text in .jsonl records")
    tokenizer: str = _setting("byte",
                              '"byte", "bpe" (trained on the train split), or a tokenizer '
                              'directory')
    bpe_vocab_size: int = _setting(8192,
                                   'vocabulary of tokenizer "bpe"; model.num_tokens follows it')
    cache_dir: str = _setting("data_cache",
                              'tokenized corpora and BPE tokenizers are cached here ("": none)')
    baseline: str = _setting("recurrent",
                             '"slide": no recurrent layer; "xl": also segment = block_width')
    init_from: str = _setting("",
                              "a saved model directory to start from (fine-tuning): its weights, "
                              "model settings and tokenizer; \"\": new weights")
    tune: str = _setting("all",
                         '"all" weights; "state": only each recurrent layer\'s document-start '
                         'state, "state+ids": and its state ids (state tuning: needs init_from; '
                         'also writes out_dir/state_tune.safetensors)')
    # optimisation
    batch_size: int = _setting(8,
                               "lanes per process (x world size), fewer when unset and documents "
                               "are few")
    grad_accum: int = _setting(1, "consecutive segments of every lane per optimizer step")
    max_steps: int = _setting(1000, "optimizer steps; the cosine schedule ends here")
    lr: float = _setting(1e-3, "peak learning rate, reached after warmup_steps")
    min_lr: float = _setting(1e-4, "learning rate at max_steps")
    warmup_steps: int = _setting(100,
                                 "linear warmup from 0 (unset and over max_steps: max_steps // 10)")
    weight_decay: float = _setting(0.1, "AdamW decay, on weight matrices only")
    betas: tuple = _setting((0.9, 0.95), "AdamW betas")
    grad_clip: float = _setting(1.0, "max global gradient norm; 0 disables clipping")
    max_nonfinite: int = _setting(5,
                                  "stop after this many non-finite losses in a row (each is "
                                  "skipped)")
    # hardware
    device: str = _setting("auto", '"auto" (cuda if available), "cpu", "cuda", "cuda:N"')
    dtype: str = _setting("auto", '"auto": bf16 autocast on CUDA with bf16 support, else float32')
    compile: bool = _setting(False, "torch.compile the model")
    parallel: str = _setting("ddp",
                             'under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2 '
                             'sharding)')
    activation_checkpointing: bool = _setting(False,
                                              "recompute each layer's activations in backward")
    seed: int = _setting(0, "model init, data order and dropout")
    # evaluation, logging, checkpoints
    out_dir: str = _setting("runs/brt", "metrics.jsonl, loss.png, checkpoints/, model/")
    eval_interval: int = _setting(200,
                                  "steps between evaluations (always one at the end); 0: at the "
                                  "end")
    eval_tokens: int = _setting(32768,
                                "held-out tokens per evaluation (whole validation documents); 0: "
                                "none")
    state_eval_tokens: int = _setting(8192,
                                      "held-out tokens (the first validation documents) on which "
                                      "each evaluation of a recurrent model also measures what "
                                      "its state is worth (state_gain: the loss with another "
                                      "document's state, less the loss); 0: off")
    log_interval: int = _setting(10, "steps between metrics lines")
    save_interval: int = _setting(500,
                                  "steps between checkpoints (always one at the end); 0: at the "
                                  "end")
    keep_last: int = _setting(3, "checkpoints kept; 0 keeps all")
    tensorboard: bool = _setting(False,
                                 "also log to out_dir/tensorboard (needs the tensorboard package)")

    # Not a setting (no annotation): which of FITTED neither a config file nor the command line
    # set, so the trainer may fit them to the run and the corpus (load_train_config fills it; a
    # TrainConfig made in code fits nothing).
    unset = frozenset()

    def __post_init__(self):
        for f in fields(self):  # types follow the defaults; ints are accepted for floats
            value, kind = getattr(self, f.name), type(f.default)
            if kind is str and isinstance(value, os.PathLike):
                value = os.fspath(value)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is tuple and isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(f"train setting {f.name} must be {kind.__name__}, "
                                f"got {type(value).__name__} ({value!r})")
            setattr(self, f.name, value)

        def need(ok: bool, name: str, fix: str):
            if not ok:
                raise ValueError(f"invalid train setting {name}={getattr(self, name)!r}: {fix}")

        need(self.data != "", "data",
             "name a corpus: 'stdlib', a .jsonl file, a directory or a glob")
        need(self.tokenizer in ("byte", "bpe") or os.path.isdir(self.tokenizer), "tokenizer",
             "use 'byte', 'bpe' or an existing directory holding a tokenizer")
        need(self.bpe_vocab_size >= 257, "bpe_vocab_size", "must be >= 257 (256 bytes + <|doc|>)")
        need(self.baseline in BASELINES, "baseline", f"choose one of {BASELINES}")
        need(self.tune in TUNE, "tune", f"choose one of {TUNE}")
        need(self.tune == "all" or self.init_from != "", "tune",
             "tuning the state needs a trained model: set init_from=MODEL_DIR")
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "max_nonfinite"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("seed", "eval_interval", "eval_tokens", "state_eval_tokens", "save_interval",
                     "keep_last"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must lie in [0, lr={self.lr}]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.warmup_steps <= self.max_steps, "warmup_steps",
             f"must not exceed max_steps={self.max_steps}; lower it or raise max_steps")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             "must be >= 0")
        need(valid_betas(self.betas), "betas", "give two numbers in [0, 1), e.g. [0.9, 0.95]")
        need(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
             "must be >= 0 (0: off)")
        need(self.device in ("auto", "cpu", "cuda")
             or re.fullmatch(r"cuda:\d+", self.device) is not None,
             "device", "use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        need(self.dtype in DTYPES, "dtype", f"choose one of {DTYPES}")
        need(self.parallel in PARALLEL, "parallel", f"choose one of {PARALLEL}")
        need(self.out_dir != "", "out_dir", "name an output directory")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def check_run_settings(model_config: BlockRecurrentConfig, train_config: TrainConfig) -> None:
    """train()'s checks of its arguments' types, and of the packages that the settings need."""
    if not isinstance(model_config, BlockRecurrentConfig):
        raise TypeError("model_config must be a BlockRecurrentConfig, "
                        f"got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    if train_config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("tensorboard=true needs the tensorboard package: pip install "
                             "blockrecurrent[tensorboard], or set tensorboard=false") from None


def apply_baseline(model_config: BlockRecurrentConfig, baseline: str) -> BlockRecurrentConfig:
    """The paper's baselines from one model config: "slide" drops the recurrent layers (same
    segment and window); "xl" also makes the segment one window long (Transformer-XL, max_seq_len
    = block_width). Note that the paper's Slide:13L adds a layer to match parameters: set depth."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if baseline == "recurrent":
        return model_config
    changes = {"recurrent_layers": ()}
    if baseline == "xl":
        changes["max_seq_len"] = model_config.block_width
    return dataclasses.replace(model_config, **changes)


def baseline_configs(model_config: BlockRecurrentConfig, extra_layer: bool = True
                     ) -> dict[str, BlockRecurrentConfig]:
    """The recurrent model and the paper's baselines (section 4) from one config of N layers,
    name -> the model config to build (apply_baseline already applied):
    - "recurrent": Rec:NL, the config itself;
    - "slide": Slide:NL, the same layers, window and block cache without the recurrent state:
      against Rec:NL, the clean ablation of the state;
    - "slide+1" (with extra_layer): Slide:(N+1)L, one more ordinary layer standing in for the
      recurrent cell's extra parameters, as the paper's Slide:13L beside its 12-layer model;
    - "xl": XL:W, Transformer-XL with segment = window (max_seq_len = block_width), as deep as
      the deepest Slide: (N+1)L with extra_layer, NL without.
    A config without recurrent layers is itself Slide:NL: it gives "slide" and "xl" (NL) only."""
    if not model_config.recurrent_layers:
        slide = apply_baseline(model_config, "slide")
        return {"slide": slide, "xl": apply_baseline(slide, "xl")}
    slide = apply_baseline(model_config, "slide")
    out = {"recurrent": model_config, "slide": slide}
    if extra_layer:
        slide = dataclasses.replace(slide, depth=model_config.depth + 1)
        out["slide+1"] = slide
    out["xl"] = apply_baseline(slide, "xl")
    return out


def baseline_of(name: str) -> str:
    """The trainer's `baseline` setting of a model named by baseline_configs ("slide+1": slide)."""
    return "slide" if name == "slide+1" else name


def resolve_model_config(model_config: BlockRecurrentConfig, cfg: TrainConfig, vocab_size: int
                         ) -> BlockRecurrentConfig:
    """The model actually trained: the baseline applied, and num_tokens = the tokenizer's
    vocabulary (a run from a saved model keeps the saved model's, which its tokenizer fits)."""
    num_tokens = model_config.num_tokens if cfg.init_from else vocab_size
    return dataclasses.replace(apply_baseline(model_config, cfg.baseline), num_tokens=num_tokens)


# ----------------------------------------------------------------------------- config files

def _read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"reading {path} needs PyYAML: pip install blockrecurrent[yaml], "
                             "or write the config as .toml") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path} must hold tables [model] and/or [train] of key = value settings")
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections are [model] and "
                         "[train]")
    return raw


def _parse_value(text: str, kind: type):
    """A command-line value as a TOML scalar or array; bare words stay strings (`tokenizer=bpe`)."""
    if kind is str and not text.strip().startswith(('"', "'")):
        return text  # paths and names need no quotes
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # not TOML: the settings' type check reports it


def _coerce(value, kind: type):
    if kind is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def load_train_config(path=None, preset: str | None = None, overrides=()
                      ) -> tuple[BlockRecurrentConfig, TrainConfig]:
    """Settings from a TOML/YAML file with [model] and [train] sections, then `overrides`:
    "key=value" (train) or "model.key=value", values parsed as TOML. The model starts from a
    preset: `model.preset=` override, else the `preset` argument, else the file's
    [model] preset, else "small". Unknown keys raise ValueError listing the valid ones.
    `train()` then applies the baseline and sets num_tokens from the tokenizer
    (resolve_model_config)."""
    name, model_values, train_values = _given_settings(path, preset, overrides)
    if train_values.get("init_from"):
        model_dict = init_model_settings(name, model_values, train_values)
    else:
        model_dict = {**PRESETS[name or "small"], **model_values}
    warmup = fit_warmup(train_values.get("max_steps"))
    train_dict = dict(train_values)
    if "warmup_steps" not in train_values and warmup is not None:
        train_dict["warmup_steps"] = warmup
    train_config = TrainConfig(**train_dict)
    train_config.unset = frozenset(FITTED) - set(train_values)
    return _model_config(model_dict), train_config


def _model_config(model_dict: dict) -> BlockRecurrentConfig:
    if isinstance(model_dict.get("recurrent_layers"), list):
        model_dict = {**model_dict, "recurrent_layers": tuple(model_dict["recurrent_layers"])}
    return BlockRecurrentConfig(**model_dict)


def _given_settings(path, preset: str | None, overrides) -> tuple[str | None, dict, dict]:
    """What the file, the preset argument and the overrides set: (the preset's name or None,
    model settings, train settings), each key checked."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string "
                        f"({overrides!r})")
    raw = _read_config_file(path) if path is not None else {}
    where = str(path) if path is not None else ""
    model_kinds = {f.name: type(f.default) if f.default is not dataclasses.MISSING else dict
                   for f in fields(BlockRecurrentConfig)}
    model_kinds["preset"] = str
    train_kinds = {f.name: type(f.default) for f in fields(TrainConfig)}
    sections = {"model": (model_kinds, {}), "train": (train_kinds, {})}

    def put(section: str, key: str, value, source: str):
        kinds, values = sections[section]
        if key not in kinds:
            raise ValueError(f"unknown {section} setting {key!r} ({source}); valid {section} "
                             f"settings: {', '.join(sorted(kinds))}")
        values[key] = _coerce(value, kinds[key])

    for section, table in raw.items():
        for key, value in table.items():
            put(section, key, value, f"in {where}")
    from_args = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (a train setting) or "
                             "model.key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        section, _, name = key.rpartition(".")
        section = section or "train"
        if section not in sections:
            raise ValueError(f"override {item!r}: prefix must be 'model.' or 'train.', "
                             f"got {section!r}")
        if section == "model" and name == "preset":
            from_args["preset"] = _parse_value(text, str)
        else:
            kind = sections[section][0].get(name, str)
            put(section, name, _parse_value(text, kind), "command line")

    model_values = sections["model"][1]
    name = from_args.get("preset") or preset or model_values.pop("preset", None) or None
    model_values.pop("preset", None)
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return name, model_values, sections["train"][1]


def fit_warmup(max_steps) -> int | None:
    """The warmup of a run of max_steps whose default warmup_steps would not fit in it: a tenth
    of the run (at least 1); None when the default fits (or max_steps is not a valid count)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        return None
    return max(1, max_steps // 10) if TrainConfig.warmup_steps > max_steps else None


def settings_help() -> str:
    """Every train setting with its default and meaning, then the model.* settings, for --help."""
    train = "; ".join(f"{f.name}={f.default!r}: {f.metadata['help']}" for f in fields(TrainConfig))
    model = ", ".join(f.name for f in fields(BlockRecurrentConfig))
    return f"train settings (defaults): {train}. model.* settings: {model}."
