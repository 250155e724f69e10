"""The operator at scale against the dev cluster, beside the least a controller can do,
in one run, with the API requests each costs counted by kube-apiserver itself.

    make bench-operator   (or: python benchmarks/operator_scale.py --jobs 500
                               --lifecycle-jobs 5000 --progress-jobs 5)

Phases, in this order, on one dev cluster (one roomy kwok node, no MinIO):

  raw     the operator's own pod manifests (no owner) created directly by a plain
          client, CONCURRENCY at a time: pods/s, the API server's and this machine's
          limit. Once as a warm-up (not counted), then before and after the rest
          (the machine's load drifts; the mean is reported).
  floor   the floor controller: one raw watch, one pod create and one status write
          (phase Pending) per new job, nothing else. --jobs FineTuneJobs created at once:
          jobs/s (first create to last pod seen in a watch), create -> pod p50/p99, and
          the requests per job from the first create until every pod is Running (kwok
          turns them Running; the floor writes no Running status: its "to Running" is
          its pods Running).
  floor+Running  the floor controller with a pod watch besides and a second status write
          per job (phase Running) once its pod runs: the least a controller does whose
          status says Running, as the operator's does. The same figures, counted until
          every job's status.phase is Running; the operator's rate is shown against it too.
  operator  the same burst with the real operator (`python -m kubetune run`, its own
          process, --progress-interval 10 as shipped, not verbose), started and awaited
          by one warm-up job reconciled to Running in a namespace of its own: the same
          figures, the requests per job counted until every job's status.phase is
          Running (seen in a watch).
  progress  --progress-jobs jobs (a fresh operator with --progress-interval 0.5) whose
          rank-0 pod answers GET /progress like a trainer: a new step every interval
          for REPORTS intervals (60: 10 minutes of reports every 10 s, time-scaled by
          20), then kwok completes the pod (Succeeded, exit code 0; the pod-complete
          stage of kwok-stages.yaml, asked for by the annotation
          kubetune.dev/kwok-complete-after that the jobs put on their pods through
          spec.podOverrides.annotations). The trainers answer "loading" until every job
          is Running and the counts have settled, so the span counted is exactly
          Running -> Succeeded. The pods are kwok's, their addresses in the dev
          cluster's fake pod range, which is on no link: the benchmark adds each as a
          /32 to the cluster's own bridge for the phase and binds a small HTTP server
          there on the trainer port (nothing leaves the machine; the addresses go with
          the phase, and the bridge with the cluster).
  lifecycle --lifecycle-jobs jobs (a fresh operator, as shipped) created at once, each
          pod completed by kwok LIFECYCLE_COMPLETE_AFTER after Running, every job run to
          Succeeded, then all deleted (one deletecollection; the garbage collector and
          kwok remove the pods): the operator's RSS at the start (after its warm-up),
          its peak (VmHWM), when no job or pod is left, and after the deletion: once,
          besides, the write counts have settled (the operator posts its Events from a
          queue at 10/s whose entries hold their job's body: thousands of jobs leave
          minutes of them) and its RSS stopped moving (polled); CPU seconds per job over
          the whole phase, that drain included; writes per job from create to deleted.
          Then again (--lifecycle-rounds, default 2) on the same operator in a fresh
          namespace: RSS after the second round beside the first's tells memory kept
          once (threads, pools and code paths first used under load) from a leak.

Counting requests: kube-apiserver's own apiserver_request_total, scraped (GET /metrics)
before and after a span, summed by verb and resource (resource[/subresource][.group]:
finetunejobs/status.kubetune.io, pods/binding, events for core Events, events.events.k8s.io
for the scheduler's). Each scrape waits until the write counts have stopped moving for
QUIET_S (polled), so requests a span caused but sent late (the operator rate-limits its
Events) are in it and the previous phase's clean-up is not. Counted: every client's
requests in the span (the operator or floor, the scheduler's bindings and Events, kwok's
pod status patches, the garbage collector), both sides alike; not counted: leases
(timed renewals, not per job) and non-resource requests (/metrics itself). Subtracted:
the benchmark's own writes (one FineTuneJob create per job; the deletecollection).
Writes are POST, PUT, PATCH, DELETE, DELETECOLLECTION and APPLY, refused ones included
(409 conflicts are shown on rows of their own). Reads (GET, LIST, WATCH)
are shown too; they include the benchmark's own few lists and watches per phase, and a
watch counts when it ends.

Targets (issue 18): operator jobs/s / floor jobs/s >= 0.9 at 500 jobs; operator p99
create -> pod <= 2 x the floor's; writes per job to Running <= floor + 1; at 5,000 jobs
peak RSS <= 300 MiB and RSS after deletion within 10 % of the start.

Last line: ratio=<operator / floor jobs/s> writes_per_job=<operator writes per job to
Running> rss_mib=<operator peak RSS in the lifecycle phase>.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime as dt
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image", "devtools", ""):
    sys.path.insert(0, str(ROOT / p))

from kubernetes import client, config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJobSpec  # noqa: E402
from kubetune.kube import Kube  # noqa: E402
from kubetune.manifests import JOB_LABEL, PROGRESS_PORT, build_pod  # noqa: E402
from kubetune_dev.crd import CRD_FILE  # noqa: E402
from kubetune_dev.devcluster.cluster import DevCluster  # noqa: E402
from kubetune_dev.devcluster.nodes import NodeSpec  # noqa: E402
from kubetune_dev.devcluster.procs import free_port  # noqa: E402
from kubetune_trainer.progress import Progress  # noqa: E402
from tests.helpers import OperatorProcess, install_crd, make_namespace, wait_for  # noqa: E402

CONCURRENCY = 8
COMPLETE_AFTER = "kubetune.dev/kwok-complete-after"  # read by kwok-stages.yaml's pod-complete
SHIPPED_PROGRESS_INTERVAL_S = 10.0  # the operator's default
PROGRESS_INTERVAL_S = 0.5  # the progress phase: 10 s of a real trainer's reports, 20 x faster
REPORTS = 60  # 10 minutes of a report every 10 s
# kwok's clock for a progress pod starts at Running; the trainers start reporting only
# once every job is Running and the counts settled: this much time is allowed for that
PROGRESS_START_BUDGET_S = 15.0
LIFECYCLE_COMPLETE_AFTER = "2s"
QUIET_S = 2.0  # a scrape waits for this long without a new write
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"}
READ_VERBS = {"GET", "LIST", "WATCH"}
JOB_RESOURCE = f"{PLURAL}.{GROUP}"


def big_node(pods: int) -> NodeSpec:
    """One roomy fake node: every pod can be bound, so the scheduler never thrashes."""
    return NodeSpec(
        name="cpu-big-0",
        labels={"kubernetes.io/hostname": "cpu-big-0", "kubernetes.io/os": "linux"},
        capacity={"cpu": "20000", "memory": "80Ti", "pods": str(pods), "ephemeral-storage": "100Ti"},
    )


def spec(i: int, complete_after: str | None = None) -> dict:
    out = {
        "model": {"name": "org/tiny"},
        "dataset": {"uri": f"s3://bench-data/{i}/"},
        "checkpoint": {"uri": f"s3://bench-ckpt/{i}/"},
        "output": {"uri": f"s3://bench-out/{i}/"},
        "resources": {"accelerator": "cpu", "cpu": "100m", "memory": "64Mi"},
    }
    if complete_after:
        out["podOverrides"] = {"annotations": {COMPLETE_AFTER: complete_after}}
    return out


def job(name: str, i: int, complete_after: str | None = None) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec(i, complete_after),
    }


# -- watching ------------------------------------------------------------------------------


class Tracker:
    """One collection of a namespace, listed then watched (raw JSON, as the operator does):
    each object's latest state, when each was first seen and when each first reached
    each status.phase. Relists when a watch ends."""

    def __init__(self, kube: Kube, path: str) -> None:
        self.kube, self.path = kube, path
        self.objects: dict[str, dict] = {}
        self.first_seen: dict[str, float] = {}
        self.reached: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.lock = threading.Lock()
        self.listed = threading.Event()
        self.stopping = threading.Event()
        threading.Thread(target=self._run, daemon=True, name=f"track {path}").start()
        if not self.listed.wait(30):
            raise RuntimeError(f"could not list {path}")

    def _note(self, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        self.objects[name] = obj
        self.first_seen.setdefault(name, now)
        phase = (obj.get("status") or {}).get("phase")
        if phase:
            self.reached[phase].setdefault(name, now)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.kube.call("GET", self.path)
                now = time.monotonic()
                with self.lock:
                    self.objects.clear()
                    for obj in listing["items"]:
                        self._note(obj, now)
                self.listed.set()
                query = {"watch": "1", "resourceVersion": listing["metadata"]["resourceVersion"]}
                for event in self.kube.stream(self.path, query):
                    if self.stopping.is_set():
                        return
                    if event["type"] == "ERROR":
                        break  # expired: list again
                    obj, now = event["object"], time.monotonic()
                    with self.lock:
                        if event["type"] == "DELETED":
                            self.objects.pop(obj["metadata"]["name"], None)
                        else:
                            self._note(obj, now)
            except Exception:
                if self.stopping.is_set():
                    return
                self.stopping.wait(0.5)  # the API server busy or restarting: list again

    def count(self, phase: str | None = None) -> int:
        with self.lock:
            return len(self.objects) if phase is None else len(self.reached.get(phase, {}))

    def stop(self) -> None:
        self.stopping.set()


def pods_path(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods"


def jobs_path(ns: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"


# -- kube-apiserver's request counts ------------------------------------------------------

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(api: client.ApiClient) -> collections.Counter:
    """apiserver_request_total summed by (verb, resource[/subresource][.group], with
    " [409]" for conflicts); leases and non-resource requests left out."""
    resp = api.call_api(
        "/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True
    )
    counts: collections.Counter = collections.Counter()
    for line in resp.data.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line[len("apiserver_request_total{") :].rpartition("} ")
        labels = dict(_LABEL.findall(labels_text))
        resource = labels.get("resource", "")
        if not resource or resource == "leases":
            continue
        name = resource + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        name += f".{labels['group']}" if labels.get("group") else ""
        # a conflict is a write the API server did, and refused: shown apart
        name += " [409]" if labels.get("code") == "409" else ""
        counts[(labels.get("verb", "").upper(), name)] += float(value)
    return counts


def writes(counts: collections.Counter) -> float:
    return sum(v for (verb, _), v in counts.items() if verb in WRITE_VERBS)


def reads(counts: collections.Counter) -> float:
    return sum(v for (verb, _), v in counts.items() if verb in READ_VERBS)


def settled_scrape(api: client.ApiClient, timeout_s: float = 300) -> tuple[collections.Counter, bool]:
    """A scrape taken once the write counts have not moved for QUIET_S (polled), and
    whether they did settle within timeout_s (if not: the counts at the timeout)."""
    state = {"counts": scrape(api), "since": time.monotonic()}

    def quiet():
        counts = scrape(api)
        if writes(counts) != writes(state["counts"]):
            state["counts"], state["since"] = counts, time.monotonic()
            return None
        state["counts"] = counts
        return counts if time.monotonic() - state["since"] >= QUIET_S else None

    try:
        return wait_for(quiet, timeout_s, "the API server's write counts to settle", interval_s=0.5), True
    except TimeoutError:
        print(f"warning: writes still moving after {timeout_s:.0f} s; counted up to now", file=sys.stderr)
        return state["counts"], False


def span(before: collections.Counter, after: collections.Counter, own: dict | None = None) -> dict:
    """Requests in a span, less the benchmark's own writes ((verb, resource) -> count). A
    deletecollection may be labelled DELETE (the label is the HTTP method's)."""
    delta = collections.Counter({k: after[k] - before.get(k, 0) for k in after})
    for (verb, resource), n in (own or {}).items():
        if verb == "DELETECOLLECTION" and delta[(verb, resource)] < n:
            verb = "DELETE"
        delta[(verb, resource)] -= n
    return {k: v for k, v in delta.items() if v > 0}


@contextlib.contextmanager
def namespace(core: client.CoreV1Api):
    """make_namespace's fresh namespace, and on exit, the wait until the namespace
    controller has finished deleting it: its clean-up (a deletecollection and a list of
    every resource type) would otherwise land in the next phase's counts."""
    with make_namespace(core) as ns:
        yield ns

    def gone():
        try:
            core.read_namespace(ns)
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return False

    wait_for(gone, 300, f"namespace {ns} to be deleted", interval_s=0.5)


# -- bursts ---------------------------------------------------------------------------------


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


def raw_burst(core: client.CoreV1Api, n: int) -> float:
    """The baseline: the operator's own pod manifests, created directly. Pods/s."""
    with namespace(core) as ns:
        pods = [
            build_pod(f"raw-{i}", "0" * 8, FineTuneJobSpec.model_validate(spec(i)), 1, 0, 0) for i in range(n)
        ]
        for p in pods:
            p["metadata"].pop("ownerReferences")
        t0, _ = burst(lambda p: (p["metadata"]["name"], core.create_namespaced_pod(ns, p)), pods)
        return n / (time.monotonic() - t0)


def create_jobs(custom: client.CustomObjectsApi, ns: str, n: int, complete_after: str | None = None):
    """n FineTuneJobs, CONCURRENCY creates at a time: (first create's time, pod name -> when
    its job's create returned)."""

    def create_job(i):
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job(f"job-{i}", i, complete_after))
        return f"job-{i}-a1-w0", time.monotonic()

    return burst(create_job, range(n))


