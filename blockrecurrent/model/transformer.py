"""BlockRecurrentTransformer: embeddings, a stack of layers, forward over blocks, save/load.

Axis letters: b batch, n tokens of a call, r recurrent layers, s state slots, e model width,
l cached tokens, h heads, d head width.

    logits, mems, states = model(seq, xl_memories=mems, states=states, reset=None)

The call returns a `ModelOutput` (a NamedTuple: it unpacks as above). `mems` (XLMemories) holds
every layer's cache of the previous block and the current partial block (`LayerCache`, one per
layer through `XLMemories.layer`), and the tokens seen of each row's document; `states`
(r, b, s, e) the recurrent states. Both come back detached, so calls chain without growing a
graph; within one call gradients flow through the state across all its blocks. One name per
concept: "memories" (`mems`, `xl_memories` as the keyword) for XLMemories, "cache" for one
layer's part of them, "states" for the recurrent states.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CacheStep, LayerCache, WindowPlan, stack
from .cell import STATE_READ, FixedGate, LSTMGate, RecurrentCell, StateKV, retention_bias
from .config import BlockRecurrentConfig
from .layer import Layer
from .memories import XLMemories
from .saving import load_model, save_model

# The state's candidate z = state_out(attention outputs) starts at this multiple of fan-in
# scale, so that it is not buried under the initial state in the slow gate channels
# (docs/design.md, "Initialisation").
CANDIDATE_GAIN = 4.0

# The state's read of the tokens starts this many times sharper than unit-spread scores, so that
# a slot can pick a token to write in a short run (docs/design.md, "Initialisation").
STATE_READ_GAIN = 4.0

__all__ = ["BlockRecurrentTransformer", "ModelOutput"]

class ModelOutput(NamedTuple):
    """What the model returns; unpacks as `logits, mems, states = model(...)`."""
    logits: Tensor  # (b, n, num_tokens), or (b, logits_to_keep, num_tokens)
    mems: XLMemories  # the memories for the next call
    states: Tensor  # (r, b, s, e) the recurrent states for the next call


def _detached(t: Tensor) -> Tensor:
    """t cut from its graph; the same object when it has none, so that a decoding step's cache
    stays the view that its buffer may extend in place (see attention.GrowthBuffer)."""
    return t.detach() if t.requires_grad else t


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """a and b view the same memory the same way, so hold the same values (a comparison of
    values costs ~30 us at batch 1 and ~1.5 ms at batch 32 per step on a 2-core CPU)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


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
        # One-token calls take `step` (False: the general path, which computes the same
        # function; kept as the reference and for benchmarks).
        self.fast_decode = True
        self._compiled_decode = None  # see compile_decode
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(Layer(config, recurrent=(i + 1) in config.recurrent_layers)
                                    for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        if config.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Every initialisation of the model, in one place. Linear layers start at std
        1/sqrt(fan_in), the variance scaling of the official code (meliad), rather than GPT-2's
        0.02, under which Adam's steps are large relative to the weights; embeddings keep 0.02
        (docs/design.md, "Initialisation")."""
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
                module.scales[STATE_READ].mul_(STATE_READ_GAIN)
                fan_in = module.state_out.weight.shape[1]
                nn.init.normal_(module.state_out.weight, std=CANDIDATE_GAIN * fan_in ** -0.5)
            elif isinstance(module, FixedGate):
                module.bias.copy_(retention_bias(module.bias.shape, cfg.gate_max_blocks))
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
    def _check_inputs(self, seq: Tensor, mems: XLMemories | None, states: Tensor | None,
                      reset: Tensor | None) -> None:
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
            mems.check_fits(cfg, b)
        if states is not None:
            if not isinstance(states, Tensor):
                raise TypeError(f"states must be a tensor, got {type(states).__name__}")
            want = (len(cfg.recurrent_layers), b, cfg.num_state_vectors, cfg.dim)
            if tuple(states.shape) != want:
                raise ValueError(f"states of shape {tuple(states.shape)} do not fit this model and "
                                 f"batch size {b}: expected (recurrent layers, batch, "
                                 f"num_state_vectors, dim) = {want}")
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
                logits_to_keep: int | None = None, own_outputs: bool = False) -> ModelOutput:
        """seq (b, n) token ids of any length. reset (b,) bool marks rows starting a new document:
        they start from the learned initial state and an empty cache. logits_to_keep: compute the
        logits of the last positions only (prefill needs one; saves a (b, n, vocab) tensor).
        own_outputs=True is for a decoding loop that feeds the model its own outputs: xl_memories
        and states exactly as the last call returned them, tokens sampled from its logits; the
        input checks are skipped (they cannot fail) and the cached state keys/values are found by
        identity instead of by comparing values.
        Returns logits (b, n, num_tokens), the next XLMemories and states (r, b, s, e)."""
        if not own_outputs:
            self._check_inputs(seq, xl_memories, states, reset)
        if logits_to_keep is not None and (isinstance(logits_to_keep, bool) or
                                           not isinstance(logits_to_keep, int)
                                           or logits_to_keep < 1):
            raise ValueError(f"logits_to_keep must be a positive int or None, "
                             f"got {logits_to_keep!r}")
        if reset is None and self._can_step(seq, xl_memories):
            return self._step(seq, xl_memories, states, same_states=own_outputs)
        mems = xl_memories
        lengths, states = self._start(seq, mems, states, reset)
        plan = WindowPlan(self.config, mems.cache_len if mems is not None else 0, seq.shape[1],
                          lengths)
        x = self.token_emb(seq)
        caches, new_states, new_kv, r = [], [], [], 0
        for i, layer in enumerate(self.layers):
            cache = LayerCache() if mems is None else mems.layer(i)
            if layer.recurrent:
                state, state_kv = states[r], self._cached_state_kv(mems, r, states[r])
            else:
                state, state_kv = None, None
            x, cache, state, state_kv = layer(x, cache, plan, state, state_kv)
            if layer.recurrent:
                new_states.append(state)
                new_kv.append(state_kv)
                r += 1
            caches.append(cache)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        states_out = (stack(new_states, 0) if new_states else states).detach()
        return self._output(x, caches, new_kv, lengths + seq.shape[1], states_out)

    # --- the decoding step ---------------------------------------------------------------
    def _can_step(self, seq: Tensor, xl_memories: XLMemories | None) -> bool:
        """Whether model(seq, xl_memories, states) is a call that `_step` computes: one token that
        completes no block, in documents that started at or before the cache, without autograd,
        dropout, autocast or compressed memory (`WindowPlan.is_step`)."""
        mems = xl_memories
        if (not self.fast_decode or mems is None or torch.is_grad_enabled()
                or (self.training and self.config.dropout > 0)
                or torch.is_autocast_enabled(seq.device.type)):
            return False
        L = mems.cache_len
        # A step's own memories keep every row valid (lengths and cache grow together).
        all_valid = mems.all_valid or (seq.shape[1] == 1 and bool((mems.lengths >= L).all()))
        return WindowPlan.is_step(self.config, L, seq.shape[1], all_valid)

    def _step(self, seq: Tensor, mems: XLMemories, states: Tensor | None,
              same_states: bool) -> ModelOutput:
        """The decoding step: every layer's `step` on (b, e) rows, the same function as the
        general path for the calls `_can_step` accepts. same_states: `states` are the tensor the
        last call returned, so its cached state keys/values are found by identity."""
        if states is None:
            states = self.initial_states(seq.shape[0])
        if self._compiled_decode is not None:
            return self._compiled_decode(seq, mems, states, same_states)
        L, W = mems.cache_len, self.config.block_width
        first = WindowPlan.step_start(self.config, L)  # the first cached key the token reads
        x = F.embedding(seq[:, 0], self.token_emb.weight)  # (b, e)
        cos, sin = self.layers[0].attn.rotary.row(L, x.dtype)  # every layer's is the same
        windows, state_kv = [], self.state_kv(mems, states, same_states)
        kbufs, vbufs = mems.key_buffers, mems.value_buffers
        r = 0
        for i, layer in enumerate(self.layers):
            window = CacheStep(mems.keys[i], mems.values[i], kbufs[i] if kbufs else None,
                               vbufs[i] if vbufs else None, first, 2 * W, layer.attn.flash)
            windows.append(window)
            x = layer.step(x, cos, sin, window, state_kv[r] if layer.recurrent else None)
            r += layer.recurrent
        return self._output(x[:, None], [w.next_cache() for w in windows], state_kv,
                            mems.lengths + 1, states, all_valid=True)

    def state_kv(self, mems: XLMemories, states: Tensor, same_states: bool) -> list[StateKV]:
        """Every recurrent layer's (K_s, V_s) of its state: those the memories carry when they
        belong to it, else projected."""
        out = []
        for r, cell in enumerate(self.recurrent_cells):
            kv = self._cached_state_kv(mems, r, states[r], same_states)
            out.append(kv if kv is not None else cell.state_keys_values(states[r]))
        return out

    def _start(self, seq: Tensor, mems: XLMemories | None, states: Tensor | None,
               reset: Tensor | None) -> tuple[Tensor, Tensor]:
        """The document lengths (b,) before the call and the states (r, b, s, e) it starts from:
        reset rows at length 0 and the initial state."""
        b, dev = seq.shape[0], seq.device
        lengths = mems.lengths.to(dev) if mems is not None else torch.zeros(b, dtype=torch.long,
                                                                              device=dev)
        if states is None:
            states = self.initial_states(b)
        if reset is not None:
            init = self.initial_states(b)
            reset = reset.to(dev)
            lengths = torch.where(reset, 0, lengths)
            states = torch.where(reset[None, :, None, None], init, states.to(init.dtype))
        return lengths, states

    def _output(self, x: Tensor, caches: list[LayerCache], new_kv: list[StateKV | None],
                lengths: Tensor, states: Tensor, all_valid: bool = False) -> ModelOutput:
        """What every call returns: the logits of x (b, n, e), and the next XLMemories from every
        layer's next cache (detached), the states' keys/values and the documents' lengths.
        all_valid: every row's document started at or before the cache (see `_can_step`)."""
        logits = self.to_logits(self.norm(x))
        comp = self.config.use_compressed_mem
        keep_kv = bool(new_kv) and new_kv[0] is not None  # all layers end in the same block
        mems = XLMemories(
            keys=tuple(_detached(c.keys) for c in caches),
            values=tuple(_detached(c.values) for c in caches),
            lengths=lengths,
            compressed_keys=tuple(c.compressed[0].detach() for c in caches) if comp else None,
            compressed_values=tuple(c.compressed[1].detach() for c in caches) if comp else None,
            state_keys=tuple(kv[0].detach() for kv in new_kv) if keep_kv else None,
            state_values=tuple(kv[1].detach() for kv in new_kv) if keep_kv else None,
            state_source=tuple(states.unbind(0)) if keep_kv else None,
            key_buffers=tuple(c.key_buffer for c in caches),
            value_buffers=tuple(c.value_buffer for c in caches), all_valid=all_valid)
        return ModelOutput(logits, mems, states)

    @staticmethod
    def _cached_state_kv(mems: XLMemories | None, r: int, state: Tensor,
                         same_states: bool = False) -> StateKV | None:
        """The (K_s, V_s) the last call computed for recurrent layer r, if `state` is the state
        they came from (a cheap comparison of S x E values against an S x E x 2hd projection).
        Only without autograd: the cached keys are detached, and a training call must send
        gradients through its own projections."""
        if mems is None or mems.state_keys is None or torch.is_grad_enabled():
            return None
        src = mems.state_source[r]
        if same_states and _same_memory(src, state):
            return mems.state_keys[r], mems.state_values[r]
        if src.shape != state.shape or src.dtype != state.dtype or src.device != state.device \
                or not torch.equal(src, state):
            return None
        return mems.state_keys[r], mems.state_values[r]

    # --- save / load ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (weights only: nothing is ever unpickled), and
        the small file through which transformers loads the directory (model/saving.py)."""
        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        map_location: str | torch.device = "cpu") -> "BlockRecurrentTransformer":
        """The model saved in `directory` by save_pretrained, on map_location."""
        return load_model(cls, directory, map_location)

    # --- generation ----------------------------------------------------------------------
    def compile_decode(self, enabled: bool = True, **compile_kwargs) -> "BlockRecurrentTransformer":
        """Run decoding steps as one torch.compile graph over fixed-size caches
        (model.compiled.CompiledStep): the layers' own `step`, as in the eager step, compiled
        on the first step of each batch size. enabled=False goes back to the eager step."""
        from .compiled import CompiledStep

        self._compiled_decode = CompiledStep(self, **compile_kwargs) if enabled else None
        return self

    def generate(self, prompt, max_new_tokens: int, **kwargs):
        """New token ids after `prompt`, with cached decoding: see generation.generate."""
        # The one call from the model up to generate/, which knows the model by its config.
        from ..generate.generation import generate

        return generate(self, prompt, max_new_tokens, **kwargs)
