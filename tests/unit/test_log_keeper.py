"""The dev cluster's log keeper survives the kubelet removing pod log folders while it
scans them (it died of that once, and every later pod's log was lost)."""

from __future__ import annotations

import os

from kubetune_dev.devcluster.kubelets import log_files


def pod_log(root, pod: str, restart: int = 0):
    path = root / pod / "trainer" / f"{restart}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def test_every_container_log_is_found(tmp_path):
    want = {pod_log(tmp_path, "ns_a_1"), pod_log(tmp_path, "ns_a_1", 1), pod_log(tmp_path, "ns_b_2")}
    (tmp_path / "ns_c_3" / "trainer").mkdir(parents=True)  # no log yet
    (tmp_path / "stray.txt").write_text("")
    assert set(log_files(tmp_path)) == want


def test_a_folder_removed_during_the_scan_is_skipped(tmp_path, monkeypatch):
    kept = pod_log(tmp_path, "ns_kept_1")
    gone = tmp_path / "ns_gone_2"
    pod_log(tmp_path, "ns_gone_2")
    real = os.scandir

    def scandir(path):
        if str(path).startswith(str(gone)):
            raise FileNotFoundError(2, "No such file or directory", str(path))  # the kubelet removed it
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list(log_files(tmp_path)) == [kept]
    assert list(log_files(tmp_path / "missing")) == []
