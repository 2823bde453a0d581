"""Long-range recall probes: can the state carry what the window cannot see?

    task = RecallTask(block_width=16, num_keys=2, distance=4)
    rows = run_probes(config, num_keys=(1, 2, 4), distances=range(1, 9))   # rec and Slide
    write_probe_report(rows, "runs/probe")           # probe.json, probe.md, probe.png

A sequence is `lead` blocks of random filler, one *source* block holding the keys, `distance - 1`
more blocks of filler, and a last block that ends with the questions. So the questions come
`distance` blocks after the last block that holds the answers, and no key is ever in the
document's first block, where the incoming state is the same learned initial state for every
sequence (a key there is far easier to store).

- "keys": K keys (drawn with replacement from `alphabet` key tokens) at random positions of the
  source block; the last block ends with a marker followed by the K keys in order, and the model
  predicts each key from the token before it (the first from the marker).
- "pairs": K key -> value pairs (distinct keys, adjacent tokens); the last block ends with a
  marker and `queries` questions `key value`; the model predicts each value from its key.

Accuracy is over the answer tokens; chance is 1 / alphabet. `depth` sliding windows reach back
`depth * (W - 1)` tokens (`depth` block windows, `depth` whole blocks): `beyond_reach` marks the
settings where no answer is within that reach, so anything above chance there is the state's.

The models train from scratch on fresh batches (Adam, lr 2e-3, betas (0.9, 0.95) as the
trainer's, batch 32, 300 steps) and are evaluated on 1,024 held-out sequences.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from ..model.config import BlockRecurrentConfig, preset
from ..model.transformer import BlockRecurrentTransformer
from ..train.settings import TrainConfig, valid_betas
from .reach import check_beyond, reach_table
from .synthetic import IGNORE, fit, held_out_accuracy

TASKS = ("keys", "pairs")
# Adam's betas: the trainer's. With torch's default beta2 = 0.999 recall is learnt later, likely
# because the steps stay damped by the large gradients of the first steps while the loss sits
# on its plateau (experiments/README.md, "Adam's betas").
BETAS = TrainConfig.betas


@dataclass(frozen=True)
class RecallTask:
    """One probe setting. Token ids: keys [0, A), values [A, 2A), the marker 2A, filler after."""
    block_width: int
    kind: str = "keys"
    num_keys: int = 1  # K
    distance: int = 3  # blocks from the source block to the block of the questions
    queries: int = 1  # "pairs": questions at the end (<= num_keys)
    lead: int = 2  # filler blocks before the source block
    alphabet: int = 8  # key (and value) tokens: chance is 1 / alphabet
    vocab: int = 64  # token ids used; filler is [2 * alphabet + 1, vocab)

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"invalid recall task: {what}")

        for name in ("block_width", "num_keys", "distance", "queries", "alphabet", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.lead, bool) or not isinstance(self.lead, int) or self.lead < 0:
            raise TypeError(f"lead must be an int >= 0, got {self.lead!r}")
        need(self.kind in TASKS, f"kind={self.kind!r}; choose one of {TASKS}")
        need(self.vocab >= 2 * self.alphabet + 2,
             f"vocab={self.vocab} leaves no filler tokens after {2 * self.alphabet + 1} "
             f"key, value and marker ids")
        if self.kind == "keys":
            need(self.num_keys + 1 <= self.block_width,
                 f"{self.num_keys} keys and the marker do not fit a block of {self.block_width}")
        else:
            need(self.num_keys <= min(self.alphabet, self.block_width // 2),
                 f"{self.num_keys} distinct pairs need num_keys <= alphabet={self.alphabet} and "
                 f"<= block_width/2={self.block_width // 2}")
            need(self.queries <= self.num_keys, f"queries={self.queries} > num_keys")
            need(2 * self.queries + 1 <= self.block_width,
                 f"{self.queries} questions do not fit a block of {self.block_width}")

    @property
    def length(self) -> int:
        return (self.lead + 1 + self.distance) * self.block_width

    @property
    def chance(self) -> float:
        return 1.0 / self.alphabet

    @property
    def first_question(self) -> int:
        """Position of the first question token (the marker for "keys")."""
        tail = self.num_keys + 1 if self.kind == "keys" else 2 * self.queries + 1
        return self.length - tail

    @property
    def min_gap(self) -> int:
        """Fewest tokens between an answer in the source block and the first question."""
        return self.first_question - ((self.lead + 1) * self.block_width - 1)

    def beyond_reach(self, depth: int, window: str = "sliding") -> bool:
        """No answer within `depth` windows: each sliding window reaches W - 1 tokens back, each
        block window back to the start of the block before the query's."""
        W = self.block_width
        if window == "sliding":
            return self.min_gap > depth * (W - 1)
        return (self.lead + 1) * W <= (self.first_question // W - depth) * W

    def batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(seq, targets), each (size, length); targets are IGNORE except at the questions."""
        W, A, n = self.block_width, self.alphabet, self.length
        g = generator
        seq = torch.randint(2 * A + 1, self.vocab, (size, n), generator=g)
        targets = torch.full((size, n), IGNORE, dtype=torch.long)
        rows = torch.arange(size)[:, None]
        src = self.lead * W  # first position of the source block
        marker = 2 * A
        if self.kind == "keys":
            keys = torch.randint(0, A, (size, self.num_keys), generator=g)
            pos = torch.rand(size, W, generator=g).argsort(dim=1)[:, :self.num_keys].sort(1)[0]
            seq[rows, src + pos] = keys
            tail = n - self.num_keys - 1  # marker, then the keys in order
            seq[:, tail] = marker
            seq[:, tail + 1:] = keys
            targets[:, tail:n - 1] = keys
        else:
            keys = torch.rand(size, A, generator=g).argsort(dim=1)[:, :self.num_keys]
            values = torch.randint(A, 2 * A, (size, self.num_keys), generator=g)
            slots = torch.rand(size, W // 2, generator=g).argsort(dim=1)[:, :self.num_keys]
            seq[rows, src + 2 * slots] = keys
            seq[rows, src + 2 * slots + 1] = values
            ask = torch.rand(size, self.num_keys, generator=g).argsort(dim=1)[:, :self.queries]
            tail = n - 2 * self.queries - 1
            seq[:, tail] = marker
            q_pos = tail + 1 + 2 * torch.arange(self.queries)
            seq[:, q_pos] = keys.gather(1, ask)
            seq[:, q_pos + 1] = values.gather(1, ask)
            targets[:, q_pos] = values.gather(1, ask)
        return seq, targets


def task_grid(block_width: int, kind: str, num_keys: Iterable[int], distances: Iterable[int],
              queries: int = 1, lead: int = 2, vocab: int = 64) -> list[RecallTask]:
    """One task per (K, distance); `queries` is capped at K for "pairs"."""
    return [RecallTask(block_width=block_width, kind=kind, num_keys=k, distance=d,
                       queries=min(queries, k) if kind == "pairs" else 1, lead=lead, vocab=vocab)
            for k in num_keys for d in distances]


def _logits(model: nn.Module, seq: Tensor) -> Tensor:
    """Our model and the port both return (logits, memories, states) for a sequence."""
    return model(seq)[0]


def _check_betas(betas) -> tuple[float, float]:
    if not valid_betas(betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def train_recall(model: nn.Module, task: RecallTask | list[RecallTask], *, steps: int = 300,
                 batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                 betas: tuple[float, float] = BETAS) -> float:
    """Train on fresh batches with Adam; returns the last training loss (NaN if it diverged,
    training stopped there). A list of tasks is trained in turn, one batch of each (mixed
    distances)."""
    tasks = task if isinstance(task, list) else [task]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=_check_betas(betas))
    if steps < 1:
        return float("nan")
    try:
        return fit(model, lambda i: tasks[i % len(tasks)].batch(batch_size, g), _recall_loss,
                   opt, steps)[-1]
    except NonFiniteLossError:  # diverged: a sweep goes on, the row's loss says so
        return float("nan")


def _recall_loss(model: nn.Module, seq: Tensor, targets: Tensor) -> Tensor:
    logits = _logits(model, seq)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def recall_accuracy(model: nn.Module, task: RecallTask, *, num_sequences: int = 1024,
                    seed: int = 12345, batch_size: int = 256) -> float:
    """Fraction of answer tokens predicted (argmax) correctly on held-out sequences."""
    return held_out_accuracy(model, task, lambda m, seq, mask: _logits(m, seq)[mask],
                             num_sequences=num_sequences, seed=seed, batch_size=batch_size)


def probe_config(base: BlockRecurrentConfig, task: RecallTask, recurrent: bool
                 ) -> BlockRecurrentConfig:
    """`base` sized for the task (vocabulary, one segment = the whole sequence); recurrent=False
    gives Slide (no recurrent layer), everything else equal."""
    layers = base.recurrent_layers if recurrent else ()
    if recurrent and not layers:
        raise ValueError("the recurrent probe model needs at least one recurrent layer")
    W = base.block_width
    seg = math.ceil(task.length / W) * W
    return dataclasses.replace(base, num_tokens=max(base.num_tokens, task.vocab),
                               max_seq_len=seg, recurrent_layers=layers, extra={})


ModelFactory = Callable[[BlockRecurrentConfig], nn.Module]


def run_probes(base: BlockRecurrentConfig | None = None, *, kind: str = "keys",
               num_keys: Iterable[int] = (1,), distances: Iterable[int] = range(1, 7),
               queries: int = 1, lead: int = 2, models: Iterable[str] = ("recurrent", "slide"),
               steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
               seeds: Iterable[int] = (0,),
               factory: ModelFactory = BlockRecurrentTransformer, save_dir=None,
               mixed: bool = False, betas: tuple[float, float] = BETAS,
               beyond: Iterable[int] = (), train_leads: Iterable[int] = (),
               log: Callable[[str], None] | None = print) -> list[dict]:
    """Train and evaluate one fresh model per (model, K, distance, seed). `factory` builds a model
    from a config (the port comparison passes its own). mixed=True trains one model per (model,
    K, seed) on all the distances in turn (the same `steps` in all) and evaluates it at each:
    from scratch at one long distance the signal can be too weak to find how to store several
    keys, which the short distances teach (experiments/probe_curriculum.py). beyond: also score
    each trained model with the keys f times its longest trained distance back, for each f
    (evaluate/reach.py). train_leads: train with these numbers of filler blocks before the keys
    in turn (scored at `lead`), so that the state is not taught one position in the document
    (experiments/length_generalisation.md). Returns one row per (model, K, distance, seed)."""
    base = base if base is not None else preset("probe")
    models, num_keys, distances, seeds = list(models), list(num_keys), list(distances), list(seeds)
    _check_run(base, models, steps, batch_size, lr, mixed)
    betas, beyond = _check_betas(betas), check_beyond(beyond)
    tasks = task_grid(base.block_width, kind, num_keys, distances, queries, lead)  # all checked
    # What each model trains on: one task, or (mixed) every distance of one K.
    groups = ([[t for t in tasks if t.num_keys == k] for k in dict.fromkeys(num_keys)] if mixed
              else [[t] for t in tasks])
    rows = []
    for group in groups:
        longest = max(group, key=lambda t: t.length)
        for name in models:
            for seed in seeds:
                config = probe_config(base, longest, recurrent=name == "recurrent")
                torch.manual_seed(seed)
                model = factory(config)
                t0 = time.perf_counter()
                loss = train_recall(model, _training_tasks(group, mixed, train_leads),
                                    steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                    betas=betas)
                scored = [(1, task) for task in group] + [
                    (f, dataclasses.replace(longest, distance=f * longest.distance))
                    for f in beyond]
                for factor, task in scored:
                    # Long sequences in smaller batches: about as many tokens per forward.
                    acc = recall_accuracy(model, task, batch_size=max(1, 2 ** 16 // task.length))
                    row = dict(model=name, kind=task.kind, num_keys=task.num_keys,
                               distance=task.distance, queries=task.queries, lead=task.lead,
                               seed=seed, accuracy=acc, chance=task.chance, final_loss=loss,
                               beyond_reach=task.beyond_reach(config.depth, config.window),
                               steps=steps, betas=list(betas), mixed=mixed, factor=factor,
                               trained_distance=longest.distance,
                               seconds=time.perf_counter() - t0)
                    rows.append(row)
                    if log:
                        log(f"{name:9s} {task.kind} K={task.num_keys} d={task.distance} "
                            f"seed={seed}: accuracy {acc:.3f} (loss {loss:.3f}, "
                            f"{row['seconds']:.0f} s)")
                if save_dir is not None and hasattr(model, "save_pretrained"):
                    model.save_pretrained(Path(save_dir) / run_name(row))
    return rows


def _training_tasks(group: list[RecallTask], mixed: bool, train_leads: Iterable[int]
                    ) -> RecallTask | list[RecallTask]:
    """What one model trains on: its task, or (mixed) every distance in turn; with train_leads,
    each of those at every lead in turn."""
    tasks = group if mixed else group[:1]
    leads = list(train_leads)
    if leads:
        tasks = [dataclasses.replace(t, lead=lead) for t in tasks for lead in leads]
    return tasks if len(tasks) > 1 else tasks[0]


def _check_run(base, models: list, steps, batch_size, lr, mixed) -> None:
    """run_probes' checks of its arguments other than the tasks' (task_grid checks those)."""
    if not isinstance(base, BlockRecurrentConfig):
        raise TypeError(f"base must be a BlockRecurrentConfig, got {type(base).__name__}")
    for name in models:
        if name not in ("recurrent", "slide"):
            raise ValueError(f"unknown probe model {name!r}; choose recurrent or slide")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(mixed, bool):
        raise TypeError(f"mixed must be a bool, got {type(mixed).__name__}")


def run_name(row: dict) -> str:
    d = "mixed" if row.get("mixed") else f"d{row.get('trained_distance', row['distance'])}"
    return f"{row['model']}-{row['kind']}-K{row['num_keys']}-{d}-s{row['seed']}"


def evaluate_saved(model_dir, *, kind: str = "keys", num_keys: Iterable[int] = (1,),
                   distances: Iterable[int] = range(1, 7), queries: int = 1, lead: int = 2,
                   ) -> list[dict]:
    """Recall accuracy of a saved model (no training) on the given settings."""
    model = BlockRecurrentTransformer.from_pretrained(model_dir)
    return [dict(model=str(model_dir), kind=kind, num_keys=task.num_keys,
                 distance=task.distance, queries=task.queries, lead=lead, seed=None,
                 accuracy=recall_accuracy(model, task), chance=task.chance,
                 beyond_reach=task.beyond_reach(model.config.depth, model.config.window))
            for task in task_grid(model.config.block_width, kind, num_keys, distances, queries,
                                  lead, vocab=min(64, model.config.num_tokens))]


# --- reports ------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict:
    """{(model, num_keys): {distance: mean accuracy over seeds}}."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["model"], r["num_keys"]), {}).setdefault(r["distance"], []).append(
            r["accuracy"])
    return {key: {d: sum(v) / len(v) for d, v in sorted(by_d.items())}
            for key, by_d in acc.items()}


