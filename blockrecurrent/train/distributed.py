"""Processes: this process's place in a torchrun run (DistEnv, setup_distributed), the one place
that makes the model parallel (wrap_model: DistributedDataParallel, or FSDP2 with
parallel="fsdp"; the model knows nothing of it), and the whole model gathered back (full_model).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..model.config import BlockRecurrentConfig
from ..model.transformer import BlockRecurrentTransformer


@dataclass
class DistEnv:
    """This process's place in a (possibly single-process) run."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (an all-reduce: every rank must call it)."""
        return bool(self.all_reduce(torch.tensor([float(flag)], device=self.device)).item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group (nccl on CUDA, gloo on
    CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device='cpu' "
                         "or 'auto'")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not cuda:
        dev = torch.device("cpu")
    elif world > 1:
        dev = torch.device("cuda", local)  # one GPU per process
    else:
        dev = torch.device(device if device.startswith("cuda") else "cuda")
    owns = False
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), dev, owns)
    return DistEnv(0, 1, dev, False)


def checkpoint_layers(model: BlockRecurrentTransformer) -> None:
    """Per-layer activation checkpointing: each layer keeps only its inputs for backward and
    recomputes the rest (non-reentrant, RNG restored, so dropout repeats). The forward is
    replaced on the instance, so parameter names and saved files stay as they are."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def wrap_model(model: BlockRecurrentTransformer, cfg, env: DistEnv,
               autocast: torch.dtype | None) -> tuple[nn.Module, nn.Module | None]:
    """The one place that makes the model parallel: returns (module to train, DDP wrapper or
    None). FSDP2 (fully_shard) turns `model` itself into the sharded module, in place."""
    if cfg.activation_checkpointing:
        checkpoint_layers(model)
    if env.world_size == 1:
        return model, None
    cfg_m = model.config
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # With one block per segment the last state update never reaches the loss.
        unused = bool(cfg_m.recurrent_layers) and cfg_m.max_seq_len == cfg_m.block_width
        ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids,
                                      broadcast_buffers=False, find_unused_parameters=unused)
        return ddp, ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # bf16 weights in the matmuls, gradients reduced and the optimizer kept in float32. Only on
    # CUDA: on CPU, autocast alone decides (bf16 matmuls there are slow, see train.autocast_dtype).
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if env.device.type == "cuda" and autocast == torch.bfloat16 else MixedPrecisionPolicy())
    for layer in model.layers:
        # A recurrent layer's initial_state is read by the model before the layer runs (to start
        # reset rows), so its weights stay in the root group, gathered for the whole forward.
        if not layer.recurrent:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # The layers also return their caches, views that the model only detaches (never writes).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if dist.get_backend() == "gloo" and hasattr(model, "set_force_sum_reduction_for_comms"):
        # Average as SUM then a division by the world size: some torch versions sent ReduceOp.AVG
        # to gloo's reduce-scatter, which summed (pytorch issue 162338).
        model.set_force_sum_reduction_for_comms(True)
    return model, None



def full_model(model: BlockRecurrentTransformer, config: BlockRecurrentConfig, env: DistEnv,
               fsdp: bool) -> BlockRecurrentTransformer | None:
    """The whole model on rank 0 (FSDP: gathered, on the CPU; None on the other ranks)."""
    if not fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if not env.is_main:
        return None
    whole = BlockRecurrentTransformer(config)
    if config.tie_embeddings:
        full.setdefault("to_logits.weight", full["token_emb.weight"])
    whole.load_state_dict(full)
    return whole


@contextlib.contextmanager
def stop_signals(on_signal):
    """Within the block, SIGINT and SIGTERM call on_signal(signum) instead of stopping the process
    (only from the main thread, where Python runs handlers); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, lambda signum, frame: on_signal(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
