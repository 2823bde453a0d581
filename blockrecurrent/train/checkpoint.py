"""Checkpoints of a training run: one manager (Checkpoints) that saves, loads, finds the latest,
keeps the last keep_last and exports the final model; RNG state; the checks before a resume.

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
import random
import re
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..files import make_temp_dir, usual_mode, write_atomic, write_json
from ..model.config import PRESETS, BlockRecurrentConfig, as_saved_now
from ..model.memories import XLMemories
from ..model.transformer import BlockRecurrentTransformer
from .distributed import DistEnv, full_model
from .settings import TrainConfig, _given_settings, _model_config, load_train_config

CHECKPOINT_FORMAT = 1
# Settings that fix the data stream or the vocabulary: a resumed run must keep them.
_RESUME_FIXED = ("data", "text_field", "tokenizer", "bpe_vocab_size", "batch_size", "seed",
                 "baseline")
# Trainer.state_dict() entries written per rank, and those that are not written to trainer.json.
RANK_KEYS = ("lanes", "rng", "lane_tensors")
_NOT_META = (*RANK_KEYS, "model", "optimizer", "scheduler")


def _unreadable(path, err) -> ValueError:
    return ValueError(f"cannot read {path}: {err}; the checkpoint is incomplete or corrupted"
                      + previous_intact_hint(Path(path).parent))


def previous_intact_hint(checkpoint: Path) -> str:
    """How to resume from the newest earlier checkpoint that looks whole, after `checkpoint`
    turned out unreadable; "" when there is none."""
    checkpoint = Path(checkpoint)
    if not re.fullmatch(r"step_\d+", checkpoint.name):
        return ""
    root, step = checkpoint.parent, int(checkpoint.name[5:])
    for prev in reversed(_step_dirs(root)):
        if int(prev.name[5:]) < step and _looks_whole(prev):
            return (f". The previous checkpoint {prev} looks intact: to resume from it, move "
                    f"{checkpoint} out of {root} and delete {root / 'latest'}")
    return ""


def _looks_whole(checkpoint: Path) -> bool:
    """Its trainer.json reads and its weights, optimizer and rank 0's files are there."""
    try:
        meta = json.loads((checkpoint / "trainer.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    weights = ("dcp",) if (checkpoint / "dcp").is_dir() else ("model.safetensors", "optimizer.pt")
    return isinstance(meta, dict) and isinstance(meta.get("step"), int) and all(
        (checkpoint / name).exists()
        for name in (*weights, "lanes_rank0.json", "lanes_rank0.safetensors", "rng_rank0.pt"))


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


def rng_state(device: torch.device) -> dict:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (temporary directories start with a dot), oldest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint named by out_dir/checkpoints/latest, else the highest-numbered one."""
    root = Path(out_dir) / "checkpoints"
    steps = _step_dirs(root)
    if (root / "latest").is_file():
        name = (root / "latest").read_text("utf-8").strip()
        if not (root / name).is_dir():
            raise ValueError(f"{root / 'latest'} names {name!r}, which does not exist; edit it to "
                             f"name one of {[p.name for p in steps]}")
        return root / name
    return steps[-1] if steps else None


def check_model_config(saved, now: BlockRecurrentConfig) -> None:
    now, saved = now.to_dict(), as_saved_now(saved)  # a checkpoint from before a field: its value
    if saved != now:
        saved = saved if isinstance(saved, dict) else {}
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)}
        raise ValueError("the model settings differ from the checkpoint's "
                         f"({{name: (checkpoint, now)}}: {diff}); resume with the "
                         "checkpoint's settings or start a new out_dir")



def check_state_fits(state: dict, world_size: int, model_config: BlockRecurrentConfig) -> None:
    """A trainer state (Trainer.state_dict) of this format, world size and model."""
    meta = {k: state.get(k) for k in ("format", "world_size", "model_config")}
    if meta["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"trainer state has format {meta['format']!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    if meta["world_size"] != world_size:
        raise ValueError(f"the checkpoint was written by {meta['world_size']} processes and "
                         f"this run has {world_size}; resume with the same number "
                         "(its lanes are per rank)")
    check_model_config(meta["model_config"], model_config)


def carried_tensors(mems: XLMemories | None, states: Tensor | None) -> dict[str, Tensor]:
    """The lanes' carried memories ("memories.*") and states ("states"), on the CPU."""
    tensors = {} if mems is None else {f"memories.{k}": v.detach().contiguous().cpu()
                                       for k, v in mems.state_dict().items()}
    if states is not None:
        tensors["states"] = states.detach().contiguous().cpu()
    return tensors


def carried_from_tensors(tensors: dict, device, depth: int, batch_size: int
                         ) -> tuple[XLMemories | None, Tensor | None]:
    """carried_tensors' inverse, checked against the model's depth and the batch size."""
    mems = {k[len("memories."):]: v.to(device) for k, v in tensors.items()
            if k.startswith("memories.")}
    mems = XLMemories.from_state_dict(mems) if mems else None
    states = tensors["states"].to(device) if "states" in tensors else None
    if mems is not None and (len(mems.keys) != depth or mems.batch_size != batch_size):
        raise ValueError("carried memories do not fit this model and batch_size")
    if states is not None and states.shape[1] != batch_size:
        raise ValueError("carried states do not fit batch_size")
    return mems, states


def check_resume(meta: dict, cfg: TrainConfig, path: Path) -> None:
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("train_config"), dict):
        raise ValueError(f"{path / 'trainer.json'} lacks step/train_config; the checkpoint is "
                         "corrupted" + previous_intact_hint(path))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / 'trainer.json'} has format {meta.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT}; it was not written by this trainer")
    saved, now = meta.get("train_config") or {}, cfg.to_dict()
    written = saved.get("parallel", "ddp")
    if written != cfg.parallel:
        raise ValueError(f"the checkpoint {path} was written with parallel={written!r} (its format "
                         f"follows); resume with parallel={written!r}")
    fixed = _RESUME_FIXED
    if written == "fsdp":  # resharded on resume: the global batch (lanes) is what must stay
        fixed = tuple(k for k in fixed if k != "batch_size")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        old = (meta.get("world_size"), saved.get("batch_size"))
        if not all(isinstance(v, int) for v in old) or old[0] * old[1] != world * cfg.batch_size:
            raise ValueError(f"the checkpoint {path} has {old[0]} processes x batch_size {old[1]} "
                             f"lanes and this run {world} x {cfg.batch_size}; keep processes x "
                             "batch_size to resume")
    diff = {k: (saved.get(k), now[k]) for k in fixed if saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"these settings fix the data stream and differ from the checkpoint "
                         f"{path} ({{name: (checkpoint, now)}}: {diff}); resume with the "
                         "checkpoint's "
                         "values or start a new out_dir")
    if meta["step"] > cfg.max_steps:
        raise ValueError(f"the checkpoint {path} is at step {meta['step']}, beyond max_steps="
                         f"{cfg.max_steps}; raise max_steps to continue")



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
        newer = [p.name for p in _step_dirs(self.root)
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
            for old in _step_dirs(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _any_rank(self, flag: bool) -> bool:
        return bool(self.env.all_reduce(torch.tensor([float(flag)], device=self.env.device)).item())

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
            if self._any_rank(error is not None):
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


# --- resuming with the run's own settings ------------------------------------------------


def load_resume_config(path=None, preset: str | None = None, overrides=()
                       ) -> tuple[BlockRecurrentConfig, TrainConfig, str | None]:
    """The settings to resume the run in out_dir with: those saved in its latest checkpoint
    (trainer.json), under the file's, the preset's and the overrides given (the resume then
    checks that they fit), and a line saying so. Where out_dir holds no readable checkpoint:
    load_train_config's settings and None (train() then says what is wrong)."""
    name, model_values, train_values = _given_settings(path, preset, overrides)
    out_dir = train_values.get("out_dir", TrainConfig.out_dir)
    checkpoint = None
    if isinstance(out_dir, (str, os.PathLike)):  # else TrainConfig's type check says what's wrong
        out_dir = os.fspath(out_dir)
        checkpoint = latest_checkpoint(out_dir)
    saved = _saved_settings(checkpoint) if checkpoint is not None else None
    if saved is None:
        return (*load_train_config(path, preset, overrides), None)
    saved_model, saved_train = saved
    saved_train = {**saved_train, "out_dir": out_dir}  # where it is now, if it was moved
    model_dict = {**saved_model, **(PRESETS[name] if name else {}), **model_values}
    train_config = TrainConfig(**{**saved_train, **train_values})
    now = train_config.to_dict()
    changed = [f"{k}={now[k]!r}" for k in now if k in saved_train and saved_train[k] != now[k]]
    note = (f"resuming {out_dir} from {checkpoint.name} with the settings saved there"
            + (f", except {', '.join(changed)}" if changed else ""))
    return _model_config(model_dict), train_config, note


def _saved_settings(checkpoint) -> tuple[dict, dict] | None:
    """(model settings, train settings) of a checkpoint's trainer.json; None if unreadable."""
    try:
        meta = json.loads((Path(checkpoint) / "trainer.json").read_text("utf-8"))
        model = BlockRecurrentConfig.from_dict(meta["model_config"]).to_dict()
        train = {f.name: meta["train_config"][f.name] for f in fields(TrainConfig)
                 if f.name in meta["train_config"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model, train