def job_burst(api: client.ApiClient, ns: str, n: int, running: str) -> dict:
    """Create n FineTuneJobs at once in ns: jobs/s from the first create to the last pod
    seen, create -> pod latencies, and the requests until every job is Running (`running`:
    "pods", the pods' phase, for the floor; "jobs", status.phase, for the operator)."""
    kube, custom = Kube(api), client.CustomObjectsApi(api)
    pods = Tracker(kube, pods_path(ns))
    jobs = Tracker(kube, jobs_path(ns))
    try:
        before, _ = settled_scrape(api)
        t0, created = create_jobs(custom, ns, n)
        timeout = 120 + n * 0.5
        wait_for(lambda: pods.count() >= n, timeout, f"{n} pods", interval_s=0.2)
        rate = n / (max(pods.first_seen.values()) - t0)
        watched = pods if running == "pods" else jobs
        wait_for(lambda: watched.count("Running") >= n, timeout, f"{n} {running} Running", interval_s=0.2)
        running_s = max(watched.reached["Running"].values()) - t0
        # the operator's Events are rate-limited (10/s): those of the last jobs come late
        after, settled = settled_scrape(api, timeout_s=120 + n)
    finally:
        pods.stop()
        jobs.stop()
    return {
        "rate": rate,
        "latencies": [pods.first_seen[k] - created[k] for k in created],
        "applied_s": max(created.values()) - t0,
        "running_s": running_s,
        "requests": span(before, after, {("POST", JOB_RESOURCE): n}),
        "settled": settled,
    }


