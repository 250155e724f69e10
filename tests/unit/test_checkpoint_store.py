"""Checkpoint retention counts only checkpoints known good: a corrupt newest checkpoint
(complete manifest, wrong bytes) must not push the only good ones out."""

from __future__ import annotations

from kubetune_trainer.checkpoints import CheckpointStore, step_dir
from kubetune_trainer.storage import LocalStore
from tests.unit.helpers import commit


def test_keep_one_with_a_corrupt_newest_checkpoint_keeps_a_good_one(tmp_path):
    bucket = tmp_path / "bucket"
    first = CheckpointStore(LocalStore(bucket), keep=2, workdir=tmp_path / "w1")
    commit(first, 10)
    commit(first, 20)
    first.close()
    (bucket / step_dir(20) / "state.json").write_text("flipped")  # the manifest still lists it

    # a new attempt, keep=1: resumes from 10 (20 fails its hash), then saves 11
    second = CheckpointStore(LocalStore(bucket), keep=1, workdir=tmp_path / "w2")
    restored = second.latest()
    assert restored is not None and restored.step == 10
    commit(second, 11)
    second.close()

    third = CheckpointStore(LocalStore(bucket), keep=1, workdir=tmp_path / "w3")
    restored = third.latest()
    assert restored is not None and restored.step == 11, "the only good checkpoint was pruned"
    assert not (bucket / step_dir(10)).exists()  # older than a verified one: pruned as before
    third.close()
