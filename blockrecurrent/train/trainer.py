"""Training: a Trainer whose loop reads top to bottom and resumes exactly, and train().

    model_config, train_config = load_train_config("configs/small.toml",
                                                   overrides=["max_steps=200"])
    summary = train(model_config, train_config)          # = brt train --config configs/small.toml
    torchrun --nproc_per_node=4 -m blockrecurrent.train --config configs/paper-150m.toml

Each batch row is a *lane* (data.DocumentLanes) reading one document segment after segment
(segment = max_seq_len); `reset` marks rows starting a new document. Memories and states are
carried from one segment to the next, detached: one forward and one backward per segment,
truncated backprop through time (paper section 3), memory flat in document length. Gradient
accumulation takes the next `grad_accum` segments of every lane (the lanes' order kept).

Under torchrun each of the world_size processes owns `batch_size` of the global lanes; the
model is wrapped by distributed.wrap_model (DDP, or FSDP2 with parallel="fsdp"), the loss is
normalised by the *global* count of real tokens (a run matches one process with the whole
batch), and only rank 0 writes files (with FSDP every rank writes its own shards and lanes).
The modules beside it, each with one job: docs/design.md, Layout.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..data import corpus as D
from ..data.lanes import DocumentLanes
from ..data.tokenizer import ByteTokenizer
from ..errors import NonFiniteLossError
from ..model.config import BlockRecurrentConfig
from ..model.memories import XLMemories
from ..model.transformer import BlockRecurrentTransformer
from . import rank_state as S
from . import resume as R
from .checkpoint import Checkpoints
from .distributed import DistEnv, setup_distributed, stop_signals, wrap_model
from .init_from import export_state_tune, freeze_but_state, initial_weights
from .metrics import MetricsLog
from .optim import autocast_dtype, lm_loss_sum, lr_at, make_optimizer
from .settings import TrainConfig, check_run_settings, resolve_model_config
from .state_health import StateHealth
from .streaming import stream_loss
from .train_data import build_data, fit_to_corpus, fixed_eval_set

__all__ = ["Trainer", "train"]


# ------------------------------------------------------------------------------- the trainer

class Trainer:
    """Owns the model (and its DDP wrapper), the optimizer, this rank's lanes with their carried
    memories and states, and the counters; `state_dict()` holds all of it, so a run resumes
    exactly; `checkpoints` writes it, `metrics` logs."""

    def __init__(self, model_config: BlockRecurrentConfig, cfg: TrainConfig,
                 train_corpus: D.TokenizedCorpus, val_corpus: D.TokenizedCorpus | None = None,
                 tokenizer=None, env: DistEnv | None = None, init_from: str | None = None):
        self.env = env = env or DistEnv()
        self.cfg, self.model_config = cfg, model_config
        self.tokenizer = tokenizer or ByteTokenizer()
        if train_corpus.vocab_size > model_config.num_tokens:
            raise ValueError(f"the tokenizer has {train_corpus.vocab_size} ids but "
                             f"model.num_tokens={model_config.num_tokens}; set "
                             f"model.num_tokens={train_corpus.vocab_size}")
        dev = env.device
        # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a stream
        # per rank for dropout.
        torch.manual_seed(cfg.seed)
        self.model = BlockRecurrentTransformer(model_config).to(dev)
        if init_from:  # before wrapping: FSDP shards what is loaded here
            self.model.load_state_dict(initial_weights(init_from, model_config))
            if env.is_main:
                print(f"note: starting from the weights of {init_from}", file=sys.stderr)
        if cfg.tune != "all":  # state tuning, also when resumed: before the optimizer is made
            freeze_but_state(self.model, cfg.tune)
        torch.manual_seed(cfg.seed + 1 + env.rank)
        np.random.seed(cfg.seed + env.rank)
        random.seed(cfg.seed + env.rank)
        self.model.train()
        self.autocast = autocast_dtype(cfg.dtype, dev)
        # FSDP: sharded weights, DCP checkpoints (also with one process, so that a run can resume
        # with another number of processes).
        self.sharded = cfg.parallel == "fsdp"
        self.fsdp = self.sharded and env.world_size > 1
        self.checkpoints = Checkpoints(cfg.out_dir, env, cfg.keep_last, self.sharded)
        self.metrics = MetricsLog(cfg.out_dir, env.is_main)
        self.train_model, self.ddp = wrap_model(self.model, cfg, env, self.autocast)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        # After wrapping: FSDP replaces the parameters by sharded ones.
        self.optimizer = make_optimizer(self.model, lr_at(1, cfg), tuple(cfg.betas),
                                        cfg.weight_decay)
        self.lanes = DocumentLanes(train_corpus, cfg.batch_size, model_config.max_seq_len,
                                     seed=cfg.seed, rank=env.rank, world_size=env.world_size)
        self.eval_corpus = fixed_eval_set(val_corpus, cfg.eval_tokens)
        self.health = StateHealth(self.eval_corpus, cfg.state_eval_tokens, env.world_size,
                                  bool(model_config.recurrent_layers))
        self.mems: XLMemories | None = None
        self.states: Tensor | None = None
        self.step = self.tokens_seen = self.nonfinite_skips = self.nonfinite_in_a_row = 0
        self.elapsed = 0.0  # training seconds, summed over resumed runs
        self.log_window = [0.0, 0.0, 0.0]  # loss nats, real tokens, all positions since last log
        self.stop_requested = False
        self.last_loss = self.last_eval = None
        self.evaluated_at: int | None = None
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
                        batch["inputs"], xl_memories=self.mems, states=self.states,
                        reset=batch["reset"])
                ce = lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
                (ce * scale).backward()  # frees this segment's graph: memories come back detached
            loss_sum += ce.detach().double()
        stop_flag = torch.tensor(float(self.stop_requested), dtype=torch.float64, device=dev)
        stats = env.all_reduce(torch.stack([loss_sum, stop_flag]))
        loss, stop = stats[0].item() / max(total, 1.0), stats[1].item() > 0
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              cfg.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor reduced over the shards
            norm = norm.full_tensor()
        self.last_grad_norm = float(norm)
        self.step += 1
        positions = cfg.grad_accum * cfg.batch_size * env.world_size * self.model_config.max_seq_len
        if not (math.isfinite(loss) and bool(torch.isfinite(norm))):
            # Skip: no update. Drop carried memories that went non-finite, or they poison every
            # later step.
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skips += 1
            self.nonfinite_in_a_row += 1
            if not all(bool(torch.isfinite(t).all())
                       for t in S.carried_tensors(self.mems, self.states).values()):
                self.mems = self.states = None
            return float("nan"), stop
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.optimizer.step()
        self.nonfinite_in_a_row = 0
        self.tokens_seen += int(total)
        self.log_window = [self.log_window[0] + loss * total, self.log_window[1] + total,
                           self.log_window[2] + positions]
        return loss, stop

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Mean loss (nats/token) and bits per byte over the fixed validation subset, and the
        state's worth on a part of it (state_health.py); shared out over ranks."""
        if self.eval_corpus is None:
            return None
        nats, tokens = self._stream_loss(self.eval_corpus, "carry")
        self.last_eval = {"val_loss": nats / max(tokens, 1.0),
                          "val_bpb": nats / math.log(2) / self.eval_corpus.total_bytes}
        if self.health.corpus is not None:
            self.last_eval.update(self.health.measure(self._stream_loss))
        return self.last_eval

    def _stream_loss(self, corpus, reset_state: str) -> tuple[float, float]:
        # FSDP: every forward gathers weights from all ranks, so they run in lockstep.
        return stream_loss(self.model, corpus, self.cfg.batch_size, self.env, reset_state,
                           autocast=self.autocast, lockstep=self.fsdp)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self, copy: bool = True, weights: bool = True) -> dict:
        """This rank's view of everything needed to continue exactly: counters and both
        configurations, model, optimizer, schedule (a function of the step), RNG, data position,
        carried memories and states. copy=False: the model's and optimizer's own tensors, for a
        save that writes them at once (Checkpoints.save, the one save path); otherwise copies,
        so later steps do not change it. weights=False leaves out model and optimizer (a sharded
        checkpoint saves them through DCP)."""
        state = {"format": R.CHECKPOINT_FORMAT, "step": self.step, "tokens_seen": self.tokens_seen,
                 "nonfinite_skips": self.nonfinite_skips,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "elapsed": self.elapsed, "log_window": list(self.log_window),
                 "last_loss": self.last_loss, "last_eval": self.last_eval,
                 "world_size": self.env.world_size, "train_config": self.cfg.to_dict(),
                 "model_config": self.model_config.to_dict()}
        if weights:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
            if copy:
                model = {k: v.detach().clone() for k, v in model.items()}
                optimizer = deepcopy(optimizer)
            state.update(model=model, optimizer=optimizer)
        state.update(scheduler={"step": self.step, "lr": lr_at(max(self.step, 1), self.cfg)},
                     lanes=self.lanes.state_dict(), rng=S.rng_state(self.env.device),
                     lane_tensors=S.carried_tensors(self.mems, self.states))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s snapshot. Without "model" and "optimizer" (a sharded checkpoint
        loads them itself) the rest only; "rng": None starts fresh per-rank streams."""
        R.check_state_fits(state, self.env.world_size, self.model_config)
        try:
            if "model" in state or "optimizer" in state:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.lanes.load_state_dict(state["lanes"])
            self.mems, self.states = S.carried_from_tensors(
                state["lane_tensors"], self.env.device, self.model_config.depth,
                self.cfg.batch_size)
            for k in ("step", "tokens_seen", "nonfinite_skips", "nonfinite_in_a_row"):
                setattr(self, k, int(state[k]))
            self.elapsed = float(state["elapsed"])
            self.log_window = [float(x) for x in state["log_window"]]
            self.last_loss = state.get("last_loss")  # for the summary
            self.last_eval = state.get("last_eval")
            if state["rng"] is not None:
                S.set_rng_state(state["rng"], self.env.device)
            else:  # a new stream per rank, from the seed and the step
                S.seed_all(self.cfg.seed + 1 + self.env.rank + 1_000_003 * self.step)
        except (KeyError, TypeError, RuntimeError, IndexError) as err:
            raise ValueError(f"trainer state does not fit this run: {err!r}") from None

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to max_steps (or a SIGINT/SIGTERM: finish the step, checkpoint, return)."""
        cfg, status, model_dir = self.cfg, "completed", None
        self._prepare_out_dir()
        with stop_signals(self._on_stop_signal), self._progress_bar() as bar, \
                contextlib.closing(self.metrics):
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss, stop = self.train_step()
                self.elapsed += time.perf_counter() - t0
                bar.update(1)
                if not math.isfinite(loss):
                    self._nonfinite_step()
                done = self.step >= cfg.max_steps
                if (self.step % cfg.log_interval == 0 or done) and self.log_window[1] > 0:
                    self._log_train(bar)  # the last steps too: the summary's train_loss
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 or done:
                    self._evaluate_and_log(bar)
                if cfg.save_interval and self.step % cfg.save_interval == 0 or done or stop:
                    self.checkpoints.save(self)
                    self.metrics.plot()
                if stop and not done:
                    status = "interrupted"
                    break
        summary = {}
        if status == "completed":  # (also when resumed at max_steps: re-export)
            model_dir = self.checkpoints.export(self)
            self.metrics.plot()
            if cfg.tune != "all" and self.env.is_main:
                summary = export_state_tune(self.out_dir, model_dir, cfg.tune, cfg.init_from)
        return {**self._summary(status, model_dir), **summary}

    def _prepare_out_dir(self) -> None:
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints.clear_stale()
        if self.cfg.tensorboard:
            self.metrics.open_tensorboard()
        self._log_elapsed = self.elapsed  # training seconds at the last metrics line

    def _progress_bar(self):
        from tqdm.auto import tqdm
        quiet = {} if self.env.is_main else {"disable": True}  # else tqdm honours TQDM_DISABLE=1
        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", mininterval=1.0,
                    **quiet)

    def _log(self, record: dict) -> None:
        self.metrics.log(self.step, self.elapsed, record)

    def _nonfinite_step(self) -> None:
        """Log a skipped step; stop (NonFiniteLossError) after max_nonfinite in a row."""
        self._log({"event": "nonfinite", "nonfinite_skips": self.nonfinite_skips})
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            last = self.checkpoints.latest()
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                f"{self.step}); stopped without saving. The last good checkpoint is "
                f"{last or 'none'}. Lower lr, keep grad_clip on, or use dtype='float32'")

    def _log_train(self, bar) -> None:
        """A metrics line over the steps since the last one."""
        nats, real, positions = self.log_window
        secs = self.elapsed - self._log_elapsed
        rec = {"event": "train", "loss": nats / real, "lr": lr_at(self.step, self.cfg),
               "tokens": self.tokens_seen, "tokens_per_s": real / max(secs, 1e-9),
               "padding_fraction": 1 - real / positions, "grad_norm": self.last_grad_norm,
               "nonfinite_skips": self.nonfinite_skips}
        self._log(rec)
        self.last_loss = rec["loss"]  # the summary's train_loss: the bar's and metrics.jsonl's
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.log_window, self._log_elapsed = [0.0, 0.0, 0.0], self.elapsed

    def _evaluate_and_log(self, bar) -> None:
        if self.evaluate() is None:
            return
        self.evaluated_at = self.step
        self._log({"event": "eval", **self.last_eval})
        if self.env.is_main:
            gain = self.last_eval.get("state_gain_pct")
            bar.write(f"step {self.step}: val_loss {self.last_eval['val_loss']:.4f}, "
                      f"val_bpb {self.last_eval['val_bpb']:.4f}"
                      + ("" if gain is None else f", state gain {gain:+.2f}%"))
            warning = self.health.warning()
            if warning:
                bar.write("warning: " + warning)

    def _summary(self, status: str, model_dir: Path | None) -> dict:
        ckpt, last_eval = self.checkpoints.path(self.step), self.last_eval or {}
        return {"status": status, "step": self.step, "train_loss": self.last_loss,
                "val_loss": last_eval.get("val_loss"), "val_bpb": last_eval.get("val_bpb"),
                "evaluated_at": self.evaluated_at, "tokens_seen": self.tokens_seen,
                "nonfinite_skips": self.nonfinite_skips, "elapsed_s": self.elapsed,
                "out_dir": str(self.out_dir), "checkpoint": str(ckpt) if ckpt.exists() else None,
                "model_dir": str(model_dir) if model_dir else None,
                "metrics": str(self.metrics.path)}

    def _on_stop_signal(self, signum: int) -> None:
        # A second Ctrl-C stops at once (no checkpoint). Not a SIGTERM after a Ctrl-C: torchrun
        # forwards one to its workers, and they should still save.
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.env.is_main:
            print(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then "
                  "saving a checkpoint (send again to stop at once)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ entry points

def train(model_config: BlockRecurrentConfig, train_config: TrainConfig, resume: bool = False
          ) -> dict:
    """Build data, model and trainer, optionally resume from out_dir's latest checkpoint, train.
    Returns a summary: status ("completed" | "interrupted"), step, train_loss (the mean loss per
    token over the steps of the last metrics line, as the progress bar shows it), val_loss, val_bpb,
    tokens_seen, paths (out_dir, checkpoint, model_dir, metrics). Everything a user can get
    wrong raises ValueError/TypeError before training starts, and before anything is written."""
    check_run_settings(model_config, train_config)
    cfg = train_config
    checkpoint, meta = Checkpoints(cfg.out_dir).resume_point(resume, cfg)
    env = setup_distributed(cfg.device)
    try:
        tokenizer = None
        if resume:  # the checkpoint's tokenizer; check the model settings before reading any data
            tokenizer = R.checkpoint_tokenizer(checkpoint)
            R.check_model_config(meta.get("model_config"),
                               resolve_model_config(model_config, cfg, tokenizer.vocab_size))
        tokenizer, train_corpus, val_corpus = build_data(cfg, env, tokenizer)
        cfg = fit_to_corpus(cfg, train_corpus, val_corpus, env, resume)
        resolved = resolve_model_config(model_config, cfg, tokenizer.vocab_size)
        if resolved.num_tokens != model_config.num_tokens and env.is_main and not resume:
            print(f"note: model.num_tokens = {tokenizer.vocab_size}, the tokenizer's vocabulary "
                  f"(was {model_config.num_tokens})", file=sys.stderr)
        model_config = resolved
        if val_corpus is None and cfg.eval_tokens and env.is_main:  # one line, not a warning
            print("note: the corpus has too few documents for a validation split (3 or more "
                  "are needed): training without evaluation", file=sys.stderr)
        init_from = None if resume else cfg.init_from or None  # a resume has its own weights
        trainer = Trainer(model_config, cfg, train_corpus, val_corpus, tokenizer, env, init_from)
        if resume:
            trainer.checkpoints.load(trainer, checkpoint)
            trainer.metrics.truncate(trainer.step)  # drop what was logged after the checkpoint
        else:
            trainer.metrics.start_new()  # a metrics.jsonl left by a run that never checkpointed
        env.barrier()
        return trainer.fit()
    finally:
        if env.owns_group:
            dist.destroy_process_group()
