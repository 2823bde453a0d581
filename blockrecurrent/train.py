"""Training: settings, a Trainer that resumes exactly, atomic checkpoints, multi-process runs.

    model_config, train_config = load_train_config("configs/small.toml", overrides=["max_steps=200"])
    summary = train(model_config, train_config)          # = brt train --config configs/small.toml
    torchrun --nproc_per_node=4 -m blockrecurrent.train --config configs/paper-150m.toml

How data meets the model. Each batch row is a *lane* (data.DocumentLanes) reading one document
segment after segment (segment = the model's max_seq_len); `reset` marks rows that start a new
document. Memories and states are carried from one segment to the next, detached, so every
segment is one forward and one backward: truncated backprop through time (paper section 3), and
memory does not grow with document length. Gradient accumulation cannot draw extra micro-batches
from elsewhere without breaking the lanes' order, so it takes the next `grad_accum` consecutive
segments of every lane (state carried between them, backward after each) before one optimizer step.

Under torchrun, each of the world_size processes owns `batch_size` of the batch_size * world_size
global lanes; the model is wrapped here (wrap_model: DistributedDataParallel, or FSDP2 with
parallel="fsdp"; it knows nothing of it), the loss is normalised by the *global* count of real
tokens so that a run matches one process with the whole batch, and only rank 0 writes files
(with FSDP every rank writes its own shards and lanes).

A checkpoint, out_dir/checkpoints/step_0000100/, is also a model directory that
BlockRecurrentTransformer.from_pretrained and `brt generate` read directly:
    config.json, model.safetensors      the model (save_pretrained, unwrapped weights)
    tokenizer_config.json [+ .json]     the tokenizer (tokenizer.save)
    trainer.json                        step, counters, both configurations, world size
    optimizer.pt                        AdamW state (torch.save; read with weights_only=True)
    lanes_rank{r}.json                  rank r's data position (DocumentLanes.state_dict)
    lanes_rank{r}.safetensors           rank r's carried memories ("memories.*") and "states"
    rng_rank{r}.pt                      rank r's torch / cuda / numpy / python RNG states
It is written to a temporary directory and renamed, so it exists whole or not at all;
checkpoints/latest names the newest. At the end the model is exported to out_dir/model/.
With parallel="fsdp" the weights and optimizer are sharded instead (torch.distributed.checkpoint):
    dcp/                                .metadata and one __{r}_0.distcp per rank: model, optimizer
    (no config.json / model.safetensors / optimizer.pt; the rest as above, each rank writing its own
    lanes_rank{r}.* and rng_rank{r}.pt), resumable with another number of processes: _load_sharded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

from . import data as D
from .config import PRESETS, BlockRecurrentConfig
from .files import make_temp_dir, write_atomic, write_json
from .model import BlockRecurrentTransformer, XLMemories

BASELINES = ("recurrent", "slide", "xl")
DTYPES = ("auto", "float32", "bfloat16")
PARALLEL = ("ddp", "fsdp")
CHECKPOINT_FORMAT = 1
# Settings that fix the data stream or the vocabulary: a resumed run must keep them.
_RESUME_FIXED = ("data", "text_field", "tokenizer", "bpe_vocab_size", "batch_size", "seed", "baseline")


# ------------------------------------------------------------------------------- settings

@dataclass
class TrainConfig:
    """Training settings: the [train] section of a config file, or `key=value` on the command line."""
    # data
    data: str = "stdlib"  # "stdlib", a .jsonl file, a directory or a glob pattern of text files
    text_field: str = "text"  # field holding the text in .jsonl records
    tokenizer: str = "byte"  # "byte", "bpe" (trained on the train split), or a tokenizer directory
    bpe_vocab_size: int = 8192  # vocabulary of tokenizer "bpe"; model.num_tokens follows the tokenizer
    cache_dir: str = "data_cache"  # tokenized corpora and BPE tokenizers are cached here ("": none)
    baseline: str = "recurrent"  # "slide": no recurrent layer; "xl": also segment = block_width
    # optimisation
    batch_size: int = 8  # lanes per process; global batch = batch_size * world size
    grad_accum: int = 1  # consecutive segments of every lane per optimizer step
    max_steps: int = 1000  # optimizer steps; the cosine schedule ends here
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-4  # learning rate at max_steps
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW decay, on weight matrices only
    betas: tuple = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row (each is skipped)
    # hardware
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA with bf16 support, else float32 (see _autocast_dtype)
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2 sharding)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    seed: int = 0  # model init, data order and dropout
    # evaluation, logging, checkpoints
    out_dir: str = "runs/brt"  # metrics.jsonl, loss.png, checkpoints/, model/
    eval_interval: int = 200  # steps between evaluations (always one at the end); 0: only at the end
    eval_tokens: int = 32768  # held-out tokens per evaluation (whole validation documents); 0: none
    log_interval: int = 10  # steps between metrics lines
    save_interval: int = 500  # steps between checkpoints (always one at the end); 0: only at the end
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)

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

        need(self.data != "", "data", "name a corpus: 'stdlib', a .jsonl file, a directory or a glob")
        need(self.tokenizer in ("byte", "bpe") or os.path.isdir(self.tokenizer), "tokenizer",
             "use 'byte', 'bpe' or an existing directory holding a tokenizer")
        need(self.bpe_vocab_size >= 257, "bpe_vocab_size", "must be >= 257 (256 bytes + <|doc|>)")
        need(self.baseline in BASELINES, "baseline", f"choose one of {BASELINES}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "max_nonfinite"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("seed", "eval_interval", "eval_tokens", "save_interval", "keep_last"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must lie in [0, lr={self.lr}]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.warmup_steps <= self.max_steps, "warmup_steps",
             f"must not exceed max_steps={self.max_steps}; lower it or raise max_steps")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
             "betas", "give two numbers in [0, 1), e.g. [0.9, 0.95]")
        need(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: off)")
        need(self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
             "device", "use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        need(self.dtype in DTYPES, "dtype", f"choose one of {DTYPES}")
        need(self.parallel in PARALLEL, "parallel", f"choose one of {PARALLEL}")
        need(self.out_dir != "", "out_dir", "name an output directory")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


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
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections are [model] and [train]")
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
    `train()` then applies the baseline and sets num_tokens from the tokenizer (resolve_model_config)."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key=value' strings, not one string ({overrides!r})")
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
            raise ValueError(f"override {item!r}: prefix must be 'model.' or 'train.', got {section!r}")
        if section == "model" and name == "preset":
            from_args["preset"] = _parse_value(text, str)
        else:
            put(section, name, _parse_value(text, sections[section][0].get(name, str)), "command line")

    model_values = sections["model"][1]
    name = from_args.get("preset") or preset or model_values.pop("preset", None) or "small"
    model_values.pop("preset", None)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    model_dict = {**PRESETS[name], **model_values}
    if isinstance(model_dict.get("recurrent_layers"), list):
        model_dict["recurrent_layers"] = tuple(model_dict["recurrent_layers"])
    return BlockRecurrentConfig(**model_dict), TrainConfig(**sections["train"][1])


# ---------------------------------------------------------------------------- small helpers

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, cosine to min_lr at
    max_steps. A pure function of the step, so the schedule resumes exactly with the step."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def lm_loss_sum(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Summed cross-entropy in nats (float32) over the real tokens (`mask`) of a segment."""
    targets = targets.masked_fill(~mask, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays: CUDA with bf16 support. Not on CPU by default: without AMX,
    PyTorch's CPU bf16 matmuls measured ~10x slower than float32 for the small preset on this
    project's 2-core machine. None means plain float32."""
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"
                                 and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def make_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0):
    """AdamW that decays only the weight matrices of linear maps and embeddings; not norms,
    biases, gate biases, attention scales, nor the learned initial state and state ids."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d))}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0}]
    try:  # the fused kernel: ~5x faster steps than the per-tensor loop (CPU too since torch 2.4)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}; the checkpoint is incomplete or corrupted") from None


def _torch_load(path: Path, device):
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {path}: {err}; the checkpoint is incomplete or corrupted") from None


def _rng_state(device: torch.device) -> dict:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": random.getstate()}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _write_rank_files(directory: Path, rank: int, part: dict) -> None:
    """One rank's data position, carried memories and states, and RNG (Trainer._rank_state)."""
    from safetensors.torch import save_file
    save_file(part["tensors"], str(directory / f"lanes_rank{rank}.safetensors"))
    write_json(directory / f"lanes_rank{rank}.json", part["lanes"])
    torch.save(part["rng"], directory / f"rng_rank{rank}.pt")


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns at every save/load of a single process (no process group); that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (temporary directories start with a dot), oldest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint named by out_dir/checkpoints/latest, else the highest-numbered one."""
    root = Path(out_dir) / "checkpoints"
    steps = _step_dirs(root)
    if (root / "latest").is_file():
        name = (root / "latest").read_text("utf-8").strip()
        if not (root / name).is_dir():
            raise ValueError(f"{root / 'latest'} names {name!r}, which does not exist; edit it to "
                             f"name one of {[p.name for p in steps]}")
        return root / name
    return steps[-1] if steps else None


# ------------------------------------------------------------------------ processes and data

@dataclass
class DistEnv:
    """This process's place in a (possibly single-process) run."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device='cpu' or 'auto'")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not cuda:
        dev = torch.device("cpu")
    elif world > 1:
        dev = torch.device("cuda", local)  # one GPU per process
    else:
        dev = torch.device(device if device.startswith("cuda") else "cuda")
    owns = False
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), dev, owns)
    return DistEnv(0, 1, dev, False)


