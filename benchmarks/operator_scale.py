"""500 FineTuneJobs applied at once against the dev cluster, with the real operator.

Measures, per job, the time from its create call returning to its pod appearing in a
watch (p50, p99), jobs/s over the burst, and the operator's peak RSS. Baseline in the
same run: the same 500 pods (same manifests) created directly by a plain client with
the same concurrency — the raw limit of this API server and machine.
A second reference in the same run, the floor controller: the least any controller that
keeps a status can do per job (one watch, one pod create, one status write), to tell the
operator's own overhead from the API server's cost of a custom resource.
Last line: ratio=<operator jobs/s ÷ raw pods/s>. Targets: ratio >= 0.5, RSS <= 250 MiB.

    make bench-operator      (or: python benchmarks/operator_scale.py --jobs 500)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJobSpec
from kubetune.kube import Kube
from kubetune.manifests import JOB_LABEL, build_pod
from kubetune_dev.crd import CRD_FILE
from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.nodes import NodeSpec
from kubetune_dev.devcluster.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import OperatorProcess, install_crd, make_namespace, wait_for  # noqa: E402

CONCURRENCY = 8
# one roomy fake node: every pod can be bound, so the scheduler never thrashes
BIG_NODE = NodeSpec(
    name="cpu-big-0",
    labels={"kubernetes.io/hostname": "cpu-big-0", "kubernetes.io/os": "linux"},
    capacity={"cpu": "2000", "memory": "8Ti", "pods": "5000", "ephemeral-storage": "10Ti"},
)


def spec(i: int) -> dict:
    return {
        "model": {"name": "org/tiny"},
        "dataset": {"uri": f"s3://bench-data/{i}/"},
        "checkpoint": {"uri": f"s3://bench-ckpt/{i}/"},
        "output": {"uri": f"s3://bench-out/{i}/"},
        "resources": {"accelerator": "cpu", "cpu": "100m", "memory": "64Mi"},
    }


def job(name: str, i: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec(i),
    }


class PodWatch:
    """Records when each pod (by name) is first seen, client side."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._run, args=(core, namespace), daemon=True)
        self.thread.start()

    def _run(self, core, namespace):
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, namespace, timeout_seconds=600, _request_timeout=610):
            name = ev["object"].metadata.name
            self.seen.setdefault(name, time.monotonic())
            if self.stop:
                w.stop()


def burst(fn, items) -> tuple[float, dict]:
    done: dict = {}
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        for key, t in pool.map(fn, items):
            done[key] = t
    return t0, done


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rss_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def raw_burst(core: client.CoreV1Api, n: int) -> float:
    """The baseline: the operator's own pod manifests, created directly. Pods/s."""
    with make_namespace(core) as ns:
        pods = [
            build_pod(f"raw-{i}", "0" * 8, FineTuneJobSpec.model_validate(spec(i)), 1, 0, 0) for i in range(n)
        ]
        for p in pods:
            p["metadata"].pop("ownerReferences")
        t0, _ = burst(lambda p: (p["metadata"]["name"], core.create_namespaced_pod(ns, p)), pods)
        return n / (time.monotonic() - t0)


def job_burst(core: client.CoreV1Api, custom: client.CustomObjectsApi, ns: str, n: int) -> dict:
    """Create n FineTuneJobs at once in ns and wait for each one's pod: jobs/s from the
    first create to the last pod seen, create -> pod latencies, how long the creates took."""
    pw = PodWatch(core, ns)

    def create_job(i):
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job(f"job-{i}", i))
        return f"job-{i}-a1-w0", time.monotonic()

    t0, created = burst(create_job, range(n))
    wait_for(lambda: len(pw.seen) >= n, 300, f"{n} pods", interval_s=0.2)
    pw.stop = True
    return {
        "rate": n / (max(pw.seen.values()) - t0),
        "latencies": [pw.seen[k] - created[k] for k in created],
        "applied_s": max(created.values()) - t0,
    }


def wait_until_reconciling(custom: client.CustomObjectsApi, ns: str) -> None:
    """One warm-up job, reconciled to Running: the operator has started, and both its job
    and pod watches deliver (Running needs the pod's status). Its own namespace keeps its
    pod out of the burst's count."""
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job("warm-up", 0))

    def running():
        warm = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "warm-up")
        return (warm.get("status") or {}).get("phase") == "Running"

    wait_for(running, 60, "the operator to run the warm-up job", interval_s=0.2)


