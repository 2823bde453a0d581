"""train/distributed.py: 2-process DDP and FSDP against one process with the same global batch
(sharded checkpoints, resharded resume, an interrupted run resumed bit for bit), two nodes over
loopback, and per-layer activation checkpointing."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import records, settings, step_losses, tree_digest

from blockrecurrent.model.transformer import BlockRecurrentTransformer
from blockrecurrent.train.trainer import train

pytestmark = pytest.mark.usefixtures("quiet_training")

MULTI = ["max_steps=4", "eval_interval=2", "save_interval=2", "keep_last=0"]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process with the global batch of 4 lanes: what the 2 x 2-lane runs must match."""
    out = tmp_path_factory.mktemp("single") / "out"
    torch.set_num_threads(1)
    train(*settings(corpus, out, *MULTI))
    return out


def torchrun(corpus, out, *extra, launch=("--standalone", "--nproc_per_node=2"), timeout=240,
             run=True, program=("-m", "blockrecurrent.train"), log=None):
    """`python -m torch.distributed.run LAUNCH PROGRAM` with the tests' settings. The default
    launch, one node, leaves the ports to torchrun (--standalone: rendezvous at localhost:0).
    run=False starts it and returns the process, its output going to the file `log` (not a
    pipe: a launcher blocked on a full pipe nobody reads would stall the other node)."""
    args = [f"{k}={v}" for k, v in (("data", corpus), ("out_dir", out),
                                    ("cache_dir", corpus.parent / "cache"))]
    args += ["batch_size=2", "warmup_steps=2", "lr=3e-3", "log_interval=1", "eval_tokens=2000",
             *MULTI, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *program, "--preset", "tiny",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if not run:
        with open(log, "w") as f:  # the child keeps its own handle
            return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(got, want, keys=("loss",), exact=False):
    """Same steps, losses (and `keys` of the train records), validation losses and final weights."""
    for event, names in (("train", keys), ("eval", ("val_loss",))):
        a, b = records(got, event), records(want, event)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for k in names:
            if exact:
                assert [r[k] for r in a] == [r[k] for r in b], k
            else:
                assert [r[k] for r in a] == pytest.approx([r[k] for r in b], rel=1e-5), k
    assert ([r["tokens"] for r in records(got, "train")]
            == [r["tokens"] for r in records(want, "train")])
    a = BlockRecurrentTransformer.from_pretrained(got / "model").state_dict()
    b = BlockRecurrentTransformer.from_pretrained(want / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5)


def test_two_processes_match_one_with_the_same_global_batch(corpus, single, tmp_path):
    ddp = tmp_path / "ddp"
    proc = torchrun(corpus, ddp)
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["status"] == "completed"  # printed once
    assert_same_run(ddp, single, keys=("loss", "grad_norm"))
    step = ddp / "checkpoints" / "step_0000004"
    assert all((step / f"lanes_rank{r}.{ext}").is_file()
               for r in (0, 1) for ext in ("json", "safetensors"))
    lanes = [json.loads((step / f"lanes_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["config"]["rank"] for s in lanes] == [0, 1]


def _resume_from_step_2(run, dest):
    """A copy of `run` as an interruption right after the step-2 checkpoint leaves it (its later
    metrics lines included: the resume drops them)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step_0000004")
    shutil.rmtree(dest / "model")
    (dest / "checkpoints" / "latest").write_text("step_0000002\n")
    return dest


def test_fsdp_matches_one_process_and_resumes_resharded(corpus, single, tmp_path):
    """2-process FSDP (with activation checkpointing) == 1 process with the global batch: the
    gradient norms (before clipping) catch gradients summed over ranks instead of averaged; Adam
    alone would hide a factor 2. A 2-process run interrupted by SIGINT in step 3 (it finishes
    the step and saves) and resumed equals the uninterrupted run bit for bit; the sharded step-2
    checkpoint also resumes, resharded, with 1 process holding all 4 lanes."""
    fsdp = tmp_path / "fsdp"
    torchrun(corpus, fsdp, "parallel=fsdp", "activation_checkpointing=true")
    assert_same_run(fsdp, single, keys=("loss", "grad_norm"))
    step = fsdp / "checkpoints" / "step_0000004"
    assert ((step / "dcp" / ".metadata").is_file()
            and len(list((step / "dcp").glob("*.distcp"))) == 2)
    assert not (step / "model.safetensors").exists()  # the weights are in the shards
    assert all((step / f"{name}_rank{r}.{ext}").is_file() for r in (0, 1)
               for name, ext in (("lanes", "json"), ("lanes", "safetensors"), ("rng", "pt")))
    assert json.loads((step / "trainer.json").read_text())["world_size"] == 2

    two = tmp_path / "two"
    proc = torchrun(corpus, two, "parallel=fsdp", "activation_checkpointing=true",
                    program=(os.path.join(os.path.dirname(__file__), "interrupt_run.py"), "3"))
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (summary["status"], summary["step"], summary["model_dir"]) == ("interrupted", 3, None)
    assert (two / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    torchrun(corpus, two, "parallel=fsdp", "activation_checkpointing=true", "--resume")
    assert_same_run(two, fsdp, keys=("loss", "grad_norm"), exact=True)

    one = _resume_from_step_2(fsdp, tmp_path / "one")
    mc, tc = settings(corpus, one, *MULTI, "parallel=fsdp")  # batch_size=4: 1 x 4 lanes = 2 x 2
    with pytest.raises(ValueError, match="2 processes x batch_size 2.*1 x 2"):
        train(mc, dataclasses.replace(tc, batch_size=2), resume=True)
    assert train(mc, tc, resume=True)["status"] == "completed"
    assert_same_run(one, fsdp, keys=("loss", "grad_norm"))
    lanes = json.loads((one / "checkpoints" / "step_0000004" / "lanes_rank0.json").read_text())
    assert lanes["config"]["world_size"] == 1 and len(lanes["pos"]) == 4
    meta = one / "checkpoints" / "step_0000004" / "dcp" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    before = tree_digest(one)
    with pytest.raises(ValueError, match=r"cannot read .*step_0000004/dcp"):
        train(*settings(corpus, one, *MULTI, "parallel=fsdp", "max_steps=6"), resume=True)
    assert tree_digest(one) == before


def test_two_nodes_over_loopback_match_one_node(corpus, single, tmp_path):
    """Two torchrun launches (two "nodes", one process each) meeting at a c10d rendezvous on
    127.0.0.1, as the README's multi-node command does across machines.

    The rendezvous store is the test's own, bound to a free port (port 0) and held until both
    nodes are done, so no other process can take that port between choosing it and using it;
    both launches join it as clients (is_host=false), and node 0's launcher picks its workers'
    port itself."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = tmp_path / "nodes"
    launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{store.port}", "--rdzv_conf=is_host=false",
              "--rdzv_id=brt-test"]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [torchrun(corpus, out, "parallel=fsdp", launch=launch, run=False, log=log)
             for log in logs]
    try:
        for p in procs:
            p.wait(timeout=300)
        # Both nodes' logs: when one node's worker fails, the other only sees the store close.
        assert [p.returncode for p in procs] == [0, 0], "\n\n".join(
            log.read_text()[-3000:] for log in logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        del store  # the port is free again once both nodes have left
    assert_same_run(out, single, keys=("loss", "grad_norm"))


# -------------------------------------------------------------------- activation checkpointing

def test_activation_checkpointing_gives_the_same_steps(corpus):
    # Dropout on: the recomputed forward must draw the same masks.
    want, w_want = step_losses(corpus, "model.dropout=0.1", "grad_accum=2")
    got, w_got = step_losses(corpus, "model.dropout=0.1", "grad_accum=2",
                             "activation_checkpointing=true")
    assert got == pytest.approx(want, rel=1e-6)
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-5, atol=1e-6)