def _corpus_cache(cfg: TrainConfig, split: str, tokenizer) -> Path | None:
    if not cfg.cache_dir:
        return None
    source = cfg.data if cfg.data == "stdlib" else os.path.abspath(cfg.data)
    key = json.dumps([source, cfg.text_field, split, tokenizer.fingerprint])
    return Path(cfg.cache_dir) / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def build_data(cfg: TrainConfig, env: DistEnv | None = None, tokenizer=None):
    """(tokenizer, train corpus, val corpus or None). Documents are split by data.split_documents
    with its default fractions, which evaluation reuses for the test split. Rank 0 fills the
    cache first; the other ranks then read it."""
    env = env or DistEnv()
    docs = D.load_documents(cfg.data, cfg.text_field)
    splits = D.split_documents(docs)
    if env.rank != 0:
        env.barrier()
    if tokenizer is None:
        bpe = cfg.tokenizer == "bpe"
        tokenizer = D.make_tokenizer(cfg.tokenizer, train_texts=splits["train"] if bpe else None,
                                     vocab_size=cfg.bpe_vocab_size if bpe else None,
                                     cache_dir=cfg.cache_dir or None)
    train_corpus = D.tokenize_corpus(splits["train"], tokenizer, _corpus_cache(cfg, "train", tokenizer))
    val_corpus = (D.tokenize_corpus(splits["val"], tokenizer, _corpus_cache(cfg, "val", tokenizer))
                  if splits["val"] else None)
    if env.rank == 0:
        env.barrier()
    return tokenizer, train_corpus, val_corpus


