"""BlockRecurrentTransformer: embeddings, a stack of layers, forward over blocks, save/load.

Axis letters: b batch, n tokens of a call, r recurrent layers, s state slots, e model width,
l cached tokens, h heads, d head width.

    logits, mems, states = model(seq, xl_memories=mems, states=states, reset=None)

`mems` (XLMemories) holds every layer's cache of the previous block and the current partial
block, and the tokens seen of each row's document; `states` (r, b, s, e) the recurrent states.
Both come back detached, so calls chain without growing a graph; within one call gradients flow
through the state across all its blocks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from . import decode
from .attention import WindowAttention, WindowPlan, stack
from .cell import FixedGate, LSTMGate, RecurrentCell, mlp, retention_bias
from .config import HF_KEYS, HF_SHIM_FILE, BlockRecurrentConfig

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# What transformers imports from a saved directory under trust_remote_code (see config.HF_KEYS):
# the code stays in the installed package, so a saved directory never holds a stale copy of it.
_HF_SHIM = ('"""Lets transformers load this directory with trust_remote_code=True."""\n'
            "from blockrecurrent.hf import BlockRecurrentForCausalLM, BlockRecurrentHFConfig\n")


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

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def cache_len(self) -> int:
        return self.keys[0].shape[1]

    def _map(self, fn) -> "XLMemories":
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            out[f.name] = (None if val is None else fn(val) if isinstance(val, Tensor)
                           else tuple(fn(t) for t in val))
        return XLMemories(**out)

    def detach(self) -> "XLMemories":
        return self._map(Tensor.detach)

    def to(self, *args, **kwargs) -> "XLMemories":
        return self._map(lambda t: t.to(*args, **kwargs))

    def select(self, rows) -> "XLMemories":
        """The memories of some batch rows (an index, slice or index tensor)."""
        return self._map(lambda t: t[rows])

    @classmethod
    def cat(cls, parts: list["XLMemories"]) -> "XLMemories":
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
        for f in fields(cls):
            vals = [getattr(p, f.name) for p in parts]
            if any(v is None for v in vals):
                out[f.name] = None
            elif isinstance(vals[0], Tensor):
                out[f.name] = torch.cat(vals)
            else:
                out[f.name] = tuple(torch.cat(ts) for ts in zip(*vals))
        if out["state_keys"] is None or out["state_values"] is None or \
                out["state_source"] is None:
            out["state_keys"] = out["state_values"] = out["state_source"] = None
        return cls(**out)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor mapping (for safetensors checkpoints)."""
        out = {"lengths": self.lengths}
        for f in fields(self):
            val = getattr(self, f.name)
            if f.name != "lengths" and val is not None:
                out.update({f"{f.name}.{i}": t.contiguous() for i, t in enumerate(val)})
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> "XLMemories":
        kw = {"lengths": d["lengths"]}
        for f in fields(cls):
            if f.name != "lengths":
                items = sorted((int(k.rsplit(".", 1)[1]), t) for k, t in d.items()
                               if k.startswith(f.name + "."))
                kw[f.name] = tuple(t for _, t in items) if items else None
        return cls(**kw)


def _detached(t: Tensor) -> Tensor:
    """t cut from its graph; the same object when it has none, so that a decoding step's cache
    keeps the buffer it can grow in place (see attention.append)."""
    return t.detach() if t.requires_grad else t


class Layer(nn.Module):
    """Pre-norm transformer layer; the attention is the recurrent cell in recurrent layers."""

    def __init__(self, config: BlockRecurrentConfig, recurrent: bool):
        super().__init__()
        self.recurrent = recurrent
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = RecurrentCell(config) if recurrent else WindowAttention(config)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.mlp = mlp(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: tuple, plan: WindowPlan, state: Tensor | None = None,
                state_kv: tuple[Tensor, Tensor] | None = None):
        if self.recurrent:
            y, cache, state, state_kv = self.attn(self.attn_norm(x), cache, state, plan, state_kv)
        else:
            y, cache = self.attn(self.attn_norm(x), cache, plan)
        drop = self.drop if self.training else (lambda t: t)  # no call per decoding step
        x = x + drop(y)
        x = x + drop(self.mlp(self.mlp_norm(x)))
        return x, cache, state, state_kv


