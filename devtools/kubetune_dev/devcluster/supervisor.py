"""`make dev-up` / `make dev-down`: keep a dev cluster running in the background.

`up` starts a detached supervisor that owns every cluster process (they die with it)
and returns once the cluster is ready; `down` stops the supervisor, which tears the
cluster down. State lives in the work directory (default .dev/)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import procs
from .cluster import DevCluster


def _pid(workdir: Path) -> int | None:
    """The supervisor's pid if it is alive (a zombie, never reaped in some containers, is not)."""
    try:
        pid = int((workdir / "supervisor.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if procs.alive(pid) else None


def serve(workdir: Path, kueue: bool = False) -> int:
    """Run in the foreground until SIGTERM/SIGINT (the detached supervisor body); with
    kueue, Kueue too, a ClusterQueue and a LocalQueue `kubetune` in namespace default."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    (workdir / "ready").unlink(missing_ok=True)
    cluster = DevCluster(workdir)
    with cluster:
        if kueue:
            _start_kueue(cluster)
        (workdir / "ready").write_text(f"{cluster.startup_s:.1f}\n")
        stop.wait()
    (workdir / "ready").unlink(missing_ok=True)
    return 0


def _start_kueue(cluster: DevCluster) -> None:
    from kubernetes import client, config

    from . import kueue

    cluster.start_kueue()
    custom = client.CustomObjectsApi(config.new_client_from_config(str(cluster.endpoints.kubeconfig)))
    for obj in kueue.queue_objects("default", cpu="4", memory="16Gi"):
        kind = obj["kind"].lower() + "s"
        if obj["metadata"].get("namespace"):
            custom.create_namespaced_custom_object(*kueue.API, obj["metadata"]["namespace"], kind, obj)
        else:
            custom.create_cluster_custom_object(*kueue.API, kind, obj)


def up(workdir: Path, timeout_s: float = 180, kueue: bool = False) -> int:
    workdir = workdir.resolve()
    if _pid(workdir):
        print(f"dev cluster already up; use: source {workdir / 'env'}")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ready").unlink(missing_ok=True)
    log = workdir / "logs" / "supervisor.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_dev", "dev", "serve", "--workdir", str(workdir)]
            + (["--kueue"] if kueue else []),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (workdir / "supervisor.pid").write_text(str(proc.pid))
    t0 = time.monotonic()
    while not (workdir / "ready").exists():
        if proc.poll() is not None:
            print(
                f"dev cluster failed to start (exit {proc.returncode}); {log}:\n{procs.tail(log, 40)}",
                file=sys.stderr,
            )
            return 1
        if time.monotonic() - t0 > timeout_s:
            print(f"dev cluster not ready after {timeout_s:.0f} s; see {workdir / 'logs'}", file=sys.stderr)
            down(workdir)
            return 1
        time.sleep(0.2)
    print(
        f"dev cluster ready in {(workdir / 'ready').read_text().strip()} s "
        f"(logs in {workdir / 'logs'})\n  source {workdir / 'env'}   # KUBECONFIG and S3 endpoint/keys\n"
        f"  kubectl get nodes -L nvidia.com/gpu.product,cloud.google.com/gke-spot"
        + ("\n  kubectl get clusterqueues,localqueues -A   # Kueue: queueName: kubetune" if kueue else "")
    )
    return 0


def down(workdir: Path, timeout_s: float = 30) -> int:
    workdir = workdir.resolve()
    pid = _pid(workdir)
    if pid is None:
        print("dev cluster is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _pid(workdir):
        time.sleep(0.2)
    if _pid(workdir):
        os.killpg(pid, signal.SIGKILL)  # its children die with it (PDEATHSIG)
    (workdir / "supervisor.pid").unlink(missing_ok=True)
    print("dev cluster stopped")
    return 0