def eval_subset(corpus: D.TokenizedCorpus, max_tokens: int) -> D.TokenizedCorpus | None:
    """The fixed evaluation set: validation documents in name order, each whole (so bits per
    byte is exact), taken while they fit in max_tokens. None if no document fits."""
    chosen, total = [], 0
    for i, n in enumerate(corpus.doc_lengths):
        if 2 <= n <= max_tokens - total:
            chosen.append(i)
            total += int(n)
    if not chosen:
        return None
    offsets = np.concatenate(([0], np.cumsum([len(corpus.doc(i)) for i in chosen]))).astype(np.int64)
    return D.TokenizedCorpus(np.concatenate([corpus.doc(i) for i in chosen]), offsets,
                             np.array([corpus.num_bytes(i) for i in chosen], np.int64),
                             [corpus.names[i] for i in chosen], bos_id=corpus.bos_id,
                             vocab_size=corpus.vocab_size)


# ------------------------------------------------------------------------------- the trainer

def _checkpoint_layers(model: BlockRecurrentTransformer) -> None:
    """Per-layer activation checkpointing: each layer keeps only its inputs for backward and
    recomputes the rest (non-reentrant, RNG restored, so dropout repeats). The forward is
    replaced on the instance, so parameter names and saved files stay as they are."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def wrap_model(model: BlockRecurrentTransformer, cfg: TrainConfig, env: DistEnv,
               autocast: torch.dtype | None) -> tuple[nn.Module, nn.Module | None]:
    """The one place that makes the model parallel: returns (module to train, DDP wrapper or
    None). FSDP2 (fully_shard) turns `model` itself into the sharded module, in place."""
    if cfg.activation_checkpointing:
        _checkpoint_layers(model)
    if env.world_size == 1:
        return model, None
    cfg_m = model.config
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # With one block per segment the last state update never reaches the loss.
        unused = bool(cfg_m.recurrent_layers) and cfg_m.max_seq_len == cfg_m.block_width
        ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                      broadcast_buffers=False, find_unused_parameters=unused)
        return ddp, ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # bf16 weights in the matmuls, gradients reduced and the optimizer kept in float32. Only on
    # CUDA: on CPU, autocast alone decides (bf16 matmuls there are slow, see _autocast_dtype).
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if env.device.type == "cuda" and autocast == torch.bfloat16 else MixedPrecisionPolicy())
    for layer in model.layers:
        # A recurrent layer's initial_state is read by the model before the layer runs (to start
        # reset rows), so its weights stay in the root group, gathered for the whole forward.
        if not layer.recurrent:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # The layers also return their caches, views that the model only detaches (never writes).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if dist.get_backend() == "gloo" and hasattr(model, "set_force_sum_reduction_for_comms"):
        # Average as SUM then a division by the world size: some torch versions sent ReduceOp.AVG
        # to gloo's reduce-scatter, which summed (pytorch issue 162338).
        model.set_force_sum_reduction_for_comms(True)
    return model, None


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for max_nonfinite optimizer steps in a row."""