def floor_controller(
    kube: Kube, ns: str, ready: threading.Event, stop: threading.Event, report_running: bool = False
) -> None:
    """The least any controller that keeps a status can do per job: one raw watch, one
    pod create and one status write per new job, nothing else (no kopf, no Events, no
    later status). Its jobs/s bounds what an operator can reach on this machine.
    Watches from a list's resourceVersion, so no job created after `ready` is missed.
    report_running: besides, a pod watch and one more status write (phase Running) when a
    job's pod runs: the least a controller does whose status says Running, as the
    operator's does (the floor + Running row)."""
    path = jobs_path(ns)
    since = kube.call("GET", path)["metadata"]["resourceVersion"]
    pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY)
    if report_running:
        pods_since = kube.call("GET", pods_path(ns))["metadata"]["resourceVersion"]

        def running(job_name):
            kube.patch_job_status(ns, job_name, {"phase": "Running"}, None)

        def watch_pods():
            told = set()
            query = {"watch": "1", "resourceVersion": pods_since, "labelSelector": JOB_LABEL}
            for event in kube.stream(pods_path(ns), query):
                if stop.is_set():
                    break
                pod = event["object"]
                job_name = pod["metadata"]["labels"][JOB_LABEL]
                if (pod.get("status") or {}).get("phase") == "Running" and job_name not in told:
                    told.add(job_name)
                    pool.submit(running, job_name)

        threading.Thread(target=watch_pods, daemon=True, name="floor pods").start()
    ready.set()

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


