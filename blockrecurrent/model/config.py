"""The model configuration: one dataclass holding every hyperparameter, validated on construction.

Field names follow the seed API (`num_tokens`, `dim`, `block_width`, ...) so that
`BlockRecurrentTransformer(**kwargs)` and `BlockRecurrentConfig(**kwargs)` take the same keywords.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

GATES = ("fixed", "lstm")
GATE_WRITES = ("convex", "normalized")
VARIANTS = ("skip", "dual")
WINDOWS = ("sliding", "block")
MLPS = ("gelu", "geglu")

# Written into config.json beside the fields so that Hugging Face transformers loads the same
# directory (blockrecurrent.hf; the auto_map names the file save_pretrained writes for
# trust_remote_code). from_dict ignores these keys, so files with and without them load.
MODEL_TYPE = "block_recurrent"
HF_SHIM_FILE = "block_recurrent_hf.py"
HF_KEYS = {
    "model_type": MODEL_TYPE,
    "architectures": ["BlockRecurrentForCausalLM"],
    "auto_map": {"AutoConfig": "block_recurrent_hf.BlockRecurrentHFConfig",
                 "AutoModelForCausalLM": "block_recurrent_hf.BlockRecurrentForCausalLM"},
}
_HF_ONLY = (*HF_KEYS, "transformers_version")
# Fields added after models were first saved, with the value that describes a file written
# before them (not the current default): such a file's weights were made with these.
SAVED_BEFORE_FIELD = {"mlp": "gelu", "state_self_attention": True, "gate_write": "convex"}


@dataclass
class BlockRecurrentConfig:
    num_tokens: int = 257  # vocabulary size (byte tokenizer: 256 bytes + a document-start token)
    dim: int = 512  # model width E
    depth: int = 6  # number of layers
    dim_head: int = 64  # width of one attention head
    heads: int = 8  # attention heads
    max_seq_len: int = 1024  # training segment: tokens per backprop step (paper: 4096 = 8 blocks)
    block_width: int = 512  # block W = attention window; the state advances once per block
    # Which keys of [previous block; block] a token reads: "sliding" the last W tokens (itself
    # included), "block" all of the previous block and its own block up to itself (W to 2W-1
    # tokens, the official code's and the port's window). Same cost either way.
    window: str = "sliding"
    num_state_vectors: int = 512  # state slots S of each recurrent layer
    # 1-based indices of the recurrent layers; () gives the paper's "Slide" baseline.
    # None picks the layer two below the top, as the paper does (layer 10 of 12).
    recurrent_layers: tuple[int, ...] | None = None
    use_compressed_mem: bool = False  # also attend to older blocks, compressed (Rae et al. 2019)
    compressed_mem_factor: int = 4  # tokens per compressed slot
    use_flash_attn: bool = True  # fused scaled_dot_product_attention instead of the plain path
    gate: str = "fixed"  # state gate: "fixed" (learned bias) or "lstm" (input/forget gates)
    variant: str = "skip"  # "skip": gate the attention output only; "dual": + state MLP and gate
    # How the fixed gate writes its candidate z: "normalized" s*g + z*sqrt(1-g^2), which keeps
    # every channel's variance the same whatever its g (LRU's input normalisation), so slow
    # channels still hold what is written, or "convex" s*g + z*(1-g) (the paper). Fixed gate
    # only: the lstm gate's input gate sets its own (docs/design.md, "The fixed gate's write").
    gate_write: str = "normalized"
    # The fixed gate's channels start with retention timescales spread from 2 to this many
    # blocks (chrono init: cell.retention_bias). Longer timescales let the recall probe's memory
    # reach further beyond its trained distance (experiments/length_generalisation.md); their
    # effect on language modelling is not measured yet, so the default stays 64.
    gate_max_blocks: float = 64.0
    # The state's update also attends among the state vectors (the paper's cell). Off (default),
    # the candidate reads only the tokens and slots do not mix, which stores several keys apart
    # (docs/design.md, "Several keys").
    state_self_attention: bool = False
    mlp_mult: float = 4.0  # MLP hidden width = mlp_mult * dim ("geglu": 2/3 of it per half)
    # "geglu": a GELU-gated linear unit, each half 2/3 of the width (the same parameters and
    # FLOPs as "gelu", Linear-GELU-Linear; docs/design.md, "The MLP is a GEGLU").
    mlp: str = "geglu"
    dropout: float = 0.0  # residual dropout on the token side (never on the state side)
    tie_embeddings: bool = False  # share the input embedding with the output projection
    rotary_base: float = 10000.0  # rotary position base (token self-attention only)
    # free-form metadata, saved with the model
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        def check(ok: bool, name: str, fix: str):
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: {fix}")

        for name in ("num_tokens", "dim", "depth", "dim_head", "heads", "max_seq_len",
                     "block_width", "num_state_vectors", "compressed_mem_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
            check(value > 0, name, "must be a positive integer")
        check(self.max_seq_len % self.block_width == 0, "max_seq_len",
              f"must be a multiple of block_width={self.block_width}")
        check(self.gate in GATES, "gate", f"choose one of {GATES}")
        check(self.variant in VARIANTS, "variant", f"choose one of {VARIANTS}")
        check(self.gate_write in GATE_WRITES, "gate_write", f"choose one of {GATE_WRITES}")
        for f in dataclasses.fields(self):  # every switch (a field whose default is a bool)
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"{f.name} must be a bool, got {getattr(self, f.name)!r}")
        check(self.window in WINDOWS, "window", f"choose one of {WINDOWS}")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(self.mlp_mult > 0, "mlp_mult", "must be positive")
        check(self.gate_max_blocks > 2, "gate_max_blocks", "must be more than 2 blocks")
        check(self.mlp in MLPS, "mlp", f"choose one of {MLPS}")
        check(self.rotary_base > 1, "rotary_base", "must be greater than 1")
        if self.use_compressed_mem:
            check(self.block_width % self.compressed_mem_factor == 0, "compressed_mem_factor",
                  f"must divide block_width={self.block_width}")
        if self.recurrent_layers is None:
            self.recurrent_layers = (max(1, self.depth - 2),)
        if isinstance(self.recurrent_layers, int) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.recurrent_layers
        ):
            raise TypeError("recurrent_layers must be a tuple of ints, got "
                            f"{self.recurrent_layers!r}")
        self.recurrent_layers = tuple(sorted(self.recurrent_layers))
        check(all(1 <= i <= self.depth for i in self.recurrent_layers), "recurrent_layers",
              f"layers are numbered 1..depth={self.depth}")
        check(len(set(self.recurrent_layers)) == len(self.recurrent_layers), "recurrent_layers",
              "each layer may appear once")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    # --- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recurrent_layers"] = list(self.recurrent_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockRecurrentConfig":
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config has model_type={d['model_type']!r}, not {MODEL_TYPE!r}: "
                             f"it is not a Block-Recurrent Transformer")
        d = {k: v for k, v in d.items() if k not in _HF_ONLY}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        d = dict(d)
        d = {**SAVED_BEFORE_FIELD, **d}
        if d.get("recurrent_layers") is not None:
            d["recurrent_layers"] = tuple(d["recurrent_layers"])
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BlockRecurrentConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def as_saved_now(saved):
    """A model config dict read back from a file (a checkpoint's trainer.json, a summary.json) as
    to_dict() would write it today: a field added since takes the value from_dict gives configs
    without it (SAVED_BEFORE_FIELD, not the current default), so a file written before the field
    existed still compares equal to the settings it was trained with. Returned unchanged when it
    is not a valid config (the caller's comparison then reports the difference)."""
    if isinstance(saved, dict):
        try:
            return BlockRecurrentConfig.from_dict(saved).to_dict()
        except (TypeError, ValueError):
            pass
    return saved


# Named presets. "small" trains in minutes on a 2-core CPU; "paper-150m" is the paper's setup
# (12 layers, recurrent layer 10, E=1024, 8x128 heads, W=S=512, segment 4096) with a 32k vocabulary.
PRESETS: dict[str, dict] = {
    "tiny": dict(num_tokens=257, dim=64, depth=2, dim_head=16, heads=4, max_seq_len=64,
                 block_width=16, num_state_vectors=16, recurrent_layers=(1,)),
    "small": dict(num_tokens=257, dim=256, depth=4, dim_head=64, heads=4, max_seq_len=512,
                  block_width=128, num_state_vectors=128, recurrent_layers=(3,)),
    # The recall probe's model (evaluate/probes.py, `brt probe`): 2 layers, dim 64, W = S = 16,
    # layer 2 recurrent, a 64-token vocabulary.
    "probe": dict(num_tokens=64, dim=64, depth=2, dim_head=16, heads=4, max_seq_len=64,
                  block_width=16, num_state_vectors=16, recurrent_layers=(2,)),
    "paper-150m": dict(num_tokens=32000, dim=1024, depth=12, dim_head=128, heads=8,
                       max_seq_len=4096, block_width=512, num_state_vectors=512,
                       recurrent_layers=(10,), dropout=0.05),
}


def preset(name: str, **overrides) -> BlockRecurrentConfig:
    """A named preset, with keyword overrides (`preset("small", depth=6)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return BlockRecurrentConfig(**{**PRESETS[name], **overrides})
