"""The adapter reaches output.uri whole or visibly not at all: the completion marker goes
last, and a rerun's upload cut short leaves no marker beside a mix of old and new files."""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune_trainer.export import COMPLETE, STAGING, publish
from kubetune_trainer.storage import LocalStore


def adapter_folder(path, text: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_text(text)
    (path / "README.md").write_text("card " + text)
    return path


def test_a_published_folder_has_every_file_and_a_marker_listing_their_hashes(tmp_path):
    bucket = tmp_path / "bucket"
    files = publish(LocalStore(bucket), adapter_folder(tmp_path / "out", "weights-1"))
    marker = json.loads((bucket / COMPLETE).read_text())
    assert marker["files"] == files and set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    for name, digest in files.items():
        assert hashlib.sha256((bucket / name).read_bytes()).hexdigest() == digest
    assert not (bucket / STAGING).exists()  # staging cleaned up


class FailingStore(LocalStore):
    """Copies into place break after the first one (the pod was killed mid-commit)."""

    copies = 0

    def copy(self, src: str, dest: str) -> None:
        self.copies += 1
        if self.copies > 1:
            raise OSError("connection reset")
        super().copy(src, dest)


def test_an_upload_cut_short_leaves_no_marker_beside_mixed_files(tmp_path):
    bucket = tmp_path / "bucket"
    publish(LocalStore(bucket), adapter_folder(tmp_path / "old", "weights-old"))
    assert (bucket / COMPLETE).exists()
    with pytest.raises(OSError):
        publish(FailingStore(bucket), adapter_folder(tmp_path / "new", "weights-new"))
    # one new file and the old rest are in place: no marker says they belong together
    assert not (bucket / COMPLETE).exists()
    assert (bucket / "adapter_model.safetensors").read_text() == "weights-old"
