"""Hugging Face transformers support: AutoModelForCausalLM, generate(), pipeline(), lm-eval.

    import blockrecurrent.hf                       # registers model_type "block_recurrent"
    model = AutoModelForCausalLM.from_pretrained("runs/brt/model")   # a `brt train` directory
    tok = AutoTokenizer.from_pretrained("runs/brt/model", add_bos_token=True)  # bos first
    out = model.generate(**tok("def f(", return_tensors="pt"), max_new_tokens=32)

Importing registers the classes with AutoConfig.register / AutoModelForCausalLM.register, as
transformers' Auto Classes docs ("Extending the Auto Classes") describe for custom models.
Without the import, `trust_remote_code=True` loads the directory too: save_pretrained writes
config.json with `model_type` and an `auto_map` naming block_recurrent_hf.py, a two-line file
that imports these classes from the installed package (transformers' own
register_for_auto_class would copy this module's source into the directory instead, where
it would go stale). There is one directory format: the weights keep our parameter names
(the wrapper adopts our model's submodules), so both loaders read the same
config.json/model.safetensors.

Stateful generation, as read in transformers 5.24 (generation/utils.py): the cache travels
in the `cache` keyword (`past_key_values` is deprecated to 5.40). `_prepare_cache_for_generation`
injects a DynamicCache unless `_supports_default_dynamic_cache()` is False (the hook RWKV and
xLSTM take, by name); the model's forward then makes its own cache on the first call, returns
it as `outputs.cache`, `_update_model_kwargs_for_generation` passes it back, and
`prepare_inputs_for_generation` feeds one new token per step (`next_sequence_length=1`).
Beam search calls `cache.reorder_cache(beam_idx)` (`_beam_search`); `_is_stateful = True`
makes `_validate_generation_mode` refuse assisted generation, since the state cannot be rolled
back. The cache here (BlockRecurrentCache) is a plain object, like xLSTMCache, holding our
XLMemories and states.

Padding: the state reads every token of a block, so a pad token cannot be skipped. Right
padding is harmless when scoring (a position's logits only depend on the tokens before it),
so it is accepted without a cache; any other padding raises a ValueError.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PreTrainedConfig,
        PreTrainedModel,
    )
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as err:  # the core package does not depend on transformers
    raise ImportError("blockrecurrent.hf needs transformers >= 5 (Python >= 3.11 for the pinned "
                      "5.24): pip install 'blockrecurrent[hf]'") from err

# Absolute imports: block_recurrent_hf.py in a saved directory imports this module by name.
from blockrecurrent.evaluate.harness import (
    write_choice_task,
    write_heldout_task,
    write_rolling_task,
)
from blockrecurrent.generate.generation import chunk_bounds
from blockrecurrent.model.attention import Rotary
from blockrecurrent.model.config import (
    HF_SHIM_FILE,
    MODEL_TYPE,
    SAVED_BEFORE_FIELD,
    BlockRecurrentConfig,
)
from blockrecurrent.model.memories import XLMemories
from blockrecurrent.model.state_tune import apply_state_tune
from blockrecurrent.model.transformer import BlockRecurrentTransformer, ModelOutput

_FIELDS = dataclasses.fields(BlockRecurrentConfig)


def _config_class():
    """PreTrainedConfig subclass whose fields are BlockRecurrentConfig's, one to one, made from
    dataclasses.fields so that a field added there appears here (transformers 5 configs are
    dataclasses too). Values are validated by building a BlockRecurrentConfig."""
    annotations, namespace = {}, {}
    for f in _FIELDS:
        annotations[f.name] = f.type
        namespace[f.name] = (dataclasses.field(default_factory=f.default_factory)
                             if f.default is dataclasses.MISSING else f.default)

    def __post_init__(self, **kwargs):
        self.to_brt()  # validates: bad values raise here, as BlockRecurrentConfig would
        PreTrainedConfig.__post_init__(self, **kwargs)

    # A config.json written before a field existed gets the value BlockRecurrentConfig.from_dict
    # gives it (SAVED_BEFORE_FIELD), not the dataclass default, or the weights would not fit.
    # from_pretrained (AutoConfig, trust_remote_code, the model's) reads config.json here.
    def from_dict(cls, config_dict, **kwargs):
        config_dict = {**SAVED_BEFORE_FIELD, **config_dict}
        return PreTrainedConfig.from_dict.__func__(cls, config_dict, **kwargs)

    def from_json_file(cls, json_file):
        return cls.from_dict(cls._dict_from_json_file(json_file))

    def to_brt(self) -> BlockRecurrentConfig:
        """The BlockRecurrentConfig with these values."""
        values = {f.name: getattr(self, f.name) for f in _FIELDS}
        return BlockRecurrentConfig.from_dict(values)

    namespace.update({
        "__annotations__": annotations, "__module__": __name__, "__post_init__": __post_init__,
        "to_brt": to_brt, "model_type": MODEL_TYPE, "from_dict": classmethod(from_dict),
        "from_json_file": classmethod(from_json_file),
        "__doc__": "BlockRecurrentConfig as a transformers config (same fields and values).",
        # The standard names transformers and lm-eval look for.
        "attribute_map": {"vocab_size": "num_tokens", "hidden_size": "dim",
                          "num_hidden_layers": "depth", "num_attention_heads": "heads",
                          "tie_word_embeddings": "tie_embeddings"},
    })
    return type("BlockRecurrentHFConfig", (PreTrainedConfig,), namespace)


BlockRecurrentHFConfig = _config_class()


def hf_config(config: BlockRecurrentConfig) -> "BlockRecurrentHFConfig":
    """The transformers config of a BlockRecurrentConfig."""
    if not isinstance(config, BlockRecurrentConfig):
        raise TypeError(f"config must be a BlockRecurrentConfig, got {type(config).__name__}")
    return BlockRecurrentHFConfig(**config.to_dict())


class BlockRecurrentCache:
    """`cache` of generate: the XLMemories and recurrent states our model returns. Updated in
    place by each forward, as transformers' caches are. Rows can be selected and reordered
    (beam search, num_return_sequences); it cannot be cropped (the state is not reversible)."""
    is_compileable = False
    is_croppable = False
    is_linear = (False,)  # input_ids given with it hold the whole sequence: generate slices them

    def __init__(self, xl_memories: XLMemories | None = None, states: Tensor | None = None):
        if (xl_memories is None) != (states is None):
            raise ValueError("pass both xl_memories and states, or neither (an empty cache)")
        if xl_memories is not None and not isinstance(xl_memories, XLMemories):
            raise TypeError(f"xl_memories must be XLMemories, got {type(xl_memories).__name__}")
        self.xl_memories, self.states = xl_memories, states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far."""
        return 0 if self.xl_memories is None else int(self.xl_memories.lengths.max())

    @property
    def batch_size(self) -> int:  # not __len__: an empty cache must not read as False
        return 0 if self.xl_memories is None else self.xl_memories.batch_size

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.xl_memories is not None:
            indices = torch.as_tensor(indices, device=self.states.device)
            self.xl_memories = self.xl_memories.select(indices.to(self.xl_memories.lengths.device))
            self.states = self.states[:, indices]

    reorder_cache = batch_select_indices  # beam search: row i takes the cache of beam_idx[i]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.xl_memories is not None:
            self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise ValueError("a BlockRecurrentCache cannot be cropped: the recurrent state cannot "
                         "be rolled back to an earlier token")


