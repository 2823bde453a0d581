"""State tuning (`brt train --tune-state MODEL_DIR`): every weight of a saved model frozen, only
each recurrent layer's document-start state (`initial_state`, and with_ids the slots'
`state_ids`) trained on a corpus, like prompt tuning but for the state. The result is a small
file (model/state_tune.py) that `brt generate --state-tune FILE` or `apply_state_tune` applies
to the base model.

It reads the corpus as training does (build_data with the base model's tokenizer, document lanes
of max_seq_len tokens, memories and states carried) and uses the run's batch_size, max_steps,
lr (constant after warmup_steps), betas, grad_clip, seed and out_dir. The held-out loss (up to
eval_tokens of validation documents) is measured before and after and written with the file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..data.lanes import DocumentLanes
from ..data.tokenizer import load_tokenizer
from ..files import write_json
from ..model.saving import check_device
from ..model.state_tune import STATE_TUNE_FILE, base_fingerprint, save_state_tune, tuned_parameters
from ..model.transformer import BlockRecurrentTransformer
from .optim import lm_loss_sum
from .settings import TrainConfig
from .train_data import build_data

__all__ = ["tune_state"]


def _device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(setting)
    return setting


def _loss(model, lanes: DocumentLanes, batches: int, dev, train: bool = False, opt=None,
          params=(), grad_clip: float = 0.0) -> float:
    """Mean loss per token over `batches` batches of the lanes (memories and states carried);
    with opt, an optimizer step per batch."""
    mems = states = None
    total = count = 0.0
    for _ in range(batches):
        b = {k: v.to(dev) for k, v in lanes.next_batch().items()}
        with torch.set_grad_enabled(train):
            logits, mems, states = model(b["inputs"], xl_memories=mems, states=states,
                                         reset=b["reset"])
            ce = lm_loss_sum(logits, b["targets"], b["loss_mask"])
        n = float(b["loss_mask"].sum())
        if opt is not None and n > 0:
            opt.zero_grad(set_to_none=True)
            (ce / n).backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        total, count = total + ce.item(), count + n
    return total / max(count, 1.0)


def _heldout(model, corpus, cfg: TrainConfig, dev) -> float | None:
    """The loss on the first validation documents (eval_tokens worth), in eval mode."""
    if corpus is None or not cfg.eval_tokens:
        return None
    seg = model.config.max_seq_len
    rows = max(1, min(cfg.batch_size, len(corpus.doc_lengths)))
    lanes = DocumentLanes(corpus, rows, seg, seed=0, shuffle=False)
    batches = max(1, cfg.eval_tokens // (rows * seg))
    model.eval()
    try:
        return _loss(model, lanes, batches, dev)
    finally:
        model.train()


def tune_state(model_dir, cfg: TrainConfig, with_ids: bool = False, log=None) -> dict:
    """Tune the document-start state of the model saved in model_dir on cfg.data ->
    summary (losses before and after, the file's path). Writes out_dir/state_tune.safetensors
    and out_dir/state_tune.json."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    dev = _device(cfg.device)
    model = BlockRecurrentTransformer.from_pretrained(model_dir, map_location=dev)
    fingerprint = base_fingerprint(model)
    params = tuned_parameters(model, with_ids)  # ValueError without a recurrent layer
    tokenizer = load_tokenizer(model_dir)
    tokenizer, train_corpus, val_corpus = build_data(cfg, None, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    before = _heldout(model, val_corpus, cfg, dev)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    lanes = DocumentLanes(train_corpus, cfg.batch_size, model.config.max_seq_len,
                          seed=cfg.seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, cfg.max_steps + 1):
        losses.append(_loss(model, lanes, 1, dev, True, opt, list(params.values()),
                            cfg.grad_clip))
        sched.step()
        if step % max(1, cfg.log_interval) == 0 or step == cfg.max_steps:
            log(f"step {step}/{cfg.max_steps}: loss {losses[-1]:.4f}")
    after = _heldout(model, val_corpus, cfg, dev)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_state_tune(out / STATE_TUNE_FILE, model, with_ids, fingerprint,
                    extra={"base_model": str(model_dir), "steps": cfg.max_steps})
    summary = {"status": "completed", "steps": cfg.max_steps, "tuned": sorted(params),
               "tuned_values": sum(p.numel() for p in params.values()),
               "train_loss": losses[-1] if losses else None, "val_loss_before": before,
               "val_loss_after": after, "seconds": round(time.perf_counter() - t0, 2),
               "state_tune": str(out / STATE_TUNE_FILE)}
    write_json(out / "state_tune.json", summary)
    log(json.dumps({k: summary[k] for k in ("val_loss_before", "val_loss_after")}))
    return summary
