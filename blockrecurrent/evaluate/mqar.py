"""MQAR, multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving
Recall in Efficient Language Models", section 3): how many key -> value pairs a model recalls.

    task = MQARTask(seq_len=256, num_pairs=16)        # vocabulary 8,192, power_a 0.01
    seq, targets = task.batch(64, torch.Generator().manual_seed(0))
    rows = run_mqar(base, grid=[(256, 16)], models=("full", "slide", "recurrent"))
    write_mqar_report(rows, "runs/mqar")              # mqar.json, mqar.md, mqar.png

A sequence, as the study generates it: K pairs `key value key value ...` in its first 2K tokens
(keys distinct, drawn from the lower half of the vocabulary [1, V/2); values distinct, from the
upper half [V/2, V)); then every key asked once, key j at position 2K + 2 * gap_j, with the gaps
drawn without replacement from [0, (n - 2K) / 2) with probability proportional to
(gap + 1)^(power_a - 1) (power_a = 0.01: most queries come soon after the pairs, a long tail
later). The model predicts key j's value at the query's position (the value is not shown after
it). Every other token is filler drawn uniformly from the whole vocabulary (keys and values
included), as the study's `random_non_queries`. Accuracy is over the K queries; chance is
about 2 / V.

Models side by side on the same data (the same seeds give the same batches):
- "full": attention over the whole sequence (block_width >= seq_len, no recurrent layer), the
  upper bound;
- "slide": a sliding window of W = block_width tokens, no recurrent layer, the lower bound;
- "recurrent": the same window and the base config's recurrent layer(s) with S state vectors.

The state's size in bytes (fp32): `state_bytes` = recurrent layers x S x dim x 4, the recurrent
state alone; `inference_bytes` = that + the attention cache a token reads (each layer's keys and
values of the last W tokens, or of the whole sequence for "full": depth x 2 x window x heads x
dim_head x 4), the whole state a model carries from one token to the next, which is how the
study counts attention's state. The plot puts accuracy against `inference_bytes`.

Slide's ceiling: a token reads W - 1 tokens back in each layer, so a query can only see a value
whose distance is within `depth x (W - 1)` (and reads it directly only within W - 1);
`reach_frac` and `direct_frac` are the fractions of queries within those on the held-out data.

Training: AdamW (lr 1e-3, weight decay 0.1 as the study; betas the trainer's (0.9, 0.95)),
linear warm-up over 5% of the steps and a cosine decay to 10%, fresh batches every step (the
study draws 100,000 examples); the loss and the logits are computed at the query positions only
(the output projection over 8,192 tokens at every position would dominate the step on a CPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.config import BlockRecurrentConfig, preset
from ..model.transformer import BlockRecurrentTransformer
from ..train.settings import TrainConfig
from .synthetic import IGNORE, fit, held_out_accuracy

MODELS = ("full", "slide", "recurrent")
BETAS = TrainConfig.betas
# The MQAR model (`brt probe --task mqar`): 2 layers, dim 128, 4 heads of 32, window W = 32,
# layer 2 recurrent with S = 32 state vectors, the study's 8,192-token vocabulary, the input
# embedding tied to the output projection as in the study's LanguageModel (the answer is a copy).
MQAR_MODEL = dict(num_tokens=8192, dim=128, depth=2, dim_head=32, heads=4, block_width=32,
                  max_seq_len=256, num_state_vectors=32, recurrent_layers=(2,), tie_embeddings=True)


@dataclass(frozen=True)
class MQARTask:
    """One MQAR setting: `num_pairs` (K) pairs in sequences of `seq_len` tokens."""
    seq_len: int = 256
    num_pairs: int = 16
    vocab: int = 8192
    power_a: float = 0.01

    def __post_init__(self):
        for name in ("seq_len", "num_pairs", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.power_a, (int, float)) and 0 < self.power_a <= 1):
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a!r}")
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if 4 * self.num_pairs > self.seq_len:
            raise ValueError(f"{self.num_pairs} pairs need seq_len >= 4 x pairs = "
                             f"{4 * self.num_pairs}, got {self.seq_len}")
        if self.vocab // 2 - 1 < self.num_pairs or self.vocab <= self.seq_len:
            raise ValueError(f"vocab={self.vocab} is too small for {self.num_pairs} distinct "
                             f"keys and seq_len={self.seq_len} (the study needs vocab > seq_len)")

    @property
    def context(self) -> int:
        """Tokens of the pairs at the start: 2K."""
        return 2 * self.num_pairs

    @property
    def space(self) -> int:
        """Query slots after the pairs (every other position)."""
        return (self.seq_len - self.context) // 2

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - self.vocab // 2)

    def gap_probs(self) -> Tensor:
        """P(gap = i) for i in [0, space): proportional to (i + 1)^(power_a - 1)."""
        i = torch.arange(1, self.space + 1, dtype=torch.float64)
        p = i ** (self.power_a - 1)
        return p / p.sum()

    def sample(self, size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """seq and targets (size, seq_len), keys and values (size, K), and for every pair j its
        query's position `query_pos` (size, K)."""
        g, K, half = generator, self.num_pairs, self.vocab // 2
        keys = 1 + torch.multinomial(torch.ones(size, half - 1), K, generator=g)
        values = half + torch.multinomial(torch.ones(size, self.vocab - half), K, generator=g)
        gaps = torch.multinomial(self.gap_probs().float().expand(size, -1), K, generator=g)
        seq = torch.randint(0, self.vocab, (size, self.seq_len), generator=g)
        seq[:, 0:self.context:2] = keys
        seq[:, 1:self.context:2] = values
        query_pos = self.context + 2 * gaps
        rows = torch.arange(size)[:, None]
        seq[rows, query_pos] = keys
        targets = torch.full((size, self.seq_len), IGNORE, dtype=torch.long)
        targets[rows, query_pos] = values
        return dict(seq=seq, targets=targets, keys=keys, values=values, query_pos=query_pos)

    def batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(seq, targets), each (size, seq_len); targets are IGNORE except at the queries."""
        s = self.sample(size, generator)
        return s["seq"], s["targets"]

    def value_distance(self, num_sequences: int = 1024, seed: int = 12345) -> Tensor:
        """Tokens from each query back to its value (query position - value position) on the
        held-out sequences `mqar_accuracy` uses, flattened."""
        s = self.sample(num_sequences, torch.Generator().manual_seed(seed))
        value_pos = 2 * torch.arange(self.num_pairs) + 1
        return (s["query_pos"] - value_pos).flatten()

    def reach(self, window: int, depth: int, **held_out) -> dict[str, float]:
        """Fractions of queries whose value a sliding window of `window` tokens sees: directly
        (within window - 1 tokens) and through `depth` layers (within depth x (window - 1))."""
        d = self.value_distance(**held_out).float()
        return dict(direct_frac=float((d <= window - 1).float().mean()),
                    reach_frac=float((d <= depth * (window - 1)).float().mean()))


# --- models ------------------------------------------------------------------------------


def mqar_config(base: BlockRecurrentConfig, task: MQARTask, model: str
                ) -> BlockRecurrentConfig:
    """`base` sized for the task: "full" a window over the whole sequence and no recurrent
    layer, "slide" base's window and no recurrent layer, "recurrent" base as it is."""
    if model not in MODELS:
        raise ValueError(f"unknown MQAR model {model!r}; choose one of {MODELS}")
    W = base.block_width
    layers = base.recurrent_layers if model == "recurrent" else ()
    if model == "recurrent" and not layers:
        raise ValueError("the recurrent MQAR model needs at least one recurrent layer")
    if model == "full":
        W = max(W, task.seq_len)
    seg = math.ceil(task.seq_len / W) * W
    return dataclasses.replace(base, num_tokens=max(base.num_tokens, task.vocab),
                               block_width=W, max_seq_len=seg, recurrent_layers=layers,
                               window="sliding", extra={})