def probe_table(rows: list[dict], markdown: bool = True) -> str:
    """Accuracy by distance (rows) and model x K (columns), mean over seeds; '(w)' marks
    settings where an answer is within the windows' reach."""
    from .report import _table

    rows = [r for r in rows if r.get("factor", 1) == 1]  # the multiples: reach_table
    summary = summarise(rows)
    columns = sorted(summary, key=lambda mk: (mk[1], mk[0] != "recurrent", mk[0]))
    distances = sorted({r["distance"] for r in rows})
    reach = {(r["num_keys"], r["distance"]): r["beyond_reach"] for r in rows}
    header = ["distance (blocks)"] + [f"{m} K={k}" for m, k in columns]
    body = []
    for d in distances:
        cells = []
        for m, k in columns:
            v = summary[(m, k)].get(d)
            cells.append("-" if v is None else f"{v:.2f}" + ("" if reach.get((k, d)) else " (w)"))
        body.append([str(d)] + cells)
    return _table(header, body, markdown)


def write_probe_report(rows: list[dict], out_dir, title: str = "recall probe") -> dict:
    """out_dir/probe.json (every run), probe.md (the table) and probe.png (accuracy by distance)."""
    from ..files import write_atomic, write_json
    from .report import _figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe.json", rows)
    chance = rows[0]["chance"] if rows else None
    text = (f"# {title}\n\nAccuracy on the answer tokens (chance {chance:.3f}); '(w)' marks "
            f"settings where an answer is within the windows' reach.\n\n"
            f"{probe_table(rows)}\n")
    if any(r.get("factor", 1) > 1 for r in rows):
        text += ("\n## Beyond the trained distance\n\nAccuracy with the keys D blocks back "
                 "(the longest distance the model was trained at) and at multiples of D.\n\n"
                 f"{reach_table(rows)}\n")
    write_atomic(out / "probe.md", lambda f: f.write(text.encode()))
    png = None
    fig = _figure()
    if fig is not None and rows:
        ax = fig.subplots()
        for (m, k), by_d in sorted(summarise([r for r in rows if r.get("factor", 1) == 1])
                                   .items()):
            ax.plot(list(by_d), list(by_d.values()), marker="o",
                    linestyle="-" if m == "recurrent" else "--", label=f"{m}, K={k}")
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xlabel("distance from the keys to the questions (blocks)")
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = out / "probe.png"
        fig.savefig(png, dpi=120)
    return {"json": str(out / "probe.json"), "md": str(out / "probe.md"),
            "png": str(png) if png else None}
