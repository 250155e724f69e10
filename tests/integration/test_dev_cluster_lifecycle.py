"""`python -m kubetune_dev dev up/down` and interruption: no process of the cluster, nor of a pod its
kubelets started, outlives it; a SIGKILLed cluster is cleared up by its guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client, config

from kubetune_dev.devcluster.cluster import Images, repo_pythonpath
from kubetune_dev.devcluster.kubelets import SLOTS, Network
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


def kubetune(*args, workdir: Path, check=True):
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    return subprocess.run(
        [sys.executable, "-m", "kubetune_dev", "dev", *args, "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=240,
    )


def sleepers() -> set[int]:
    """The test pod's process: containerd's shims are not the cluster's children (they
    outlive containerd by design), so it is found by its command line."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes() == b"sleep\x003600\x00":
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def container_cgroups(pids: set[int]) -> list[Path]:
    """The cgroup v1 folders (one per controller) the processes run in."""
    found = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "k8s.io" in path and controllers:
                found.append(Path("/sys/fs/cgroup") / controllers.split(",")[0] / path.lstrip("/"))
    return [c for c in found if c.exists()]


def start_sleeper_pod(kubeconfig: Path) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
    wait_for(lambda: core.read_namespaced_service_account("default", "default"), 30, "default SA")
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "sleeper"},
            "spec": {
                "nodeSelector": {"kubetune.dev/pod-runner": "true"},
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "c", "image": Images.load().operator, "command": ["sleep", "3600"]}],
            },
        },
    )
    wait_for(lambda: core.read_namespaced_pod("sleeper", "default").status.phase == "Running", 60, "Running")


def test_dev_up_then_interrupted_supervisor_leaves_no_orphans(tmp_path):
    out = kubetune("up", workdir=tmp_path)
    assert "ready in" in out.stdout
    env_file = (tmp_path / "env").read_text()
    for key in ("KUBECONFIG", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert f"export {key}=" in env_file
    kubeconfig = yaml.safe_load((tmp_path / "kubeconfig").read_text())
    # on the host side of its pod bridge (pods reach the API server there)
    server = urlsplit(kubeconfig["clusters"][0]["cluster"]["server"])
    assert server.scheme == "https" and server.hostname in {Network(s).host_ip for s in range(SLOTS)}
    start_sleeper_pod(tmp_path / "kubeconfig")

    supervisor = int((tmp_path / "supervisor.pid").read_text())
    procs = descendants(supervisor)
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in alive(procs)}
    assert {"etcd", "kube-apiserver", "kube-scheduler", "kwok", "minio", "kubelet", "containerd"} <= names, (
        names
    )
    pod = sleepers()
    assert pod, "the pod's process"
    cgroups = container_cgroups(pod)
    assert cgroups

    os.kill(supervisor, signal.SIGKILL)  # the worst interruption: no chance to clean up
    wait_for(lambda: not alive(procs | pod | {supervisor}), 30, "every cluster and pod process to exit")
    # the guard removed the containers through runc, and their cgroups with them
    wait_for(lambda: not any(c.exists() for c in cgroups), 30, "the pod's cgroups to be removed")
    assert "not running" in kubetune("down", workdir=tmp_path).stdout


def test_dev_down_stops_everything(tmp_path):
    kubetune("up", workdir=tmp_path)
    supervisor = int((tmp_path / "supervisor.pid").read_text())
    procs = descendants(supervisor)
    assert len(alive(procs)) >= 6
    start_sleeper_pod(tmp_path / "kubeconfig")
    pod = sleepers()
    assert "stopped" in kubetune("down", workdir=tmp_path).stdout
    assert not alive(procs | pod | {supervisor})
    assert not (tmp_path / "etcd").exists()