def floor_burst(api: client.ApiClient, core: client.CoreV1Api, n: int, report_running: bool) -> dict:
    """job_burst() against floor_controller() in a fresh namespace; "to Running" is its
    pods Running, or with report_running, its jobs' status.phase Running."""
    with namespace(core) as ns:
        ready, stop = threading.Event(), threading.Event()
        threading.Thread(
            target=floor_controller, args=(Kube(api), ns, ready, stop, report_running), daemon=True
        ).start()
        if not ready.wait(30):
            raise RuntimeError("the floor controller could not list FineTuneJobs")
        try:
            return job_burst(api, ns, n, running="jobs" if report_running else "pods")
        finally:
            stop.set()


# -- the operator ---------------------------------------------------------------------------


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def start_operator(
    cluster: DevCluster, workdir: Path, name: str, progress_interval_s: float
) -> OperatorProcess:
    op = OperatorProcess(
        cluster.endpoints.kubeconfig,
        workdir / f"operator-{name}.log",
        free_port(),
        progress_interval_s=progress_interval_s,
        verbose=False,
    )
    op.start()
    return op


def wait_until_reconciling(custom: client.CustomObjectsApi, ns: str) -> None:
    """One warm-up job, reconciled to Running: the operator has started, and both its job
    and pod watches deliver (Running needs the pod's status). Its own namespace keeps its
    pod out of the phase's counts."""
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job("warm-up", 0))

    def running():
        warm = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "warm-up")
        return (warm.get("status") or {}).get("phase") == "Running"

    wait_for(running, 60, "the operator to run the warm-up job", interval_s=0.2)


