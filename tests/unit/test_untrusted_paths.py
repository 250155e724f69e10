"""Names from a bucket others may write to (object keys, checkpoint manifest entries) never
become paths outside their folder: the zip-slip rule, checked on fixed cases and fuzzed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.storage import LocalStore, UnsafePath, inside


@pytest.mark.parametrize(
    "name",
    [
        "m/../../../x",
        "../x",
        "..",
        ".",
        "a/./b",
        "/etc/passwd",
        "//etc/passwd",
        "a//b",
        "",
        "a/",
        "a\\..\\..\\x",
        "a\0b",
    ],
)
def test_names_that_leave_or_blur_their_folder_are_refused(tmp_path, name):
    with pytest.raises(UnsafePath):
        inside(tmp_path, name)


def test_plain_relative_names_stay_inside(tmp_path):
    assert inside(tmp_path, "step-00000010/adapter_model.safetensors") == (
        tmp_path / "step-00000010" / "adapter_model.safetensors"
    )
    assert inside(tmp_path, "tokenizer..json") == tmp_path / "tokenizer..json"


def test_a_symlink_inside_the_folder_pointing_out_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePath, match="resolves outside"):
        inside(root, "link/file")


def test_a_local_store_never_reads_or_writes_outside_its_root(tmp_path):
    (tmp_path / "secret").write_text("s")
    store = LocalStore(tmp_path / "bucket")
    with pytest.raises(UnsafePath):
        store.read_bytes("../secret")
    with pytest.raises(UnsafePath):
        store.put_bytes("../planted", b"x")
    assert not (tmp_path / "planted").exists()


SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "", "a", "step-00000010", "..a", "a..", "~", "\\", "\0"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(SEGMENT, min_size=1, max_size=6), st.booleans())
def test_fuzzed_names_either_land_inside_or_are_refused(tmp_path_factory, segments, absolute):
    root = tmp_path_factory.mktemp("root", numbered=True)
    name = ("/" if absolute else "") + "/".join(segments)
    try:
        path = inside(root, name)
    except UnsafePath:
        return
    resolved = Path(os.path.normpath(path))
    assert resolved.is_relative_to(root) and resolved != root, (name, path)
    assert ".." not in path.relative_to(root).parts
