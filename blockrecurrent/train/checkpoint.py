"""Checkpoints of a training run: one manager (Checkpoints) that saves, loads, finds the latest,
keeps the last keep_last and exports the final model. Which checkpoint to resume from and the
checks before a resume are resume.py's; the per-rank RNG and lane state rank_state.py's.

A checkpoint, out_dir/checkpoints/step_0000100/, is also a model directory that
BlockRecurrentTransformer.from_pretrained and `brt generate` read directly:
    config.json, model.safetensors      the model (save_pretrained, unwrapped weights)
    tokenizer_config.json [+ .json]     the tokenizer (tokenizer.save)
    trainer.json                        step, counters, both configurations, world size
    optimizer.pt                        AdamW state (torch.save; read with weights_only=True)
    lanes_rank{r}.json                  rank r's data position (DocumentLanes.state_dict)
    lanes_rank{r}.safetensors           rank r's carried memories ("memories.*") and "states"
    rng_rank{r}.pt                      rank r's torch / cuda / numpy / python RNG states
It is written to a temporary directory and renamed, so it exists whole or not at all;
checkpoints/latest names the newest. At the end the model is exported to out_dir/model/.
With parallel="fsdp" the weights and optimizer are sharded instead (torch.distributed.checkpoint):
    dcp/                                .metadata and one __{r}_0.distcp per rank: model, optimizer
    (no config.json / model.safetensors / optimizer.pt; the rest as above, each rank writing its own
    lanes_rank{r}.* and rng_rank{r}.pt), resumable with another number of processes: _load_sharded.

What is written is Trainer.state_dict() (taken without copies): the keys of RANK_KEYS go to the
rank files, "model" and "optimizer" to the weights, the rest to trainer.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import make_temp_dir, usual_mode, write_atomic, write_json
from ..model.transformer import BlockRecurrentTransformer
from .distributed import DistEnv, full_model
from .resume import (
    check_model_config,
    check_resume,
    latest_checkpoint,
    previous_intact_hint,
    step_dirs,
)

# Trainer.state_dict() entries written per rank, and those that are not written to trainer.json.
RANK_KEYS = ("lanes", "rng", "lane_tensors")
_NOT_META = (*RANK_KEYS, "model", "optimizer", "scheduler")


def _unreadable(path, err) -> ValueError:
    return ValueError(f"cannot read {path}: {err}; the checkpoint is incomplete or corrupted"
                      + previous_intact_hint(Path(path).parent))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise _unreadable(path, err) from None


def _torch_load(path: Path, device):
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from None


def _write_rank_files(directory: Path, rank: int, part: dict) -> None:
    """One rank's data position, carried memories and states, and RNG (RANK_KEYS of the state)."""
    from safetensors.torch import save_file
    save_file(part["lane_tensors"], str(directory / f"lanes_rank{rank}.safetensors"))
    usual_mode(directory / f"lanes_rank{rank}.safetensors")
    write_json(directory / f"lanes_rank{rank}.json", part["lanes"])
    torch.save(part["rng"], directory / f"rng_rank{rank}.pt")


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns at every save/load of a single process (no process group); that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class Checkpoints:
    """out_dir/checkpoints/ of one run, for one rank: save, load, latest, keep_last, export. Every
    rank calls save, load and export (they gather or shard); only rank 0 writes the shared files."""

    def __init__(self, out_dir, env: DistEnv | None = None, keep_last: int = 0,
                 sharded: bool = False):
        self.out_dir, self.env = Path(out_dir), env or DistEnv()
        self.root = self.out_dir / "checkpoints"
        self.keep_last, self.sharded = keep_last, sharded

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:07d}"

    def resume_point(self, resume: bool, cfg) -> tuple[Path | None, dict | None]:
        """(checkpoint, its trainer.json) to resume from, or (None, None) for a new run; a
        ValueError saying what to do where out_dir and `resume` disagree."""
        checkpoint, out = self.latest(), self.out_dir
        if not resume and (checkpoint is not None or (out / "model").exists()):
            raise ValueError(f"{out} already holds a run ({checkpoint or out / 'model'}); pass "
                             "resume=True (brt train --resume) to continue it, or choose another "
                             "out_dir")
        if not resume:
            return None, None
        if checkpoint is None:
            raise ValueError(f"nothing to resume: {self.root} holds no checkpoint; drop "
                             "--resume to start a new run")
        newer = [p.name for p in step_dirs(self.root)
                 if int(p.name[5:]) > int(checkpoint.name[5:])]
        if newer:
            raise ValueError(f"resuming from {checkpoint.name} would overwrite the newer "
                             "checkpoints "
                             f"{newer}; delete them or point checkpoints/latest at the newest")
        meta = _read_json(checkpoint / "trainer.json")
        check_resume(meta, cfg, checkpoint)
        return checkpoint, meta

    def clear_stale(self) -> None:
        """Remove the temporary directories of a crashed save (rank 0)."""
        if self.env.is_main:
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)

    # --- save ----------------------------------------------------------------------------
    def save(self, trainer) -> Path:
        """Write checkpoints/step_XXXXXXX from trainer.state_dict() (rank 0, gathering every
        rank's lanes), atomically; update checkpoints/latest and keep the last keep_last."""
        env, final = self.env, self.path(trainer.step)
        if final.exists():  # seen by every rank: none is left waiting for the others
            raise FileExistsError(f"{final} already exists; not overwriting it")
        state = trainer.state_dict(copy=False, weights=not self.sharded)
        meta = {k: v for k, v in state.items() if k not in _NOT_META}
        part = {k: state[k] for k in RANK_KEYS}
        if self.sharded:
            return self._save_sharded(trainer, final, meta, part)
        parts = [part]
        if env.world_size > 1:
            gathered = [None] * env.world_size if env.is_main else None
            dist.gather_object(part, gathered, dst=0)
            parts = gathered
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(self.root, f".tmp-{final.name}-")
            try:
                trainer.model.save_pretrained(tmp)  # state["model"], as a model directory
                trainer.tokenizer.save(tmp)
                torch.save(state["optimizer"], tmp / "optimizer.pt")
                for r, p in enumerate(parts):
                    _write_rank_files(tmp, r, p)
                write_json(tmp / "trainer.json", meta)  # written last
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._point_latest(final)
        env.barrier()
        return final

    def _point_latest(self, final: Path) -> None:
        write_atomic(self.root / "latest", lambda f: f.write(f"{final.name}\n".encode()))
        if self.keep_last:
            for old in step_dirs(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _save_sharded(self, trainer, final: Path, meta: dict, part: dict) -> Path:
        """FSDP checkpoint: model and optimizer through torch.distributed.checkpoint (DCP), each
        rank writing its shards into dcp/, and each rank its own lanes and RNG files. All ranks
        write into one temporary directory (on multi-node runs out_dir must be a shared file
        system), which rank 0 renames once every rank has finished."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        env = self.env
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)  # the local shards
        tmp = [None]
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = [make_temp_dir(self.root, f".tmp-{final.name}-")]
        if env.world_size > 1:
            dist.broadcast_object_list(tmp, src=0)
        tmp, error = tmp[0], None
        try:
            _write_rank_files(tmp, env.rank, part)
            if env.is_main:
                trainer.tokenizer.save(tmp)
        except Exception as err:
            error = err
        try:
            if env.any_rank(error is not None):
                raise error or RuntimeError(f"another rank failed to write its files into {tmp}")
            with _single_process_dcp():
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"),
                         no_dist=env.world_size == 1)
            if env.is_main:  # dcp.save returns on rank 0 after every rank's shards are written
                write_json(tmp / "trainer.json", meta)
                os.replace(tmp, final)
        except BaseException:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if env.is_main:
            self._point_latest(final)
        env.barrier()
        return final

    # --- load ----------------------------------------------------------------------------
    def load(self, trainer, path) -> None:
        """Restore a checkpoint directory into trainer.load_state_dict (each rank reads its own
        lanes). ValueError naming the file if anything is missing, unreadable or does not fit
        this run; nothing is written."""
        path, rank, dev = Path(path), self.env.rank, self.env.device
        from safetensors.torch import load_file
        meta = _read_json(path / "trainer.json")
        written = (meta.get("train_config") or {}).get("parallel", "ddp")
        if (written == "fsdp") != self.sharded:
            raise ValueError(f"{path} was written with parallel={written!r} and this run has "
                             f"parallel={trainer.cfg.parallel!r}; resume with parallel={written!r}")
        if self.sharded:
            return self._load_sharded(trainer, path, meta)
        try:
            model = BlockRecurrentTransformer.from_pretrained(path)  # validates config + weights
        except ValueError as err:
            raise ValueError(f"{err}{previous_intact_hint(path)}") from None
        lanes_file = path / f"lanes_rank{rank}.safetensors"
        try:
            tensors = load_file(str(lanes_file))
        except Exception as err:
            raise _unreadable(lanes_file, err) from None
        trainer.load_state_dict({**meta, "model": model.state_dict(),
                              "optimizer": _torch_load(path / "optimizer.pt", dev),
                              "lanes": _read_json(path / f"lanes_rank{rank}.json"),
                              "rng": _torch_load(path / f"rng_rank{rank}.pt", "cpu"),
                              "lane_tensors": tensors})

    def _load_sharded(self, trainer, path: Path, meta: dict) -> None:
        """Model and optimizer from dcp/, resharded by DCP to this run's processes. The lanes
        are global (DocumentLanes): with the same global batch, rank r takes global lanes
        r*batch_size ... with their carried memories from whichever ranks held them, so the data
        and the memories continue exactly whatever the number of processes. The per-rank RNG
        streams (dropout) continue exactly only with the same number; otherwise each rank starts
        a new stream from the seed and the step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        check_model_config(meta.get("model_config"), trainer.model_config)
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)  # templates to fill
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            with _single_process_dcp():
                dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=self.env.world_size == 1)
        except (Exception, dcp.CheckpointException) as err:  # the latter is a BaseException
            raise ValueError(f"cannot read {path / 'dcp'}: {err}; the checkpoint is incomplete, "
                             "corrupted or from another model") from None
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        lanes, tensors, same = self._gather_lanes(trainer.lanes, path, meta)
        rng = _torch_load(path / f"rng_rank{self.env.rank}.pt", "cpu") if same else None
        trainer.load_state_dict({**meta, "world_size": self.env.world_size, "lanes": lanes,
                                 "rng": rng, "lane_tensors": tensors})

    def _gather_lanes(self, lanes_now, path: Path, meta: dict) -> tuple[dict, dict, bool]:
        """This rank's lanes state and carried tensors, taken row by row from the checkpoint's
        ranks; and whether the layout is the one saved (then the RNG state fits too)."""
        from safetensors.torch import load_file
        old_world = meta.get("world_size")
        old_b = (meta.get("train_config") or {}).get("batch_size")
        b, rank = lanes_now.batch_size, self.env.rank
        ints = isinstance(old_world, int) and isinstance(old_b, int)
        if not ints or old_world * old_b != b * self.env.world_size:
            raise ValueError(f"{path} holds {old_world} x {old_b} lanes (processes x batch_size) "
                             "and this run "
                             f"has {self.env.world_size} x {b}; keep the global batch to resume")
        rows = [divmod(j, old_b) for j in range(rank * b, (rank + 1) * b)]  # (old rank, row)
        sources = sorted({r for r, _ in rows})
        states, parts = {}, {}
        for r in sources:
            states[r] = _read_json(path / f"lanes_rank{r}.json")
            file = path / f"lanes_rank{r}.safetensors"
            try:
                parts[r] = load_file(str(file))
            except Exception as err:
                raise _unreadable(file, err) from None
        if sources == [rank] and old_b == b:  # the saved layout: as written
            return states[rank], parts[rank], old_world == self.env.world_size
        now = lanes_now._config()
        for r, st in states.items():
            saved = st.get("config", {}) if isinstance(st, dict) else {}
            want = {**now, "batch_size": old_b, "rank": r, "world_size": old_world}
            if saved != want:
                raise ValueError(f"{path / f'lanes_rank{r}.json'} does not fit this run's data "
                                 f"(saved {saved}, expected {want})")
        if len({tuple(sorted(p)) for p in parts.values()}) > 1:
            raise ValueError(f"the ranks of {path} carried different memories (one dropped them "
                             "after a "
                             "non-finite step); resume with the same number of processes")
        lanes = {"format": 1, "config": now, **{k: [states[r][k][i] for r, i in rows]
                                                 for k in ("epoch", "pos", "offset")}}
        batches = states[sources[0]]["batches"]
        lanes.update(batches=batches, seen_targets=batches * b * lanes_now.segment_len,  # counters:
                     padded_targets=sum(states[r]["padded_targets"] for r in sources) * b
                     // (old_b * len(sources)))
        dim = {k: 1 if k == "states" else 0 for k in parts[sources[0]]}  # states: (r, b, s, e)
        tensors = {k: torch.cat([parts[r][k].narrow(d, i, 1) for r, i in rows], dim=d)
                   for k, d in dim.items()}
        return lanes, tensors, False

    # --- export ----------------------------------------------------------------------------
    def export(self, trainer) -> Path:
        """The final model (and tokenizer) as out_dir/model/, swapped in whole."""
        dest = self.out_dir / "model"
        model = full_model(trainer.model, trainer.model_config, self.env, trainer.fsdp)
        if self.env.is_main:
            tmp = make_temp_dir(self.out_dir, ".tmp-model-")
            model.save_pretrained(tmp)
            trainer.tokenizer.save(tmp)
            old = self.out_dir / f".old-model-{os.getpid()}"
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        self.env.barrier()
        return dest