class FakeTrainers:
    """GET /progress answered for kwok pods, as their trainers would: "loading" until
    released, then step 1, 2, ... REPORTS, a new one every interval, with updatedAt on a
    simulated clock that moves 10 s a step. Each pod's address (in the dev cluster's fake
    pod range, on no link) is added as a /32 to the cluster's bridge while served, so the
    operator's request reaches a server on this machine and nothing else."""

    def __init__(self, bridge: str, reports: int, interval_s: float) -> None:
        self.bridge, self.reports, self.interval_s = bridge, reports, interval_s
        self.servers: list[tuple[str, ThreadingHTTPServer]] = []
        self.released_at: float | None = None
        self.sim_start = dt.datetime.now(dt.UTC).replace(microsecond=0)
        self.served = collections.Counter()  # address -> answers with a step

    def body(self) -> dict:
        if self.released_at is None:
            return Progress(phase="loading", total_steps=self.reports).to_json()
        step = min(self.reports, 1 + int((time.monotonic() - self.released_at) / self.interval_s))
        when = self.sim_start + dt.timedelta(seconds=10 * step)
        return Progress(
            phase="training",
            step=step,
            total_steps=self.reports,
            epoch=round(step / self.reports, 4),
            loss=round(2.0 / (1 + step / 10), 4),
            tokens_per_second=1000.0,
            updated_at=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ).to_json()

    def serve(self, address: str) -> None:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", self.bridge], check=True)
        trainers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/progress":
                    self.send_error(404)
                    return
                body = trainers.body()
                if body.get("phase") == "training":
                    trainers.served[address] += 1
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer((address, PROGRESS_PORT), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name=f"trainer {address}").start()
        self.servers.append((address, server))

    def release(self) -> None:
        self.released_at = time.monotonic()

    def close(self) -> None:
        for address, server in self.servers:
            server.shutdown()
            server.server_close()
            subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", self.bridge], check=False)
        self.servers.clear()


def last_step(job: dict) -> int | None:
    """status.progress.step: the last report the operator wrote."""
    return ((job.get("status") or {}).get("progress") or {}).get("step")


def progress_phase(api: client.ApiClient, cluster: DevCluster, ns: str, n: int) -> dict:
    """n jobs that report progress REPORTS times, then complete: requests per job from
    Running to Succeeded."""
    kube, custom = Kube(api), client.CustomObjectsApi(api)
    complete_after = PROGRESS_START_BUDGET_S + (REPORTS + 2) * PROGRESS_INTERVAL_S
    pods, jobs = Tracker(kube, pods_path(ns)), Tracker(kube, jobs_path(ns))
    trainers = FakeTrainers(cluster.network.bridge, REPORTS, PROGRESS_INTERVAL_S)
    try:
        create_jobs(custom, ns, n, f"{complete_after:g}s")

        def addresses():
            with pods.lock:
                ips = [(p.get("status") or {}).get("podIP") for p in pods.objects.values()]
            return ips if len(ips) >= n and all(ips) else None

        for address in wait_for(addresses, 60, f"addresses for {n} pods", interval_s=0.1):
            trainers.serve(address)
        wait_for(lambda: jobs.count("Running") >= n, 60, f"{n} jobs Running", interval_s=0.1)
        before, _ = settled_scrape(api)
        started = time.monotonic()
        if started - min(pods.reached["Running"].values()) > PROGRESS_START_BUDGET_S:
            print("warning: the trainers start late; kwok may complete them before their last report")
        trainers.release()
        wait_for(
            lambda: jobs.count("Succeeded") >= n, complete_after + 60, f"{n} jobs Succeeded", interval_s=0.2
        )
        after, _ = settled_scrape(api)
        with jobs.lock:  # the watch's latest state of each job, Succeeded by now
            steps = [last_step(j) for j in jobs.objects.values()]
    finally:
        trainers.close()
        pods.stop()
        jobs.stop()
    return {"requests": span(before, after), "steps": steps, "span_s": time.monotonic() - started}


def delete_all_jobs(custom: client.CustomObjectsApi, ns: str) -> int:
    """One deletecollection, asked again while it times out (kube-apiserver gives up
    answering after 60 s, at thousands of objects, and stops there): how many were sent."""
    for sent in range(1, 31):
        try:
            custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
            return sent
        except ApiException as e:
            if e.status != 504:
                raise
            print(f"  deletecollection timed out (try {sent}); asking again", file=sys.stderr, flush=True)
    raise RuntimeError("deletecollection of the jobs kept timing out")