class BlockRecurrentTransformer(nn.Module):
    def __init__(self, config: BlockRecurrentConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = BlockRecurrentConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        elif not isinstance(config, BlockRecurrentConfig):
            raise TypeError(f"config must be a BlockRecurrentConfig, got {type(config).__name__}")
        self.config = config
        # One-token decoding steps take blockrecurrent.decode.step (False: the general path,
        # which computes the same function; kept as the reference and for benchmarks).
        self.fast_decode = True
        self._compiled_decode = None  # see compile_decode
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(
            Layer(config, recurrent=(i + 1) in config.recurrent_layers) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        if config.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Every initialisation of the model, in one place.

        Linear layers start at std 1/sqrt(fan_in), the variance scaling of the official code
        (meliad). Under Adam, whose steps are about lr per weight whatever the weight's size,
        small weights take large relative steps: with GPT-2's std 0.02 a step of lr 2e-3 moves a
        weight by 10% of its size, and on the recall probe the state lost in the first 50 steps
        what it held at initialisation (linear probes of the key fell from 0.99 to 0.4) and
        recall stayed at chance. Embeddings keep std 0.02: their fast relative steps let the
        tokens to be remembered become distinct early (the probe learns faster than at std 1)."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                fan_in = module.weight[0].numel()
                nn.init.normal_(module.weight, std=fan_in ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        # After the generic loop: these override what it set for their children.
        for module in self.modules():
            if isinstance(module, RecurrentCell):
                nn.init.normal_(module.state_ids, std=1.0)  # paper: ids added after the norm
                nn.init.normal_(module.initial_state, std=0.1)
                module.scales.fill_(cfg.dim_head ** 0.5)
            elif isinstance(module, FixedGate):
                module.bias.copy_(retention_bias(module.bias.shape))
            elif isinstance(module, LSTMGate):
                # The official code's gate kernels: variance scaling 0.1, bias N(0, 0.1), so the
                # gates start near their +1 (forget) and -1 (input) offsets.
                fan_in = module.proj.weight.shape[1]
                nn.init.normal_(module.proj.weight, std=(0.1 / fan_in) ** 0.5)
                nn.init.normal_(module.proj.bias, std=0.1)

    @property
    def recurrent_cells(self) -> list[RecurrentCell]:
        return [layer.attn for layer in self.layers if layer.recurrent]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.to_logits.weight.numel()
        return n

    def initial_states(self, batch_size: int) -> Tensor:
        """(r, b, s, e): the learned document-start state of every recurrent layer."""
        cells = self.recurrent_cells
        if not cells:
            return self.token_emb.weight.new_zeros(0, batch_size, self.config.num_state_vectors,
                                                   self.config.dim)
        return torch.stack([c.initial_state.expand(batch_size, -1, -1) for c in cells])

    # --- input checks --------------------------------------------------------------------
    def _check_inputs(self, seq, mems, states, reset):
        cfg = self.config
        if not isinstance(seq, Tensor):
            raise TypeError(f"seq must be a torch.Tensor of token ids, got {type(seq).__name__}")
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise TypeError(f"seq must hold integer token ids, got dtype {seq.dtype}")
        if seq.dim() != 2:
            raise ValueError(f"seq must have shape (batch, length), got {tuple(seq.shape)}")
        b, n = seq.shape
        if b == 0 or n == 0:
            raise ValueError(f"seq must not be empty, got shape {tuple(seq.shape)}")
        lo, hi = (int(t) for t in torch.aminmax(seq))
        if lo < 0 or hi >= cfg.num_tokens:
            raise ValueError(f"token ids must lie in [0, num_tokens={cfg.num_tokens}), "
                             f"got values in [{lo}, {hi}]")
        if mems is not None:
            if not isinstance(mems, XLMemories):
                raise TypeError(f"xl_memories must be the XLMemories returned by the model, "
                                f"got {type(mems).__name__}")
            shape = (b, cfg.heads, cfg.dim_head)
            if len(mems.keys) != cfg.depth or len(mems.values) != cfg.depth:
                raise ValueError(f"xl_memories hold {len(mems.keys)} layers, the model has "
                                 f"depth={cfg.depth}; were they made by another model?")
            for t in mems.keys + mems.values:
                if (t.shape[0], t.shape[2], t.shape[3]) != shape or t.shape[1] != mems.cache_len:
                    raise ValueError(f"xl_memories cache of shape {tuple(t.shape)} does not fit a "
                                     f"batch of {b} and heads x dim_head = {shape[1:]}")
            if mems.cache_len >= 2 * cfg.block_width or mems.lengths.shape != (b,):
                raise ValueError(f"xl_memories do not match block_width={cfg.block_width} and "
                                 f"batch size {b}")
            if (mems.compressed_keys is not None) != cfg.use_compressed_mem:
                raise ValueError("xl_memories and the model disagree on use_compressed_mem")
            if cfg.use_compressed_mem:
                want = (b, cfg.block_width, cfg.heads, cfg.dim_head)
                for t in mems.compressed_keys + mems.compressed_values:
                    if tuple(t.shape) != want:
                        raise ValueError(f"compressed memory of shape {tuple(t.shape)}, "
                                         f"expected {want}")
            if mems.state_keys is not None:
                r, want = len(cfg.recurrent_layers), (b, cfg.num_state_vectors, cfg.heads,
                                                      cfg.dim_head)
                parts = (mems.state_keys, mems.state_values, mems.state_source)
                if any(p is None or len(p) != r for p in parts) or any(
                        tuple(t.shape) != want for t in mems.state_keys + mems.state_values):
                    raise ValueError(f"xl_memories carry state keys/values that do not fit "
                                     f"{r} recurrent layers of shape {want}")
        if states is not None:
            if not isinstance(states, Tensor):
                raise TypeError(f"states must be a tensor, got {type(states).__name__}")
            want = (len(cfg.recurrent_layers), b, cfg.num_state_vectors, cfg.dim)
            if tuple(states.shape) != want:
                raise ValueError(f"states of shape {tuple(states.shape)} do not fit this model and "
                                 f"batch: expected (recurrent layers, batch, num_state_vectors, "
                                 f"dim) = {want}")
        if reset is not None:
            if not isinstance(reset, Tensor) or reset.dtype != torch.bool or reset.shape != (b,):
                raise TypeError(f"reset must be a bool tensor of shape ({b},)")
            partial = mems is not None and mems.cache_len % cfg.block_width != 0
            if partial and bool(reset.any()):
                raise ValueError("reset rows must start on a block boundary: the carried memories "
                                 "end inside a block; start new documents in a new call after "
                                 "feeding whole blocks")

    # --- forward -------------------------------------------------------------------------
    def forward(self, seq: Tensor, xl_memories: XLMemories | None = None,
                states: Tensor | None = None, reset: Tensor | None = None,
                logits_to_keep: int | None = None):
        """seq (b, n) token ids of any length. reset (b,) bool marks rows starting a new document:
        they start from the learned initial state and an empty cache. logits_to_keep: compute the
        logits of the last positions only (prefill needs one; saves a (b, n, vocab) tensor).
        Returns logits (b, n, num_tokens), the next XLMemories and states (r, b, s, e)."""
        if not decode.trusted():
            self._check_inputs(seq, xl_memories, states, reset)
        if logits_to_keep is not None and (isinstance(logits_to_keep, bool) or
                                           not isinstance(logits_to_keep, int) or logits_to_keep < 1):
            raise ValueError(f"logits_to_keep must be a positive int or None, got {logits_to_keep!r}")
        if self.fast_decode and decode.eligible(self, seq, xl_memories, reset):
            return decode.step(self, seq, xl_memories,
                               self.initial_states(seq.shape[0]) if states is None else states)
        b, n = seq.shape
        cfg, dev = self.config, seq.device
        mems = xl_memories
        lengths = mems.lengths.to(dev) if mems is not None else torch.zeros(b, dtype=torch.long,
                                                                              device=dev)
        if states is None:
            states = self.initial_states(b)
        if reset is not None:
            init = self.initial_states(b)
            reset = reset.to(dev)
            lengths = torch.where(reset, 0, lengths)
            states = torch.where(reset[None, :, None, None], init, states.to(init.dtype))
        plan = WindowPlan(cfg, mems.cache_len if mems is not None else 0, n, lengths)

        x = self.token_emb(seq)
        caches, new_states, new_kv, r = [], [], [], 0
        for i, layer in enumerate(self.layers):
            cache = (None, None, None) if mems is None else (
                mems.keys[i], mems.values[i],
                (mems.compressed_keys[i], mems.compressed_values[i])
                if mems.compressed_keys is not None else None)
            state, kv = (states[r], self._cached_state_kv(mems, r, states[r])) if layer.recurrent \
                else (None, None)
            x, cache, state, kv = layer(x, cache, plan, state, kv)
            if layer.recurrent:
                new_states.append(state)
                new_kv.append(kv)
                r += 1
            caches.append(cache)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        logits = self.to_logits(self.norm(x))

        comp = cfg.use_compressed_mem
        states_out = (stack(new_states, 0) if new_states else states).detach()
        keep_kv = bool(new_kv) and new_kv[0] is not None  # all layers end in the same block
        new_mems = XLMemories(
            keys=tuple(_detached(c[0]) for c in caches), values=tuple(_detached(c[1]) for c in caches),
            lengths=lengths + n,
            compressed_keys=tuple(c[2][0].detach() for c in caches) if comp else None,
            compressed_values=tuple(c[2][1].detach() for c in caches) if comp else None,
            state_keys=tuple(kv[0].detach() for kv in new_kv) if keep_kv else None,
            state_values=tuple(kv[1].detach() for kv in new_kv) if keep_kv else None,
            state_source=tuple(states_out.unbind(0)) if keep_kv else None)
        return logits, new_mems, states_out

    @staticmethod
    def _cached_state_kv(mems: XLMemories | None, r: int, state: Tensor):
        """The (K_s, V_s) the last call computed for recurrent layer r, if `state` is the state
        they came from (a cheap comparison of S x E values against an S x E x 2hd projection).
        Only without autograd: the cached keys are detached, and a training call must send
        gradients through its own projections."""
        if mems is None or mems.state_keys is None or torch.is_grad_enabled():
            return None
        src = mems.state_source[r]
        if decode.trusted() and decode.same_tensor(src, state):
            return mems.state_keys[r], mems.state_values[r]
        if src.shape != state.shape or src.dtype != state.dtype or src.device != state.device \
                or not torch.equal(src, state):
            return None
        return mems.state_keys[r], mems.state_values[r]

    # --- save / load ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (weights only: nothing is ever unpickled), and
        the small file through which transformers loads the directory (blockrecurrent.hf)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            tensors.pop("to_logits.weight")  # shared with token_emb.weight
        # Temporary names and rename: an interrupted save never leaves a half-written file.
        tmp_w, tmp_c = directory / (WEIGHTS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps({**HF_KEYS, **self.config.to_dict()}, indent=2))
        (directory / HF_SHIM_FILE).write_text(_HF_SHIM)
        os.replace(tmp_w, directory / WEIGHTS_FILE)
        os.replace(tmp_c, directory / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        map_location: str | torch.device = "cpu") -> "BlockRecurrentTransformer":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"{directory} is not a saved model: {name} is missing")
        try:
            config = BlockRecurrentConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {err}") from None
        model = cls(config)
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from None
        if config.tie_embeddings:
            tensors["to_logits.weight"] = tensors.get("token_emb.weight")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = [k for k in expected if k in tensors and tensors[k] is not None
                 and tensors[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"weights in {directory} do not match its config: missing {missing}, "
                             f"unexpected {unexpected}, wrong shape {wrong}")
        model.load_state_dict(tensors)
        return model.to(map_location)

    # --- generation ----------------------------------------------------------------------
    def compile_decode(self, enabled: bool = True, **compile_kwargs) -> "BlockRecurrentTransformer":
        """Run decoding steps as one torch.compile graph over fixed-size caches
        (blockrecurrent.decode.CompiledStep); the same function as the eager step, compiled on
        the first step of each batch size. enabled=False goes back to the eager step."""
        from .decode import CompiledStep

        self._compiled_decode = CompiledStep(self, **compile_kwargs) if enabled else None
        return self

    def generate(self, prompt, max_new_tokens: int, **kwargs):
        """New token ids after `prompt`, with cached decoding: see generation.generate."""
        from .generation import generate  # lazy: generation imports this module

        return generate(self, prompt, max_new_tokens, **kwargs)