def floor_controller(kube: Kube, ns: str, ready: threading.Event, stop: threading.Event) -> None:
    """The least any controller that keeps a status can do per job: one raw watch, one
    pod create and one status write per new job, nothing else (no kopf, no Events, no
    later status). Its jobs/s bounds what an operator can reach on this machine.
    Watches from a list's resourceVersion, so no job created after `ready` is missed."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    since = kube.call("GET", path)["metadata"]["resourceVersion"]
    ready.set()
    pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY)

    def handle(job):
        meta = job["metadata"]
        pod = build_pod(meta["name"], meta["uid"], FineTuneJobSpec.model_validate(job["spec"]), 1, 0, 0)
        kube.create(ns, pod)
        kube.patch_job_status(ns, meta["name"], {"phase": "Pending", "attempt": 1}, None)

    for event in kube.stream(path, {"watch": "1", "resourceVersion": since}):
        if stop.is_set():
            break
        if event["type"] == "ADDED":
            pool.submit(handle, event["object"])
    pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=500)
    args = ap.parse_args()
    n = args.jobs
    with (
        tempfile.TemporaryDirectory(prefix="kubetune-bench-") as d,
        DevCluster(Path(d), nodes=[BIG_NODE], minio=False, log=lambda *_: None) as cluster,
    ):
        api = config.new_client_from_config(str(cluster.endpoints.kubeconfig))
        api.configuration.connection_pool_maxsize = CONCURRENCY * 4
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        install_crd(api, CRD_FILE)

        raw_burst(core, n)  # warm-up, not counted: a fresh cluster's first burst is slower
        raw_rates = [raw_burst(core, n)]
        # -- the floor: a minimal controller -----------------------------------------------
        with make_namespace(core) as ns:
            ready, stop = threading.Event(), threading.Event()
            threading.Thread(target=floor_controller, args=(Kube(api), ns, ready, stop), daemon=True).start()
            if not ready.wait(30):
                raise RuntimeError("the floor controller could not list FineTuneJobs")
            floor = job_burst(core, custom, ns, n)
            stop.set()
        # -- the operator ---------------------------------------------------------------------
        op = OperatorProcess(cluster.endpoints.kubeconfig, Path(d) / "operator.log", free_port())
        op.start()
        try:
            with make_namespace(core) as warm_ns, make_namespace(core) as ns:
                wait_until_reconciling(custom, warm_ns)  # measure reconciles, not start-up
                ours = job_burst(core, custom, ns, n)
                peak = rss_peak_mib(op.proc.pid)
                cpu = cpu_seconds(op.proc.pid)
                labelled = core.list_namespaced_pod(ns, label_selector=JOB_LABEL).items
                assert len(labelled) == n, f"{len(labelled)} pods for {n} jobs"
        finally:
            op.stop()
        raw_rates.append(raw_burst(core, n))  # before and after: this machine's load drifts
    raw_rate = statistics.mean(raw_rates)
    latencies = ours["latencies"]

    print(f"jobs: {n}, client concurrency {CONCURRENCY}")
    print(
        f"applying the {n} FineTuneJobs took {ours['applied_s']:.2f} s ({n / ours['applied_s']:.1f} jobs/s) "
        "while the operator ran on the same cores"
    )
    print(
        f"raw pod creation: {raw_rate:.1f} pods/s (runs before and after: "
        f"{', '.join(f'{r:.1f}' for r in raw_rates)})"
    )
    print(
        f"floor controller (one watch, one pod create + one status write per job, nothing else): "
        f"{floor['rate']:.1f} jobs/s = {floor['rate'] / raw_rate:.2f} of raw, the most a controller "
        "that keeps a status reaches on this machine"
    )
    print(
        f"operator: {ours['rate']:.1f} jobs/s = {ours['rate'] / floor['rate']:.2f} of the floor controller; "
        f"create -> pod p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms; operator peak RSS {peak:.0f} MiB (target <= 250), CPU {cpu:.1f} s"
    )
    print(f"ratio={ours['rate'] / raw_rate:.2f}")


if __name__ == "__main__":
    main()