class Trainer:
    """Owns the model (and its DDP wrapper), the optimizer, this rank's lanes with their carried
    memories and states, and the counters; `state_dict()` holds all of it, so a run resumes exactly."""

    def __init__(self, model_config: BlockRecurrentConfig, cfg: TrainConfig,
                 train_corpus: D.TokenizedCorpus, val_corpus: D.TokenizedCorpus | None = None,
                 tokenizer=None, env: DistEnv | None = None):
        self.env = env = env or DistEnv()
        self.cfg, self.model_config, self.tokenizer = cfg, model_config, tokenizer or D.ByteTokenizer()
        if train_corpus.vocab_size > model_config.num_tokens:
            raise ValueError(f"the tokenizer has {train_corpus.vocab_size} ids but model.num_tokens="
                             f"{model_config.num_tokens}; set model.num_tokens={train_corpus.vocab_size}")
        dev = env.device
        # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a stream
        # per rank for dropout.
        torch.manual_seed(cfg.seed)
        self.model = BlockRecurrentTransformer(model_config).to(dev)
        torch.manual_seed(cfg.seed + 1 + env.rank)
        np.random.seed(cfg.seed + env.rank)
        random.seed(cfg.seed + env.rank)
        self.model.train()
        self.autocast = _autocast_dtype(cfg.dtype, dev)
        # FSDP: sharded weights, DCP checkpoints (also with one process, so that a run can resume
        # with another number of processes).
        self.sharded = cfg.parallel == "fsdp"
        self.fsdp = self.sharded and env.world_size > 1
        self.train_model, self.ddp = wrap_model(self.model, cfg, env, self.autocast)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        # After wrapping: FSDP replaces the parameters by sharded ones.
        self.optimizer = make_optimizer(self.model, lr_at(1, cfg), tuple(cfg.betas), cfg.weight_decay)
        self.lanes = D.DocumentLanes(train_corpus, cfg.batch_size, model_config.max_seq_len,
                                     seed=cfg.seed, rank=env.rank, world_size=env.world_size)
        self.eval_corpus = None
        if val_corpus is not None and cfg.eval_tokens > 0:
            self.eval_corpus = eval_subset(val_corpus, cfg.eval_tokens)
            if self.eval_corpus is None:
                raise ValueError(f"eval_tokens={cfg.eval_tokens} is smaller than every validation document "
                                 f"(shortest: {int(val_corpus.doc_lengths.min())} tokens); raise eval_tokens, "
                                 "or set it to 0 to skip evaluation")
        self.mems: XLMemories | None = None
        self.states: Tensor | None = None
        self.step = self.tokens_seen = self.nonfinite_skips = self.nonfinite_in_a_row = 0
        self.elapsed = 0.0  # training seconds, summed over resumed runs
        self.log_window = [0.0, 0.0, 0.0]  # loss nats, real tokens, all positions since the last log
        self.stop_requested = False
        self.last_loss = self.last_eval = self._tb = None
        self.last_grad_norm = float("nan")  # before clipping, of the last step

    # --- one optimizer step -------------------------------------------------------------
    def _context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast)

    def train_step(self) -> tuple[float, bool]:
        """One optimizer step over the next grad_accum segments of every lane. Returns the mean
        loss per real token over all ranks (nan if skipped) and whether any rank asked to stop."""
        cfg, env, dev = self.cfg, self.env, self.env.device
        batches = [self.lanes.next_batch() for _ in range(cfg.grad_accum)]
        # The loss is the mean over the step's real tokens on all ranks. DDP and FSDP average
        # gradients over ranks, hence the world_size factor: the result matches one process with
        # the whole batch. (FSDP reduce-scatters after each segment's backward, so that no full
        # gradient is held between segments.)
        local = sum(float(b["loss_mask"].sum()) for b in batches)
        total = env.all_reduce(torch.tensor([local], dtype=torch.float64, device=dev)).item()
        scale = env.world_size / max(total, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, batch in enumerate(batches):
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            sync = self.ddp is None or i == len(batches) - 1  # all-reduce gradients once per step
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self._context():
                    logits, self.mems, self.states = self.train_model(
                        batch["inputs"], xl_memories=self.mems, states=self.states, reset=batch["reset"])
                ce = lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
                (ce * scale).backward()  # frees this segment's graph: memories come back detached
            loss_sum += ce.detach().double()
        stats = env.all_reduce(torch.stack([loss_sum, torch.tensor(float(self.stop_requested),
                                                                   dtype=torch.float64, device=dev)]))
        loss, stop = stats[0].item() / max(total, 1.0), stats[1].item() > 0
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor reduced over the shards
            norm = norm.full_tensor()
        self.last_grad_norm = float(norm)
        self.step += 1
        positions = cfg.grad_accum * cfg.batch_size * env.world_size * self.model_config.max_seq_len
        if not (math.isfinite(loss) and bool(torch.isfinite(norm))):
            # Skip: no update. Drop carried memories that went non-finite, or they poison every later step.
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skips += 1
            self.nonfinite_in_a_row += 1
            carried = ([] if self.states is None else [self.states]) + \
                ([] if self.mems is None else list(self.mems.keys + self.mems.values))
            if not all(bool(torch.isfinite(t).all()) for t in carried):
                self.mems = self.states = None
            return float("nan"), stop
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.optimizer.step()
        self.nonfinite_in_a_row = 0
        self.tokens_seen += int(total)
        self.log_window = [self.log_window[0] + loss * total, self.log_window[1] + total,
                           self.log_window[2] + positions]
        self.last_loss = loss
        return loss, stop

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss (nats/token) and bits per byte over the fixed validation subset, whole
        documents streamed segment by segment with carried memories; shared out over ranks."""
        if self.eval_corpus is None:
            return None
        env, n = self.env, len(self.eval_corpus)
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # nats, tokens
        eval_world = min(env.world_size, n)  # ranks beyond the number of documents add zeros
        lanes = None if env.rank >= eval_world else D.DocumentLanes(
            self.eval_corpus, max(1, min(self.cfg.batch_size, n // eval_world)), self.model_config.max_seq_len,
            rank=env.rank, world_size=eval_world, shuffle=False, loop=False)
        self.model.eval()
        mems = states = None
        while True:
            more = lanes is not None and not lanes.exhausted
            if self.fsdp:  # every forward gathers weights from all ranks: run in lockstep
                more_any = torch.tensor([float(more)], device=env.device)
                if not env.all_reduce(more_any).item():
                    break
            elif not more:
                break
            if more:
                batch = {k: v.to(env.device) for k, v in lanes.next_batch().items()}
            else:  # FSDP, this rank's documents done: a forward on padding, not counted
                seq = torch.full((1, self.model_config.max_seq_len), self.eval_corpus.bos_id, device=env.device)
                batch = {"inputs": seq, "reset": None, "loss_mask": torch.zeros_like(seq, dtype=torch.bool)}
                mems = states = None
            with self._context():
                logits, mems, states = self.model(batch["inputs"], xl_memories=mems, states=states,
                                                  reset=batch["reset"])
            if more:
                sums[0] += lm_loss_sum(logits, batch["targets"], batch["loss_mask"]).double()
                sums[1] += batch["loss_mask"].sum()
        self.model.train()
        nats, tokens = env.all_reduce(sums).tolist()
        self.last_eval = {"val_loss": nats / max(tokens, 1.0),
                          "val_bpb": nats / math.log(2) / self.eval_corpus.total_bytes}
        return self.last_eval

    # --- state ---------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "tokens_seen": self.tokens_seen,
                "nonfinite_skips": self.nonfinite_skips, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "elapsed": self.elapsed, "log_window": list(self.log_window),
                "last_loss": self.last_loss, "last_eval": self.last_eval,
                "world_size": self.env.world_size, "train_config": self.cfg.to_dict(),
                "model_config": self.model_config.to_dict()}

    def _rank_state(self) -> dict:
        tensors = {} if self.mems is None else {f"memories.{k}": v.detach().contiguous().cpu()
                                                for k, v in self.mems.state_dict().items()}
        if self.states is not None:
            tensors["states"] = self.states.detach().contiguous().cpu()
        return {"lanes": self.lanes.state_dict(), "rng": _rng_state(self.env.device), "tensors": tensors}

    def state_dict(self) -> dict:
        """A snapshot (copies, so later steps do not change it) of this rank's view of everything
        needed to continue exactly: model, optimizer, schedule (a function of the step), step and
        counters, RNG, data position, carried memories and states."""
        rank = self._rank_state()
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {**self._meta(), "model": model, "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": {"step": self.step, "lr": lr_at(max(self.step, 1), self.cfg)},
                "lanes": rank["lanes"], "rng": rank["rng"], "lane_tensors": rank["tensors"]}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s snapshot. Without "model" and "optimizer" (a sharded checkpoint
        loads them itself) the rest only; "rng": None starts fresh per-rank streams."""
        meta = {k: state.get(k) for k in ("format", "world_size", "model_config", "step")}
        if meta["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"trainer state has format {meta['format']!r}, expected {CHECKPOINT_FORMAT}")
        if meta["world_size"] != self.env.world_size:
            raise ValueError(f"the checkpoint was written by {meta['world_size']} processes and this run has "
                             f"{self.env.world_size}; resume with the same number (its lanes are per rank)")
        _check_model_config(meta["model_config"], self.model_config)
        try:
            if "model" in state or "optimizer" in state:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.lanes.load_state_dict(state["lanes"])
            tensors = state["lane_tensors"]
            mems = {k[len("memories."):]: v.to(self.env.device) for k, v in tensors.items()
                    if k.startswith("memories.")}
            self.mems = XLMemories.from_state_dict(mems) if mems else None
            self.states = tensors["states"].to(self.env.device) if "states" in tensors else None
            if self.mems is not None and (len(self.mems.keys) != self.model_config.depth
                                          or self.mems.batch_size != self.cfg.batch_size):
                raise ValueError("carried memories do not fit this model and batch_size")
            if self.states is not None and self.states.shape[1] != self.cfg.batch_size:
                raise ValueError("carried states do not fit batch_size")
            for k in ("step", "tokens_seen", "nonfinite_skips", "nonfinite_in_a_row"):
                setattr(self, k, int(state[k]))
            self.elapsed, self.log_window = float(state["elapsed"]), [float(x) for x in state["log_window"]]
            self.last_loss, self.last_eval = state.get("last_loss"), state.get("last_eval")  # for the summary
            if state["rng"] is not None:
                _set_rng_state(state["rng"], self.env.device)
            else:  # a new stream per rank, from the seed and the step
                _seed_all(self.cfg.seed + 1 + self.env.rank + 1_000_003 * self.step)
        except (KeyError, TypeError, RuntimeError, IndexError) as err:
            raise ValueError(f"trainer state does not fit this run: {err!r}") from None

    # --- checkpoints ---------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_XXXXXXX (rank 0, gathering every rank's lanes), atomically;
        update checkpoints/latest and keep the last keep_last."""
        env, root = self.env, self.out_dir / "checkpoints"
        final = root / f"step_{self.step:07d}"
        if final.exists():  # seen by every rank: none is left waiting for the others
            raise FileExistsError(f"{final} already exists; not overwriting it")
        if self.sharded:
            return self._save_sharded(root, final)
        parts = [self._rank_state()]
        if env.world_size > 1:
            gathered = [None] * env.world_size if env.is_main else None
            dist.gather_object(parts[0], gathered, dst=0)
            parts = gathered
        if env.is_main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(root, f".tmp-{final.name}-")
            try:
                self.model.save_pretrained(tmp)
                self.tokenizer.save(tmp)
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                for r, part in enumerate(parts):
                    _write_rank_files(tmp, r, part)
                write_json(tmp / "trainer.json", self._meta())  # written last
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._point_latest(root, final)
        env.barrier()
        return final

    def _point_latest(self, root: Path, final: Path) -> None:
        write_atomic(root / "latest", lambda f: f.write(f"{final.name}\n".encode()))
        if self.cfg.keep_last:
            for old in _step_dirs(root)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _any_rank(self, flag: bool) -> bool:
        return bool(self.env.all_reduce(torch.tensor([float(flag)], device=self.env.device)).item())

    def _save_sharded(self, root: Path, final: Path) -> Path:
        """FSDP checkpoint: model and optimizer through torch.distributed.checkpoint (DCP), each
        rank writing its shards into dcp/, and each rank its own lanes and RNG files. All ranks
        write into one temporary directory (on multi-node runs out_dir must be a shared file
        system), which rank 0 renames once every rank has finished."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        env = self.env
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # the local shards
        tmp = [None]
        if env.is_main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = [make_temp_dir(root, f".tmp-{final.name}-")]
        if env.world_size > 1:
            dist.broadcast_object_list(tmp, src=0)
        tmp, error = tmp[0], None
        try:
            _write_rank_files(tmp, env.rank, self._rank_state())
            if env.is_main:
                self.tokenizer.save(tmp)
        except Exception as err:
            error = err
        try:
            if self._any_rank(error is not None):
                raise error or RuntimeError(f"another rank failed to write its files into {tmp}")
            with _single_process_dcp():
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"),
                         no_dist=env.world_size == 1)
            if env.is_main:  # dcp.save returns on rank 0 after every rank's shards are written
                write_json(tmp / "trainer.json", self._meta())
                os.replace(tmp, final)
        except BaseException:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if env.is_main:
            self._point_latest(root, final)
        env.barrier()
        return final

    def load_checkpoint(self, path) -> None:
        """Restore a checkpoint directory (each rank reads its own lanes). ValueError naming the
        file if anything is missing, unreadable or does not fit this run; nothing is written."""
        path, rank, dev = Path(path), self.env.rank, self.env.device
        from safetensors.torch import load_file
        meta = _read_json(path / "trainer.json")
        written = (meta.get("train_config") or {}).get("parallel", "ddp")
        if (written == "fsdp") != self.sharded:
            raise ValueError(f"{path} was written with parallel={written!r} and this run has "
                             f"parallel={self.cfg.parallel!r}; resume with parallel={written!r}")
        if self.sharded:
            return self._load_sharded(path, meta)
        model = BlockRecurrentTransformer.from_pretrained(path)  # validates config + weights
        lanes_file = path / f"lanes_rank{rank}.safetensors"
        try:
            tensors = load_file(str(lanes_file))
        except Exception as err:
            raise ValueError(f"cannot read {lanes_file}: {err}; the checkpoint is incomplete or corrupted") from None
        self.load_state_dict({**meta, "model": model.state_dict(),
                              "optimizer": _torch_load(path / "optimizer.pt", dev),
                              "lanes": _read_json(path / f"lanes_rank{rank}.json"),
                              "rng": _torch_load(path / f"rng_rank{rank}.pt", "cpu"),
                              "lane_tensors": tensors})

    def _load_sharded(self, path: Path, meta: dict) -> None:
        """Model and optimizer from dcp/, resharded by DCP to this run's processes. The lanes
        are global (DocumentLanes): with the same global batch, rank r takes global lanes
        r*batch_size ... with their carried memories from whichever ranks held them, so the data
        and the memories continue exactly whatever the number of processes. The per-rank RNG
        streams (dropout) continue exactly only with the same number; otherwise each rank starts
        a new stream from the seed and the step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        _check_model_config(meta.get("model_config"), self.model_config)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # templates to fill
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            with _single_process_dcp():
                dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=self.env.world_size == 1)
        except (Exception, dcp.CheckpointException) as err:  # the latter is a BaseException
            raise ValueError(f"cannot read {path / 'dcp'}: {err}; the checkpoint is incomplete, "
                             "corrupted or from another model") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        lanes, tensors, same = self._gather_lanes(path, meta)
        rng = _torch_load(path / f"rng_rank{self.env.rank}.pt", "cpu") if same else None
        self.load_state_dict({**meta, "world_size": self.env.world_size, "lanes": lanes, "rng": rng,
                              "lane_tensors": tensors})

    def _gather_lanes(self, path: Path, meta: dict) -> tuple[dict, dict, bool]:
        """This rank's lanes state and carried tensors, taken row by row from the checkpoint's
        ranks; and whether the layout is the one saved (then the RNG state fits too)."""
        from safetensors.torch import load_file
        old_world, old_b = meta.get("world_size"), (meta.get("train_config") or {}).get("batch_size")
        b, rank = self.cfg.batch_size, self.env.rank
        if not isinstance(old_world, int) or not isinstance(old_b, int) or old_world * old_b != b * self.env.world_size:
            raise ValueError(f"{path} holds {old_world} x {old_b} lanes (processes x batch_size) and this run "
                             f"has {self.env.world_size} x {b}; keep the global batch to resume")
        rows = [divmod(j, old_b) for j in range(rank * b, (rank + 1) * b)]  # (old rank, row)
        sources = sorted({r for r, _ in rows})
        states, parts = {}, {}
        for r in sources:
            states[r] = _read_json(path / f"lanes_rank{r}.json")
            file = path / f"lanes_rank{r}.safetensors"
            try:
                parts[r] = load_file(str(file))
            except Exception as err:
                raise ValueError(f"cannot read {file}: {err}; the checkpoint is incomplete or corrupted") from None
        if sources == [rank] and old_b == b:  # the saved layout: as written
            return states[rank], parts[rank], old_world == self.env.world_size
        now = self.lanes._config()
        for r, st in states.items():
            saved = st.get("config", {}) if isinstance(st, dict) else {}
            want = {**now, "batch_size": old_b, "rank": r, "world_size": old_world}
            if saved != want:
                raise ValueError(f"{path / f'lanes_rank{r}.json'} does not fit this run's data "
                                 f"(saved {saved}, expected {want})")
        if len({tuple(sorted(p)) for p in parts.values()}) > 1:
            raise ValueError(f"the ranks of {path} carried different memories (one dropped them after a "
                             "non-finite step); resume with the same number of processes")
        lanes = {"format": 1, "config": now, **{k: [states[r][k][i] for r, i in rows]
                                                 for k in ("epoch", "pos", "offset")}}
        batches = states[sources[0]]["batches"]
        lanes.update(batches=batches, seen_targets=batches * b * self.lanes.segment_len,  # counters:
                     padded_targets=sum(states[r]["padded_targets"] for r in sources) * b // (old_b * len(sources)))
        dim = {k: 1 if k == "states" else 0 for k in parts[sources[0]]}  # states: (r, b, s, e)
        tensors = {k: torch.cat([parts[r][k].narrow(d, i, 1) for r, i in rows], dim=d) for k, d in dim.items()}
        return lanes, tensors, False

    def _full_model(self) -> BlockRecurrentTransformer | None:
        """The whole model on rank 0 (FSDP: gathered, on the CPU; None on the other ranks)."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        model = BlockRecurrentTransformer(self.model_config)
        if self.model_config.tie_embeddings:
            full.setdefault("to_logits.weight", full["token_emb.weight"])
        model.load_state_dict(full)
        return model

    def export_model(self) -> Path:
        """The final model (and tokenizer) as out_dir/model/, swapped in whole."""
        dest = self.out_dir / "model"
        model = self._full_model()
        if self.env.is_main:
            tmp = make_temp_dir(self.out_dir, ".tmp-model-")
            model.save_pretrained(tmp)
            self.tokenizer.save(tmp)
            old = self.out_dir / f".old-model-{os.getpid()}"
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        self.env.barrier()
        return dest

    # --- the loop ------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.env.is_main:
            return
        record = {"step": self.step, **record, "time": round(self.elapsed, 3)}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, self.step)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            # A second Ctrl-C stops at once (no checkpoint). Not a SIGTERM after a Ctrl-C: torchrun
            # forwards one to its workers, and they should still save.
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.env.is_main:
                print(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving a "
                      "checkpoint (send again to stop at once)", file=sys.stderr, flush=True)

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def fit(self) -> dict:
        """Train to max_steps (or a SIGINT/SIGTERM: finish the step, checkpoint, return)."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in (self.out_dir / "checkpoints").glob(".tmp-*"):  # from a crashed save
                shutil.rmtree(stale, ignore_errors=True)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        status, evaluated, log_elapsed = "completed", -1, self.elapsed
        old_handlers = self._install_signal_handlers()
        from tqdm.auto import tqdm
        quiet = {} if env.is_main else {"disable": True}  # else tqdm honours TQDM_DISABLE=1
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", mininterval=1.0, **quiet)
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss, stop = self.train_step()
                self.elapsed += time.perf_counter() - t0
                bar.update(1)
                if not math.isfinite(loss):
                    self._log({"event": "nonfinite", "nonfinite_skips": self.nonfinite_skips})
                    if self.nonfinite_in_a_row >= cfg.max_nonfinite:
                        last = latest_checkpoint(self.out_dir)
                        raise NonFiniteLossError(
                            f"the loss was non-finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                            f"{self.step}); stopped without saving. The last good checkpoint is "
                            f"{last or 'none'}. Lower lr, keep grad_clip on, or use dtype='float32'")
                if self.step % cfg.log_interval == 0 and self.log_window[1] > 0:
                    nats, real, positions = self.log_window
                    secs = self.elapsed - log_elapsed
                    rec = {"event": "train", "loss": nats / real, "lr": lr_at(self.step, cfg),
                           "tokens": self.tokens_seen, "tokens_per_s": real / max(secs, 1e-9),
                           "padding_fraction": 1 - real / positions, "grad_norm": self.last_grad_norm,
                           "nonfinite_skips": self.nonfinite_skips}
                    self._log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    self.log_window, log_elapsed = [0.0, 0.0, 0.0], self.elapsed
                done = self.step >= cfg.max_steps
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 or done:
                    if self.evaluate() is not None:
                        evaluated = self.step
                        self._log({"event": "eval", **self.last_eval})
                        if env.is_main:
                            bar.write(f"step {self.step}: val_loss {self.last_eval['val_loss']:.4f}, "
                                      f"val_bpb {self.last_eval['val_bpb']:.4f}")
                if cfg.save_interval and self.step % cfg.save_interval == 0 or done or stop:
                    self.save_checkpoint()
                    self._plot()
                if stop and not done:
                    status = "interrupted"
                    break
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self._tb is not None:
                self._tb.close()
        model_dir = None
        if status == "completed":  # (also when resumed at max_steps: re-export)
            model_dir = self.export_model()
            self._plot()
        ckpt = self.out_dir / "checkpoints" / f"step_{self.step:07d}"
        return {"status": status, "step": self.step, "train_loss": self.last_loss,
                "val_loss": (self.last_eval or {}).get("val_loss"), "val_bpb": (self.last_eval or {}).get("val_bpb"),
                "evaluated_at": evaluated if evaluated >= 0 else None, "tokens_seen": self.tokens_seen,
                "nonfinite_skips": self.nonfinite_skips, "elapsed_s": self.elapsed, "out_dir": str(self.out_dir),
                "checkpoint": str(ckpt) if ckpt.exists() else None,
                "model_dir": str(model_dir) if model_dir else None,
                "metrics": str(self.out_dir / "metrics.jsonl")}

    def _plot(self) -> None:
        if self.env.is_main:
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")


_warned_plot = False


def plot_metrics(metrics_path, png_path) -> bool:
    """Train and validation loss against step, from metrics.jsonl (needs matplotlib)."""
    global _warned_plot
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        if not _warned_plot:
            warnings.warn("matplotlib is not installed, so no loss.png: pip install blockrecurrent[plot]")
            _warned_plot = True
        return False
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    write_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    return True


# ------------------------------------------------------------------------------ entry points

def _check_model_config(saved, now: BlockRecurrentConfig) -> None:
    now = now.to_dict()
    if saved != now:
        saved = saved if isinstance(saved, dict) else {}
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        raise ValueError(f"the model settings differ from the checkpoint's ({{name: (checkpoint, now)}}: "
                         f"{diff}); resume with the checkpoint's settings or start a new out_dir")


def resolve_model_config(model_config: BlockRecurrentConfig, cfg: TrainConfig, vocab_size: int
                         ) -> BlockRecurrentConfig:
    """The model actually trained: the baseline applied, and num_tokens = the tokenizer's vocabulary."""
    return dataclasses.replace(apply_baseline(model_config, cfg.baseline), num_tokens=vocab_size)