def state_bytes(config: BlockRecurrentConfig) -> int:
    """The recurrent state in fp32: recurrent layers x S x dim x 4."""
    return len(config.recurrent_layers) * config.num_state_vectors * config.dim * 4


def cache_bytes(config: BlockRecurrentConfig, seq_len: int) -> int:
    """The attention cache a token reads in fp32: every layer's keys and values of the last
    min(W, seq_len) tokens."""
    return config.depth * 2 * min(config.block_width, seq_len) * config.inner_dim * 4


def query_logits(model: nn.Module, seq: Tensor, mask: Tensor) -> Tensor:
    """The logits at the positions `mask` (b, n) only, (m, vocab): the model's output projection
    is applied to those rows alone (the model's other outputs are unchanged)."""
    head = model.to_logits
    model.to_logits = nn.Identity()
    try:
        hidden = model(seq)[0]
    finally:
        model.to_logits = head
    return head(hidden[mask])


def lr_at(step: int, steps: int, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Learning-rate factor at `step` (0-based): linear warm-up, then cosine down to `floor`."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def train_mqar(model: nn.Module, task: MQARTask, *, steps: int = 1000, batch_size: int = 64,
               lr: float = 1e-3, weight_decay: float = 0.1, seed: int = 0,
               betas: tuple[float, float] = BETAS,
               callback: Callable[[int, float], None] | None = None) -> float:
    """AdamW on fresh batches (seeded: every model of a seed sees the same data); returns the
    mean training loss of the last 10% of the steps. `callback(step, loss)` after every step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas),
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(i, steps))
    losses = fit(model, lambda i: task.batch(batch_size, g), _query_loss, opt, steps, sched,
                 callback)
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


def _query_loss(model: nn.Module, seq: Tensor, targets: Tensor) -> Tensor:
    mask = targets != IGNORE
    return F.cross_entropy(query_logits(model, seq, mask), targets[mask])


def mqar_accuracy(model: nn.Module, task: MQARTask, *, num_sequences: int = 1024,
                  seed: int = 12345, batch_size: int = 128) -> float:
    """Fraction of queries whose value is the argmax, on held-out sequences (a generator seed
    the training seeds do not use by default)."""
    return held_out_accuracy(model, task, query_logits, num_sequences=num_sequences, seed=seed,
                             batch_size=batch_size)


def mqar_base(**overrides) -> BlockRecurrentConfig:
    """The MQAR model (MQAR_MODEL over the probe preset), with overrides."""
    return preset("probe", **{**MQAR_MODEL, **overrides})


def run_mqar(base: BlockRecurrentConfig | None = None, *,
             grid: Iterable[tuple[int, int]] = ((256, 16),),
             models: Iterable[str] = MODELS, steps: int = 1000, batch_size: int = 64,
             lr: float = 1e-3, weight_decay: float = 0.1, seeds: Iterable[int] = (0,),
             vocab: int = 8192, power_a: float = 0.01, num_test: int = 1024,
             log: Callable[[str], None] | None = print) -> list[dict]:
    """Train and evaluate one fresh model per ((seq_len, pairs), model, seed); one row each."""
    base = base if base is not None else mqar_base()
    if not isinstance(base, BlockRecurrentConfig):
        raise TypeError(f"base must be a BlockRecurrentConfig, got {type(base).__name__}")
    models, grid, seeds = list(models), [tuple(x) for x in grid], list(seeds)
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown MQAR model {name!r}; choose from {MODELS}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    tasks = [MQARTask(seq_len=n, num_pairs=k, vocab=vocab, power_a=power_a) for n, k in grid]
    rows = []
    for task in tasks:
        reach = task.reach(base.block_width, base.depth, num_sequences=num_test)
        for name in models:
            config = mqar_config(base, task, name)
            for seed in seeds:
                torch.manual_seed(seed)
                model = BlockRecurrentTransformer(config)
                t0 = time.perf_counter()
                loss = train_mqar(model, task, steps=steps, batch_size=batch_size, lr=lr,
                                  weight_decay=weight_decay, seed=seed)
                train_s = time.perf_counter() - t0
                acc = mqar_accuracy(model, task, num_sequences=num_test)
                sb = state_bytes(config)
                row = dict(model=name, seq_len=task.seq_len, num_pairs=task.num_pairs,
                           vocab=task.vocab, power_a=task.power_a, dim=config.dim,
                           depth=config.depth, window=config.block_width,
                           state_vectors=config.num_state_vectors if sb else 0,
                           state_bytes=sb, inference_bytes=sb + cache_bytes(config,
                                                                              task.seq_len),
                           seed=seed, accuracy=acc, chance=task.chance, final_loss=loss,
                           steps=steps, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, train_seconds=train_s,
                           seconds_per_step=train_s / steps, **reach,
                           slide_window=base.block_width)
                rows.append(row)
                if log:
                    log(f"{name:9s} n={task.seq_len} K={task.num_pairs} dim={config.dim} "
                        f"W={config.block_width} S={row['state_vectors']} seed={seed}: "
                        f"accuracy {acc:.3f} (loss {loss:.3f}, {train_s:.0f} s, "
                        f"{train_s / steps:.2f} s/step)")
    return rows
