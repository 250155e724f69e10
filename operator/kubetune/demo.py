"""`make demo`: a tour of the dev cluster the operator runs on (real control plane,
fake GPU pools, a pod runner, MinIO), torn down at the end."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kubetune.devcluster.cluster import DevCluster
from kubetune.devcluster.nodes import GKE_SPOT_LABEL, NVIDIA_GPU, RUNNER_LABEL


def _wait(predicate, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("demo step timed out")


def run(workdir: Path | None = None) -> int:
    from kubernetes import client, config

    workdir = workdir or Path(tempfile.mkdtemp(prefix="kubetune-demo-"))
    with DevCluster(workdir) as cluster:
        core = client.CoreV1Api(config.new_client_from_config(str(cluster.endpoints.kubeconfig)))
        print("\nNodes:")
        for n in core.list_node().items:
            labels, cap = n.metadata.labels, n.status.capacity or {}
            gpus = cap.get(NVIDIA_GPU) or cap.get("gpu.intel.com/i915") or "-"
            kind = "runner" if labels.get(RUNNER_LABEL) else "kwok"
            print(f"  {n.metadata.name:22} gpus={gpus:3} spot={labels.get(GKE_SPOT_LABEL, 'false'):5} {kind}")

        spot = {"key": GKE_SPOT_LABEL, "operator": "Exists", "effect": "NoSchedule"}
        core.create_namespaced_pod(
            "default",
            {
                "metadata": {"name": "gpu-job"},
                "spec": {
                    "tolerations": [spot],
                    "containers": [
                        {
                            "name": "t",
                            "image": "trainer",
                            "command": ["train"],
                            "resources": {"limits": {NVIDIA_GPU: "8"}},
                        }
                    ],
                },
            },
        )
        pod = _wait(lambda: (p := core.read_namespaced_pod("gpu-job", "default")).spec.node_name and p)
        print(
            f"\nA pod asking for 8 NVIDIA GPUs on spot was bound to {pod.spec.node_name} by kube-scheduler."
        )

        core.create_namespaced_pod(
            "default",
            {
                "metadata": {"name": "real-process"},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {RUNNER_LABEL: "true"},
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "c",
                            "image": "python",
                            "command": [
                                "python",
                                "-c",
                                "import os, pathlib; pathlib.Path('/dev/termination-log')"
                                ".write_text('hello from ' + os.environ['POD_IP'])",
                            ],
                            "env": [
                                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                            ],
                        }
                    ],
                },
            },
        )
        pod = _wait(
            lambda: (
                (p := core.read_namespaced_pod("real-process", "default")).status.phase
                in ("Succeeded", "Failed")
                and p
            )
        )
        term = pod.status.container_statuses[0].state.terminated
        print(
            f"A pod on runner node {pod.spec.node_name} ran as a real process: {pod.status.phase}, "
            f"exit {term.exit_code}, termination message {term.message!r}"
        )
        print(f"\nDev cluster started in {cluster.startup_s:.1f} s; logs in {workdir / 'logs'}. Stopping it.")
    return 0