def _check_resume(meta: dict, cfg: TrainConfig, path: Path) -> None:
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("train_config"), dict):
        raise ValueError(f"{path / 'trainer.json'} lacks step/train_config; the checkpoint is corrupted")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / 'trainer.json'} has format {meta.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT}; it was not written by this trainer")
    saved, now = meta.get("train_config") or {}, cfg.to_dict()
    written = saved.get("parallel", "ddp")
    if written != cfg.parallel:
        raise ValueError(f"the checkpoint {path} was written with parallel={written!r} (its format "
                         f"follows); resume with parallel={written!r}")
    fixed = _RESUME_FIXED
    if written == "fsdp":  # resharded on resume: the global batch (lanes) is what must stay
        fixed = tuple(k for k in fixed if k != "batch_size")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        old = (meta.get("world_size"), saved.get("batch_size"))
        if not all(isinstance(v, int) for v in old) or old[0] * old[1] != world * cfg.batch_size:
            raise ValueError(f"the checkpoint {path} has {old[0]} processes x batch_size {old[1]} lanes and "
                             f"this run {world} x {cfg.batch_size}; keep processes x batch_size to resume")
    diff = {k: (saved.get(k), now[k]) for k in fixed if saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"these settings fix the data stream and differ from the checkpoint "
                         f"{path} ({{name: (checkpoint, now)}}: {diff}); resume with the checkpoint's "
                         "values or start a new out_dir")
    if meta["step"] > cfg.max_steps:
        raise ValueError(f"the checkpoint {path} is at step {meta['step']}, beyond max_steps="
                         f"{cfg.max_steps}; raise max_steps to continue")


