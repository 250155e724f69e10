"""`make demo`: the operator on a throwaway dev cluster (real control plane, fake GPU
pools, a pod runner, MinIO). It applies the seed examples, shows where the real
scheduler put each job and what `kubectl get ftj` says, then tears everything down.

The end-to-end fine-tuning demo (the real trainer on a runner node, a spot eviction and
an exact resume) replaces this tour once the trainer lands."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.crd import CRD_FILE
from kubetune.devcluster.cluster import REPO_ROOT, DevCluster
from kubetune.devcluster.nodes import GKE_SPOT_LABEL, NVIDIA_GPU, RUNNER_LABEL
from kubetune.devcluster.procs import spawn, stop_group, wait_for

EXAMPLES = (
    "text-to-sql-intel.yaml",
    "llama2-chat-guanaco-spot.yaml",
    "falcon-7b-faq.yaml",
    "phi2-toxic-spot-t4.yaml",
    "multi-worker.yaml",
)


def run(workdir: Path | None = None) -> int:
    from kubernetes import client, config

    workdir = workdir or Path(tempfile.mkdtemp(prefix="kubetune-demo-"))
    with DevCluster(workdir) as cluster:
        kubeconfig = str(cluster.endpoints.kubeconfig)
        api = config.new_client_from_config(kubeconfig)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        kubectl = ["kubectl", "--kubeconfig", kubeconfig]
        print("\nNode pools of the dev cluster:")
        for n in core.list_node().items:
            labels, cap = n.metadata.labels, n.status.capacity or {}
            gpus = cap.get(NVIDIA_GPU) or cap.get("gpu.intel.com/i915") or "-"
            product = labels.get("nvidia.com/gpu.product") or labels.get("gpu.intel.com/product") or "cpu"
            kind = "pod runner" if labels.get(RUNNER_LABEL) else "kwok"
            print(
                f"  {n.metadata.name:22} {product:32} gpus={gpus:3} spot={labels.get(GKE_SPOT_LABEL, 'false'):5} {kind}"
            )

        subprocess.run([*kubectl, "apply", "-f", str(CRD_FILE)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        env = {
            **cluster.env(),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{REPO_ROOT / 'operator'}:{REPO_ROOT / 'trainer_image'}",
        }
        operator = spawn(
            [sys.executable, "-m", "kubetune", "run", "--standalone", "--metrics-port", "0"],
            workdir / "logs" / "operator.log",
            env=env,
        )
        try:
            print("\nApplying the seed examples (kubectl apply -f examples/...):")
            names = []
            for example in EXAMPLES:
                job = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
                custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job)
                names.append((job["metadata"]["name"], job["spec"].get("workers", 1)))
                print(f"  {example}")

            def settled():
                st = [
                    custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, n).get(
                        "status", {}
                    )
                    for n, _ in names
                ]
                return all(s.get("phase") == "Running" or s.get("reason") == "Unschedulable" for s in st)

            wait_for(settled, 60, "every job Running or waiting for nodes")
            print("\nWhere the real kube-scheduler placed each worker:")
            for pod in sorted(core.list_namespaced_pod("default").items, key=lambda p: p.metadata.name):
                if not pod.spec.node_name:
                    print(f"  {pod.metadata.name:26} -> (pending: no node has the GPUs free)")
                    continue
                labels = core.read_node(pod.spec.node_name).metadata.labels
                product = labels.get("nvidia.com/gpu.product") or labels.get("gpu.intel.com/product")
                spot = "spot" if labels.get(GKE_SPOT_LABEL) else "on-demand"
                print(f"  {pod.metadata.name:26} -> {pod.spec.node_name:22} {product} ({spot})")
            for name, _ in names:
                st = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)["status"]
                if st.get("reason") == "Unschedulable":
                    print(f"  {name}: {st['message'][:160]}")

            print(
                "\nThe llama2 worker is evicted, as on a spot reclaim: the job is preempted and starts a new attempt."
            )
            pod = core.read_namespaced_pod("llama2-guanaco-a1-w0", "default")
            core.delete_namespaced_pod(pod.metadata.name, "default")
            st = wait_for(
                lambda: (
                    (
                        s := custom.get_namespaced_custom_object(
                            GROUP, VERSION, "default", PLURAL, "llama2-guanaco"
                        )["status"]
                    ).get("attempt")
                    == 2
                    and s.get("phase") == "Running"
                    and s
                ),
                60,
                "the resumed attempt",
            )
            print(
                f"  llama2-guanaco: phase {st['phase']}, attempt {st['attempt']}, "
                f"preemptions {st['preemptions']}, failures {st['failures']}"
            )
            print("\n$ kubectl get ftj")
            subprocess.run([*kubectl, "get", "ftj"], check=True)
        finally:
            stop_group(operator)
        print(f"\nDev cluster started in {cluster.startup_s:.1f} s; logs in {workdir / 'logs'}. Stopping it.")
    return 0
