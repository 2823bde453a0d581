"""XLMemories: what the model carries from one call to the next, for every layer.

Axis letters: b batch, l cached tokens, h heads, d head width, s state slots, e model width, W the
block width. One layer's part of the memories is its `LayerCache` (`XLMemories.layer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .attention import GrowthBuffer, LayerCache
from .config import BlockRecurrentConfig

# XLMemories fields that are not tensors to map, concatenate or save: what a decoding step
# carries to the next (in-place growth buffers, a validity flag); dropped by every copy.
_CARRIED = frozenset({"key_buffers", "value_buffers", "all_valid"})


@dataclass
class XLMemories:
    """Per-layer caches carried from one call to the next (tuples have one entry per layer)."""
    keys: tuple[Tensor, ...]  # (b, l, h, d), l < 2W: previous complete block + partial block
    values: tuple[Tensor, ...]
    lengths: Tensor  # (b,) int64: tokens of each row's current document seen so far
    compressed_keys: tuple[Tensor, ...] | None = None  # (b, W, h, d) when use_compressed_mem
    compressed_values: tuple[Tensor, ...] | None = None
    # Per recurrent layer, when the last call ended inside a block: the unit keys and values
    # (b, s, h, d) of the state it returned, and that state (b, s, e), so the next call can
    # check that it is given the same state before reusing them.
    state_keys: tuple[Tensor, ...] | None = None
    state_values: tuple[Tensor, ...] | None = None
    state_source: tuple[Tensor, ...] | None = None
    # Per layer, the buffers that keys/values grow into in place when decoding (see
    # attention.append); never copied, so a copy of the memories copies on its first step.
    key_buffers: tuple[GrowthBuffer | None, ...] | None = field(default=None, repr=False)
    value_buffers: tuple[GrowthBuffer | None, ...] | None = field(default=None, repr=False)
    # Set by the decoding step: every row's document started at or before the cache
    # (WindowPlan.all_valid), so the next step need not compare lengths (model._can_step).
    all_valid: bool = field(default=False, repr=False)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def cache_len(self) -> int:
        return self.keys[0].shape[1]

    def check_fits(self, cfg: BlockRecurrentConfig, b: int) -> None:
        """Raise ValueError unless these memories fit a model of config `cfg` and a batch of b."""
        shape = (b, cfg.heads, cfg.dim_head)
        if self.lengths.dim() != 1 or self.batch_size != b:
            raise ValueError(f"xl_memories hold {self.batch_size} rows (lengths shape "
                             f"{tuple(self.lengths.shape)}) but the input has batch size {b}")
        if len(self.keys) != cfg.depth or len(self.values) != cfg.depth:
            raise ValueError(f"xl_memories hold {len(self.keys)} layers, the model has "
                             f"depth={cfg.depth}; were they made by another model?")
        for t in self.keys + self.values:
            if (t.shape[0], t.shape[2], t.shape[3]) != shape or t.shape[1] != self.cache_len:
                raise ValueError(f"xl_memories cache of shape {tuple(t.shape)} does not fit a "
                                 f"batch of {b} and heads x dim_head = {shape[1:]}")
        if self.cache_len >= 2 * cfg.block_width or self.lengths.shape != (b,):
            raise ValueError(f"xl_memories do not match block_width={cfg.block_width} and "
                             f"batch size {b}")
        if (self.compressed_keys is not None) != cfg.use_compressed_mem:
            raise ValueError("xl_memories and the model disagree on use_compressed_mem")
        if cfg.use_compressed_mem:
            want = (b, cfg.block_width, cfg.heads, cfg.dim_head)
            for t in self.compressed_keys + self.compressed_values:
                if tuple(t.shape) != want:
                    raise ValueError(f"compressed memory of shape {tuple(t.shape)}, "
                                     f"expected {want}")
        if self.state_keys is not None:
            r, want = len(cfg.recurrent_layers), (b, cfg.num_state_vectors, cfg.heads,
                                                  cfg.dim_head)
            parts = (self.state_keys, self.state_values, self.state_source)
            if any(p is None or len(p) != r for p in parts) or any(
                    tuple(t.shape) != want for t in self.state_keys + self.state_values):
                raise ValueError(f"xl_memories carry state keys/values that do not fit "
                                 f"{r} recurrent layers of shape {want}")

    def layer(self, i: int) -> LayerCache:
        """Layer i's cache."""
        comp = (None if self.compressed_keys is None
                else (self.compressed_keys[i], self.compressed_values[i]))
        return LayerCache(self.keys[i], self.values[i], comp,
                          self.key_buffers[i] if self.key_buffers is not None else None,
                          self.value_buffers[i] if self.value_buffers is not None else None)

    @staticmethod
    def _data_fields():
        return [f for f in fields(XLMemories) if f.name not in _CARRIED]

    def _map(self, fn) -> XLMemories:
        out = {}
        for f in self._data_fields():
            val = getattr(self, f.name)
            out[f.name] = (None if val is None else fn(val) if isinstance(val, Tensor)
                           else tuple(fn(t) for t in val))
        return XLMemories(**out)

    def detach(self) -> XLMemories:
        return self._map(Tensor.detach)

    def to(self, *args, **kwargs) -> XLMemories:
        return self._map(lambda t: t.to(*args, **kwargs))

    def select(self, rows) -> XLMemories:
        """The memories of some batch rows (an index, slice or index tensor)."""
        return self._map(lambda t: t[rows])

    @classmethod
    def cat(cls, parts: list[XLMemories]) -> XLMemories:
        """The rows of several memories as one batch (e.g. prompts of different lengths, each
        prefilled alone, decoded together). Their caches must have the same length: rows then
        sit at the same position in their blocks. Cached state keys/values are kept when every
        part has them (else the next call projects the state again)."""
        if not parts:
            raise ValueError("XLMemories.cat needs at least one XLMemories")
        lens = sorted({p.cache_len for p in parts})
        if len(lens) > 1:
            raise ValueError(f"cannot batch memories with caches of different lengths {lens}: "
                             f"their rows are at different positions in their blocks")
        if len({p.compressed_keys is None for p in parts}) > 1:
            raise ValueError("cannot batch memories with and without compressed memory")
        out = {}
        for f in cls._data_fields():
            vals = [getattr(p, f.name) for p in parts]
            if any(v is None for v in vals):
                out[f.name] = None
            elif isinstance(vals[0], Tensor):
                out[f.name] = torch.cat(vals)
            else:
                out[f.name] = tuple(torch.cat(ts) for ts in zip(*vals, strict=True))
        if out["state_keys"] is None or out["state_values"] is None or \
                out["state_source"] is None:
            out["state_keys"] = out["state_values"] = out["state_source"] = None
        return cls(**out)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor mapping (for safetensors checkpoints)."""
        out = {"lengths": self.lengths}
        for f in self._data_fields():
            val = getattr(self, f.name)
            if f.name != "lengths" and val is not None:
                out.update({f"{f.name}.{i}": t.contiguous() for i, t in enumerate(val)})
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> XLMemories:
        kw = {"lengths": d["lengths"]}
        for f in cls._data_fields():
            if f.name != "lengths":
                items = sorted((int(k.rsplit(".", 1)[1]), t) for k, t in d.items()
                               if k.startswith(f.name + "."))
                kw[f.name] = tuple(t for _, t in items) if items else None
        return cls(**kw)
