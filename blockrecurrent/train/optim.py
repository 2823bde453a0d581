"""Optimisation pieces of the trainer: the learning-rate schedule, the loss over real tokens,
the autocast dtype and AdamW with weight decay on matrices only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .settings import TrainConfig, torch_dtype


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


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays: CUDA with bf16 support. Not on CPU by default: without AMX,
    PyTorch's CPU bf16 matmuls measured ~10x slower than float32 for the small preset on this
    project's 2-core machine. None means plain float32."""
    if setting == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    dtype = torch_dtype(setting)
    return None if dtype == torch.float32 else dtype



def make_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0):
    """AdamW over the parameters that train (requires_grad) that decays only the weight matrices
    of linear maps and embeddings; not norms, biases, gate biases, attention scales, nor the
    learned initial state and state ids."""
    matrices = {id(m.weight) for m in model.modules()
                if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d))}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0}]
    # State tuning trains no matrix; FSDP's sharded optimizer load cannot restore an empty group.
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel: ~5x faster steps than the per-tensor loop (CPU too since torch 2.4)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