def lifecycle_phase(api: client.ApiClient, op: OperatorProcess, ns: str, n: int) -> dict:
    """n jobs created, completed by kwok, deleted: the operator's RSS and CPU."""
    kube, custom = Kube(api), client.CustomObjectsApi(api)
    pid = op.proc.pid
    pods, jobs = Tracker(kube, pods_path(ns)), Tracker(kube, jobs_path(ns))
    try:
        before, _ = settled_scrape(api)
        rss_start, cpu_start = rss_mib(pid), cpu_seconds(pid)
        t0, _ = create_jobs(custom, ns, n, LIFECYCLE_COMPLETE_AFTER)
        created_s = time.monotonic() - t0
        timeout = 300 + n * 0.5
        wait_for(lambda: jobs.count("Succeeded") >= n, timeout, f"{n} jobs Succeeded", interval_s=0.5)
        succeeded_s = time.monotonic() - t0
        rss_done = rss_mib(pid)
        deletes = delete_all_jobs(custom, ns)
        wait_for(
            lambda: jobs.count() == 0 and pods.count() == 0, timeout, "every job and pod gone", interval_s=0.5
        )
        deleted_s = time.monotonic() - t0
        rss_deleted = rss_mib(pid)
        # The operator posts its Events from a queue at 10/s, each holding its job's body:
        # the deleted jobs are only all let go of once that queue is empty, which the write
        # counts settling shows (minutes at thousands of jobs).
        after, settled = settled_scrape(api, timeout_s=timeout)
        settled_s = time.monotonic() - t0
        # then its RSS, once it stops moving (within 1 MiB over QUIET_S)
        state = {"rss": rss_mib(pid), "since": time.monotonic()}

        def rss_steady():
            rss = rss_mib(pid)
            if abs(rss - state["rss"]) > 1:
                state["rss"], state["since"] = rss, time.monotonic()
                return None
            return rss if time.monotonic() - state["since"] >= QUIET_S else None

        rss_after = wait_for(rss_steady, 120, "the operator's RSS to settle", interval_s=0.5)
        cpu = cpu_seconds(pid) - cpu_start
    finally:
        pods.stop()
        jobs.stop()
    own = {("POST", JOB_RESOURCE): n, ("DELETECOLLECTION", JOB_RESOURCE): deletes}
    return {
        "rss_start": rss_start,
        "rss_succeeded": rss_done,
        "rss_peak": rss_mib(pid, "VmHWM"),
        "rss_deleted": rss_deleted,
        "rss_after": rss_after,
        "cpu": cpu,
        "created_s": created_s,
        "succeeded_s": succeeded_s,
        "deleted_s": deleted_s,
        "settled_s": settled_s,
        "settled": settled,
        "requests": span(before, after, own),
    }


# -- report ---------------------------------------------------------------------------------


def log_phase(name: str, figures: dict) -> None:
    """A phase's raw figures on stderr as it ends, so that a later phase's failure loses
    nothing measured (latencies summarized; request counts by verb and resource)."""
    shown = dict(figures)
    if "latencies" in shown:
        shown["latencies"] = {
            q: percentile(figures["latencies"], x) for q, x in (("p50", 0.5), ("p99", 0.99))
        }
    shown["requests"] = {" ".join(kv): c for kv, c in figures["requests"].items()}
    print(f"[{name}] {json.dumps(shown, default=str)}", file=sys.stderr, flush=True)


def per_job(requests: dict, n: int, verbs: set[str]) -> float:
    return sum(v for (verb, _), v in requests.items() if verb in verbs) / n


