"""Nothing read from the checkpoint bucket is trusted: a manifest that is valid JSON but
not the shape a manifest has (not an object, "files" not an object of objects, a file
without a sha256 string) makes its checkpoint be skipped with a warning, like a hash
mismatch, and resume falls back to the next older valid checkpoint."""

from __future__ import annotations

import json
import logging

import pytest

from kubetune_trainer.checkpoints import FORMAT_VERSION, MANIFEST, CheckpointStore, step_dir
from kubetune_trainer.storage import LocalStore
from tests.unit.helpers import commit


def manifest_with(files) -> dict:
    return {"format": FORMAT_VERSION, "step": 20, "attempt": 0, "files": files}


GOOD_META = {"sha256": "0" * 64, "size": 1}

BAD_MANIFESTS = {
    "list": [],
    "list-of-objects": [manifest_with({"state.json": GOOD_META})],
    "string": "x",
    "number": 3,
    "null": None,
    "true": True,
    "files-list": manifest_with([["state.json", GOOD_META]]),
    "files-list-of-names": manifest_with(["state.json"]),
    "files-string": manifest_with("state.json"),
    "files-null": manifest_with(None),
    "files-missing": {"format": FORMAT_VERSION, "step": 20, "attempt": 0},
    "meta-list": manifest_with({"state.json": ["sha256", "0" * 64]}),
    "meta-string": manifest_with({"state.json": "0" * 64}),
    "meta-null": manifest_with({"state.json": None}),
    "meta-without-sha256": manifest_with({"state.json": {"size": 1}}),
    "sha256-number": manifest_with({"state.json": {"sha256": 7, "size": 1}}),
    "sha256-null": manifest_with({"state.json": {"sha256": None, "size": 1}}),
    "sha256-list": manifest_with({"state.json": {"sha256": ["0" * 64], "size": 1}}),
    "step-string": {**manifest_with({"state.json": GOOD_META}), "step": "20"},
    "step-true": {**manifest_with({"state.json": GOOD_META}), "step": True},
    # a higher attempt sorts first: it must still be skipped, not crash the ordering or the check
    "newer-attempt-files-list": {**manifest_with([]), "attempt": 7},
    "attempt-object": {**manifest_with(["state.json"]), "attempt": {"n": 1}},
}


@pytest.fixture
def bucket(tmp_path):
    """Two good checkpoints, steps 10 and 20."""
    bucket = tmp_path / "bucket"
    first = CheckpointStore(LocalStore(bucket), keep=5, workdir=tmp_path / "w1")
    commit(first, 10)
    commit(first, 20)
    first.close()
    return bucket


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_a_malformed_manifest_is_skipped_and_resume_takes_the_older_checkpoint(
    name, bucket, tmp_path, caplog
):
    (bucket / step_dir(20) / MANIFEST).write_text(json.dumps(BAD_MANIFESTS[name]))
    store = CheckpointStore(LocalStore(bucket), keep=5, workdir=tmp_path / "w2")
    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoints"):
        restored = store.latest()
    store.close()
    assert restored is not None and restored.step == 10, name
    assert json.loads((restored.folder / "state.json").read_text()) == {"step": 10}
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint step 20" in r.getMessage()]
    assert skipped, f"{name}: no warning about the skipped checkpoint"
    assert 20 not in store.verified


@pytest.mark.parametrize("name", ["list", "null", "files-list", "meta-without-sha256"])
def test_a_read_callback_is_never_given_a_malformed_checkpoint(name, bucket, tmp_path):
    (bucket / step_dir(20) / MANIFEST).write_text(json.dumps(BAD_MANIFESTS[name]))
    read_steps = []

    def read(folder):
        state = json.loads((folder / "state.json").read_text())
        read_steps.append(state["step"])
        return state

    store = CheckpointStore(LocalStore(bucket), keep=5, workdir=tmp_path / "w2")
    restored = store.latest(read=read)
    store.close()
    assert restored is not None and restored.step == 10 and restored.contents == {"step": 10}
    assert read_steps == [10]


def test_every_manifest_malformed_means_no_checkpoint(bucket, tmp_path):
    for step, doc in ((10, []), (20, manifest_with({"state.json": {"size": 1}}))):
        (bucket / step_dir(step) / MANIFEST).write_text(json.dumps(doc))
    store = CheckpointStore(LocalStore(bucket), keep=5, workdir=tmp_path / "w2")
    assert store.latest() is None
    store.close()


def test_a_manifest_that_is_not_utf8_or_json_is_skipped(bucket, tmp_path):
    for step, body in ((20, b"\xff\xfe{"),):
        (bucket / step_dir(step) / MANIFEST).write_bytes(body)
    store = CheckpointStore(LocalStore(bucket), keep=5, workdir=tmp_path / "w2")
    restored = store.latest()
    store.close()
    assert restored is not None and restored.step == 10


def test_a_good_manifest_still_resumes_the_newest(bucket, tmp_path):
    store = CheckpointStore(LocalStore(bucket), keep=5, workdir=tmp_path / "w2")
    restored = store.latest()
    store.close()
    assert restored is not None and restored.step == 20