def _check_mask(attention_mask: Tensor | None, n: int, has_cache: bool, use_cache: bool) -> bool:
    """Whether attention_mask pads any row (right padding only, without a cache: see module)."""
    if attention_mask is None:
        return False
    if attention_mask.dim() != 2:
        raise ValueError("attention_mask must be (batch, length), got "
                         f"{tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    if bool(real.all()):
        return False
    fix = ("batched prompts of different lengths cannot be padded for this model: pad tokens "
           "would enter its recurrent state and cache. Generate one prompt at a time (or batch "
           "prompts of equal length)")
    if has_cache or use_cache:
        raise ValueError(f"{fix}; to score right-padded rows, call the model with use_cache=False")
    if real.shape[1] != n or bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ValueError(f"{fix}; only right padding (pads after each row's tokens) can be scored")
    return True


class BlockRecurrentForCausalLM(PreTrainedModel, GenerationMixin):
    """BlockRecurrentTransformer as a transformers causal LM. Its parameters are our model's
    (same names, same tensors): `.brt` is that model, usable with our own API."""
    config_class = BlockRecurrentHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _is_stateful = True  # assisted generation would need to roll the state back
    _tied_weights_keys = {"to_logits.weight": "token_emb.weight"}  # used when tie_embeddings
    _no_split_modules = ["Layer"]
    supports_gradient_checkpointing = False

    def __init__(self, config: "BlockRecurrentHFConfig"):
        super().__init__(config)
        brt = BlockRecurrentTransformer(config.to_brt())
        # Our model's submodules become this module's, so the state dict has our names; the
        # model itself is kept unregistered (no "brt." prefix) to run the forward.
        for name, child in brt.named_children():
            self.add_module(name, child)
        self.__dict__["brt"] = brt
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward makes a BlockRecurrentCache (see the module docstring)

    @classmethod
    def from_brt(cls, model: BlockRecurrentTransformer) -> "BlockRecurrentForCausalLM":
        """Wrap an existing model, sharing its parameters."""
        if not isinstance(model, BlockRecurrentTransformer):
            raise TypeError(f"model must be a BlockRecurrentTransformer, "
                            f"got {type(model).__name__}")
        with torch.device("meta"):  # its own submodules are replaced at once: no init work
            hf = cls(hf_config(model.config))
        for name, child in model.named_children():
            hf.add_module(name, child)
        hf.__dict__["brt"] = model
        return hf.train(model.training)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, made as strict as ours: missing, unexpected or mis-shaped
        weights raise instead of being initialised at random with a warning."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(v) for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"the weights do not match the config: {bad}")
        return (model, info) if want_info else model

    def apply_state_tune(self, path) -> dict:
        """Apply a state-tuning file (`brt train --tune-state`) tuned on this model, in place ->
        its header; ValueError, the model unchanged, for a file of another base model."""
        return apply_state_tune(self.brt, path)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Our save_pretrained (one directory format) plus generation_config.json. Sharding and
        the other options of transformers' save_pretrained are not supported."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: save, then upload the directory "
                             "with huggingface_hub")
        self.brt.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)

    def _init_weights(self, module) -> None:
        # transformers builds the model on the meta device and loads the weights; the rotary
        # tables are not weights, so they are recomputed. Every parameter comes from the file
        # (from_pretrained raises otherwise) or from our reset_parameters (a new model).
        if isinstance(module, Rotary):
            module._grow(module.cos.shape[0])

    def train(self, mode: bool = True):
        super().train(mode)
        self.brt.training = mode  # not a registered submodule: keep its flag in step
        return self

    def get_input_embeddings(self):
        return self.token_emb

    def set_input_embeddings(self, value):
        self.token_emb = self.brt.token_emb = value

    def get_output_embeddings(self):
        return self.to_logits

    def set_output_embeddings(self, value):
        self.to_logits = self.brt.to_logits = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: BlockRecurrentCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                return_dict: bool | None = None, past_key_values=None,
                inputs_embeds: Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (b, n), continuing from `cache` when given. Returns logits (b, n, vocab)
        (the last `logits_to_keep` positions when > 0), the updated cache when use_cache
        (default: True unless right-padded rows are scored), and with `labels` the shifted
        cross-entropy loss (ignore_index -100)."""
        if past_key_values is not None:  # the name transformers < 5.24 used
            if cache is not None:
                raise ValueError("pass either cache or past_key_values, not both")
            cache = past_key_values
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("pass input_ids: this model does not take inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("output_attentions and output_hidden_states are not supported")
        kwargs.pop("position_ids", None)  # positions come from the cache (tokens read so far)
        num_items = kwargs.pop("num_items_in_batch", None)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if cache is not None and not isinstance(cache, BlockRecurrentCache):
            raise TypeError(f"cache must be a BlockRecurrentCache, got {type(cache).__name__} "
                            f"(transformers' own caches cannot hold a recurrent state)")
        b, n = input_ids.shape if input_ids.dim() == 2 else (None, None)
        padded = _check_mask(attention_mask, n, cache is not None and cache.batch_size > 0,
                             bool(use_cache))
        use_cache = not padded if use_cache is None else use_cache
        keep = logits_to_keep
        if isinstance(keep, bool) or not isinstance(keep, (int, Tensor)) or (
                isinstance(keep, int) and keep < 0):
            raise ValueError(f"logits_to_keep must be an int >= 0 or an index tensor, got {keep!r}")
        if labels is not None and not (isinstance(keep, int) and keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")

        mems, states = (cache.xl_memories, cache.states) if cache is not None else (None, None)
        last = keep if isinstance(keep, int) and keep > 0 else None
        logits, mems, states = self._run(input_ids, mems, states, last)
        if isinstance(keep, Tensor):
            logits = logits[:, keep]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.num_tokens,
                                      num_items_in_batch=num_items)
        if use_cache:
            cache = cache if cache is not None else BlockRecurrentCache()
            cache.xl_memories, cache.states = mems, states
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    def _run(self, ids: Tensor, mems: XLMemories | None, states: Tensor | None,
             last: int | None) -> ModelOutput:
        """Our forward. Without autograd, a long input is read in chunks of max_seq_len (as our
        generate's prefill does, so the two agree exactly), the first finishing a partial block
        of the cache; memory then stays constant in the input length."""
        cfg, n = self.brt.config, ids.shape[-1]
        if torch.is_grad_enabled():
            return self.brt(ids, xl_memories=mems, states=states, logits_to_keep=last)
        pieces = []
        cache_len = mems.cache_len if mems is not None else 0
        for pos, end in chunk_bounds(n, cache_len, cfg.block_width, cfg.max_seq_len):
            # How many of the kept positions this chunk holds: they end the chunk. A chunk
            # holding none still computes one position's logits (the model returns some).
            kept = end - pos if last is None else end - max(pos, n - last)
            logits, mems, states = self.brt(ids[:, pos:end], xl_memories=mems, states=states,
                                            logits_to_keep=max(kept, 1))
            if kept > 0:
                pieces.append(logits)
        return torch.cat(pieces, dim=1), mems, states


def add_hf_files(model_dir) -> None:
    """Make a directory saved before transformers support loadable by transformers: re-save
    the model (config.json gains model_type and auto_map, block_recurrent_hf.py is written;
    the weights are unchanged) and its tokenizer (tokenizer.json, tokenizer_config.json keys,
    generation_config.json)."""
    from blockrecurrent.data.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    BlockRecurrentTransformer.from_pretrained(model_dir).save_pretrained(model_dir)
    if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file():
        load_tokenizer(model_dir).save(model_dir)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type "block_recurrent" (done on
    import; exist_ok, so a second import is harmless)."""
    AutoConfig.register(MODEL_TYPE, BlockRecurrentHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlockRecurrentHFConfig, BlockRecurrentForCausalLM, exist_ok=True)


register()
# The lm-eval task writers live in evaluate/harness.py; `hf.write_*_task` is where the docs have
# always named them.
__all__ = ["BlockRecurrentHFConfig", "BlockRecurrentForCausalLM", "BlockRecurrentCache",
           "hf_config", "register", "add_hf_files", "write_rolling_task", "write_choice_task",
           "write_heldout_task", "HF_SHIM_FILE"]