def train(model_config: BlockRecurrentConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Build data, model and trainer, optionally resume from out_dir's latest checkpoint, train.
    Returns a summary: status ("completed" | "interrupted"), step, train_loss, val_loss, val_bpb,
    tokens_seen, paths (out_dir, checkpoint, model_dir, metrics). Everything a user can get
    wrong raises ValueError/TypeError before training starts, and before anything is written."""
    if not isinstance(model_config, BlockRecurrentConfig):
        raise TypeError(f"model_config must be a BlockRecurrentConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    cfg, out = train_config, Path(train_config.out_dir)
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("tensorboard=true needs the tensorboard package: pip install "
                             "blockrecurrent[tensorboard], or set tensorboard=false") from None
    checkpoint, meta = latest_checkpoint(out), None
    if not resume and (checkpoint is not None or (out / "model").exists()):
        raise ValueError(f"{out} already holds a run ({checkpoint or out / 'model'}); pass resume=True "
                         "(brt train --resume) to continue it, or choose another out_dir")
    if resume:
        if checkpoint is None:
            raise ValueError(f"nothing to resume: {out / 'checkpoints'} holds no checkpoint; drop "
                             "--resume to start a new run")
        newer = [p.name for p in _step_dirs(out / "checkpoints") if int(p.name[5:]) > int(checkpoint.name[5:])]
        if newer:
            raise ValueError(f"resuming from {checkpoint.name} would overwrite the newer checkpoints "
                             f"{newer}; delete them or point checkpoints/latest at the newest")
        meta = _read_json(checkpoint / "trainer.json")
        _check_resume(meta, cfg, checkpoint)

    env = setup_distributed(cfg.device)
    try:
        tokenizer = None
        if resume:  # the checkpoint's tokenizer; check the model settings before reading any data
            try:
                tokenizer = D.load_tokenizer(checkpoint)
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read the tokenizer of {checkpoint}: {err}") from None
            _check_model_config(meta.get("model_config"),
                                resolve_model_config(model_config, cfg, tokenizer.vocab_size))
        tokenizer, train_corpus, val_corpus = build_data(cfg, env, tokenizer)
        if model_config.num_tokens != tokenizer.vocab_size and env.is_main and not resume:
            print(f"note: model.num_tokens = {tokenizer.vocab_size}, the tokenizer's vocabulary "
                  f"(was {model_config.num_tokens})", file=sys.stderr)
        model_config = resolve_model_config(model_config, cfg, tokenizer.vocab_size)
        if val_corpus is None and cfg.eval_tokens and env.is_main:
            warnings.warn("the corpus has too few documents for a validation split: no evaluation")
        trainer = Trainer(model_config, cfg, train_corpus, val_corpus, tokenizer, env)
        if resume:
            trainer.load_checkpoint(checkpoint)
            if env.is_main:  # drop metrics logged after the checkpoint by the interrupted run
                metrics = out / "metrics.jsonl"
                if metrics.is_file():
                    keep = [ln for ln in metrics.read_text().splitlines() if _logged_step(ln) <= trainer.step]
                    write_atomic(metrics, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))
        elif env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)  # left by a run that never checkpointed
        env.barrier()
        return trainer.fit()
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def settings_help() -> str:
    """One line listing every setting with its default, for --help."""
    train = ", ".join(f"{f.name}={f.default!r}" for f in fields(TrainConfig))
    model = ", ".join(f.name for f in fields(BlockRecurrentConfig))
    return f"train settings (defaults): {train}. model.* settings: {model}."


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn or foreign line: dropped


def main(argv=None) -> int:
    """`python -m blockrecurrent.train [--config FILE] [--preset NAME] [--resume] [key=value ...]`,
    also under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m blockrecurrent.train", description=__doc__.split("\n")[0],
                                     epilog=settings_help())
    parser.add_argument("--config", help="TOML or YAML file with [model] and [train] sections")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default: the file's, else small)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="train settings, or model.key=value; values are TOML (e.g. betas=[0.9,0.99])")
    args = parser.parse_intermixed_args(argv)  # --resume may follow key=value settings
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        model_config, train_config = load_train_config(args.config, args.preset, args.overrides)
        summary = train(model_config, train_config, resume=args.resume)
    except (ValueError, TypeError, NonFiniteLossError) as err:
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NonFiniteLossError) else 1
    if main_rank:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
