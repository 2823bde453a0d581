"""train/checkpoint.py: a finished run is never overwritten, a resume checks its settings against
the checkpoint's, and a damaged checkpoint is a clear error that changes nothing."""
import shutil

import pytest
from helpers import settings, tree_digest

from blockrecurrent.train.trainer import train

pytestmark = pytest.mark.usefixtures("quiet_training")


def test_refuses_to_overwrite_and_checks_resume_settings(corpus, finished):
    out, _ = finished
    before = tree_digest(out)
    with pytest.raises(ValueError, match="already holds a run.*resume"):
        train(*settings(corpus, out))
    for extra, match in [(["model.depth=3"], "model settings differ.*depth"),
                         (["batch_size=2"], "batch_size"),
                         (["max_steps=6", "warmup_steps=1"], "beyond max_steps=6"),
                         (["parallel=fsdp"], "parallel='ddp'")]:
        with pytest.raises(ValueError, match=match):
            train(*settings(corpus, out, *extra), resume=True)
    assert tree_digest(out) == before
    done = train(*settings(corpus, out.parent / "again"), resume=False)
    again = train(*settings(corpus, out.parent / "again"), resume=True)  # already at max_steps
    assert again["status"] == "completed" and again["step"] == 8
    assert (again["train_loss"], again["val_bpb"]) == (done["train_loss"], done["val_bpb"])
    with pytest.raises(ValueError, match="nothing to resume"):
        train(*settings(corpus, out.parent / "fresh"), resume=True)


@pytest.mark.parametrize("damage, match", [
    ("optimizer.pt", "optimizer.pt"),
    ("model.safetensors", "model.safetensors"),
    ("lanes_rank0.safetensors", "lanes_rank0.safetensors"),
    ("trainer.json", "trainer.json"),
    ("latest", "names 'step_0000099'"),
])
def test_corrupted_checkpoint_is_a_clear_error(corpus, finished, tmp_path, damage, match):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    target = out / "checkpoints" / ("latest" if damage == "latest" else f"step_0000008/{damage}")
    if damage == "latest":
        target.write_text("step_0000099\n")
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    before = tree_digest(out)
    with pytest.raises(ValueError, match=match):
        train(*settings(corpus, out, "max_steps=12"), resume=True)
    assert tree_digest(out) == before