def breakdown(columns: dict[str, tuple[dict, int]]) -> list[str]:
    """Writes per job by verb and resource, a column per side."""
    keys = sorted({k for requests, _ in columns.values() for k in requests if k[0] in WRITE_VERBS})
    lines = [f"    {'writes per job':<44}" + "".join(f"{name:>10}" for name in columns)]
    for verb, resource in keys:
        cells = "".join(f"{requests.get((verb, resource), 0) / n:>10.2f}" for requests, n in columns.values())
        lines.append(f"    {verb + ' ' + resource:<44}{cells}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=500, help="jobs in the floor and operator bursts")
    ap.add_argument("--progress-jobs", type=int, default=5, help="jobs that report progress, then complete")
    ap.add_argument("--lifecycle-jobs", type=int, default=5000, help="jobs created, completed and deleted")
    ap.add_argument(
        "--lifecycle-rounds",
        type=int,
        default=2,
        help="lifecycle rounds on one operator (a second shows whether what the first left grows)",
    )
    ap.add_argument("--skip-lifecycle", action="store_true", help="no lifecycle phase (rss_mib=-)")
    args = ap.parse_args()
    n, lifecycle_n = args.jobs, 0 if args.skip_lifecycle else args.lifecycle_jobs
    with (
        tempfile.TemporaryDirectory(prefix="kubetune-bench-") as d,
        DevCluster(
            Path(d), nodes=[big_node(max(n, lifecycle_n) + 100)], minio=False, log=lambda *_: None
        ) as cluster,
    ):
        workdir = Path(d)
        api = config.new_client_from_config(str(cluster.endpoints.kubeconfig))
        api.configuration.connection_pool_maxsize = CONCURRENCY * 4
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        install_crd(api, CRD_FILE)

        raw_burst(core, n)  # warm-up, not counted: a fresh cluster's first burst is slower
        raw_rates = [raw_burst(core, n)]
        # -- the floor: a minimal controller, then the same with a Running write -----------
        floor = floor_burst(api, core, n, report_running=False)
        log_phase("floor", floor)
        floor_running = floor_burst(api, core, n, report_running=True)
        log_phase("floor+Running", floor_running)
        # -- the operator, as shipped ----------------------------------------------------
        op = start_operator(cluster, workdir, "burst", SHIPPED_PROGRESS_INTERVAL_S)
        try:
            with namespace(core) as warm_ns, namespace(core) as ns:
                wait_until_reconciling(custom, warm_ns)  # measure reconciles, not start-up
                ours = job_burst(api, ns, n, running="jobs")
                ours["rss_peak"], ours["cpu"] = rss_mib(op.proc.pid, "VmHWM"), cpu_seconds(op.proc.pid)
                labelled = core.list_namespaced_pod(ns, label_selector=JOB_LABEL).items
                assert len(labelled) == n, f"{len(labelled)} pods for {n} jobs"
        finally:
            op.stop()
        log_phase("operator", ours)
        # -- progress, time-scaled ---------------------------------------------------------
        progress = None
        if args.progress_jobs:
            op = start_operator(cluster, workdir, "progress", PROGRESS_INTERVAL_S)
            try:
                with namespace(core) as warm_ns, namespace(core) as ns:
                    wait_until_reconciling(custom, warm_ns)
                    progress = progress_phase(api, cluster, ns, args.progress_jobs)
            finally:
                op.stop()
            log_phase("progress", progress)
        # -- create, complete, delete at scale -----------------------------------------------
        rounds: list[dict] = []
        if lifecycle_n:
            op = start_operator(cluster, workdir, "lifecycle", SHIPPED_PROGRESS_INTERVAL_S)
            try:
                with namespace(core) as warm_ns:
                    wait_until_reconciling(custom, warm_ns)
                    for r in range(args.lifecycle_rounds):
                        with namespace(core) as ns:
                            rounds.append(lifecycle_phase(api, op, ns, lifecycle_n))
                        log_phase(f"lifecycle round {r + 1}", rounds[-1])
            finally:
                op.stop()
        life = rounds[0] if rounds else None
        raw_rates.append(raw_burst(core, n))  # before and after: this machine's load drifts
    raw_rate = statistics.mean(raw_rates)

    def ms(xs, q):
        return f"{percentile(xs, q) * 1000:.0f}"

    ratio = ours["rate"] / floor["rate"]
    p99_ratio = percentile(ours["latencies"], 0.99) / percentile(floor["latencies"], 0.99)
    floor_w, ours_w = per_job(floor["requests"], n, WRITE_VERBS), per_job(ours["requests"], n, WRITE_VERBS)
    print(f"operator_scale: {n} jobs a burst, client concurrency {CONCURRENCY}, one kwok node")
    print(
        f"raw pod creates: {raw_rate:.1f} pods/s (before, after: {', '.join(f'{r:.1f}' for r in raw_rates)})"
    )
    print(f"  {'burst of ' + str(n) + ' jobs':<46}{'floor':>10}{'operator':>10}   target")
    rows = [
        ("jobs/s (first create -> last pod)", floor["rate"], ours["rate"], f"ratio {ratio:.2f} (>= 0.9)"),
        ("  = of raw pods/s", floor["rate"] / raw_rate, ours["rate"] / raw_rate, ""),
        ("create -> pod p50 (ms)", ms(floor["latencies"], 0.5), ms(ours["latencies"], 0.5), ""),
        (
            "create -> pod p99 (ms)",
            ms(floor["latencies"], 0.99),
            ms(ours["latencies"], 0.99),
            f"x{p99_ratio:.2f} of floor (<= 2)",
        ),
        ("first create -> all Running (s)", floor["running_s"], ours["running_s"], ""),
        (
            "writes per job to Running",
            floor_w,
            ours_w,
            f"<= floor + 1 = {floor_w + 1:.2f}" + ("" if ours["settled"] else " (NOT settled)"),
        ),
        (
            "reads per job to Running",
            per_job(floor["requests"], n, READ_VERBS),
            per_job(ours["requests"], n, READ_VERBS),
            "",
        ),
    ]
    for label, a, b, target in rows:
        cell = [f"{x:>10.2f}" if isinstance(x, float) else f"{x:>10}" for x in (a, b)]
        print(f"  {label:<46}{cell[0]}{cell[1]}   {target}")
    fr = floor_running
    print(
        f"  floor + Running (a pod watch and a second status write, phase Running, as the operator "
        f"makes): {fr['rate']:.2f} jobs/s = {fr['rate'] / floor['rate']:.2f} of the floor; create -> pod "
        f"p99 {ms(fr['latencies'], 0.99)} ms; writes per job to Running "
        f"{per_job(fr['requests'], n, WRITE_VERBS):.2f}; operator / floor + Running = "
        f"{ours['rate'] / fr['rate']:.2f}"
    )
    print("\n".join(breakdown({"floor": (floor["requests"], n), "operator": (ours["requests"], n)})))
    print(
        f"  operator in the burst: applying the {n} jobs took {ours['applied_s']:.2f} s; "
        f"peak RSS {ours['rss_peak']:.0f} MiB, CPU {ours['cpu']:.1f} s (from its start)"
    )
    if progress:
        k = args.progress_jobs
        steps = progress["steps"]
        print(
            f"Running -> Succeeded, {k} jobs reporting progress every {PROGRESS_INTERVAL_S:g} s "
            f"(10 simulated s) {REPORTS} times, over {progress['span_s']:.1f} s: "
            f"writes per job {per_job(progress['requests'], k, WRITE_VERBS):.2f} (a controller that "
            f"writes each report and the end: {REPORTS + 1}), reads per job "
            f"{per_job(progress['requests'], k, READ_VERBS):.2f}; last step in status "
            f"{', '.join(str(s) for s in steps)} of {REPORTS}"
        )
        print("\n".join(breakdown({"operator": (progress["requests"], k)})))
    rss_peak = "-"
    if life:
        m = lifecycle_n
        rss_peak = f"{life['rss_peak']:.0f}"
        growth = life["rss_after"] / life["rss_start"] - 1
        print(
            f"lifecycle, {m} jobs: created in {life['created_s']:.1f} s, all Succeeded at "
            f"{life['succeeded_s']:.1f} s, all deleted with their pods at {life['deleted_s']:.1f} s, "
            f"writes settled (the operator's Events posted) at {life['settled_s']:.1f} s"
            + ("" if life["settled"] else " (NOT settled: counted up to then)")
        )
        print(
            f"  operator RSS: start {life['rss_start']:.0f} MiB, all Succeeded {life['rss_succeeded']:.0f}, "
            f"peak {life['rss_peak']:.0f} (<= 300), every pod gone {life['rss_deleted']:.0f}, "
            f"after deletion and settling {life['rss_after']:.0f} "
            f"({growth * 100:+.0f} % of the start, within 10 %); CPU {life['cpu']:.1f} s = "
            f"{life['cpu'] / m * 1000:.2f} ms per job; writes per job create -> deleted "
            f"{per_job(life['requests'], m, WRITE_VERBS):.2f}"
        )
        print("\n".join(breakdown({"operator": (life["requests"], m)})))
        for r, again in enumerate(rounds[1:], start=2):
            print(
                f"  round {r} on the same operator: RSS at its start {again['rss_start']:.0f} MiB, all "
                f"Succeeded {again['rss_succeeded']:.0f}, after deletion {again['rss_after']:.0f} "
                f"({again['rss_after'] / life['rss_after'] * 100 - 100:+.0f} % of round 1's after: "
                f"what round 1 left is kept once, or grows); CPU {again['cpu'] / m * 1000:.2f} ms per job"
            )
    print(f"ratio={ratio:.2f} writes_per_job={ours_w:.2f} rss_mib={rss_peak}")


if __name__ == "__main__":
    main()
