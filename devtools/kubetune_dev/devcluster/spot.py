"""A spot market for the dev cluster (`python -m kubetune_dev dev spot-market`): reclaims spot nodes at
random, announcing each reclaim the way the clouds do before it happens.

  - Reclaims arrive as a Poisson process (seeded: the same seed, the same schedule) at
    `rate` per hour; `time_scale` compresses time (at 10, an hour of market is six
    minutes, and every interval below is divided by 10 too).
  - Each reclaim picks one of the market's nodes that is up, announces it (the notice of
    `cloud`, see NOTICES and kubetune.notices), waits the notice window, then takes it:
    the node is cordoned and its pods are evicted with their grace period (the kubelet's
    graceful node shutdown); whatever still runs `shutdown_s` later is lost hard, as a
    VM that is gone (no SIGTERM, nothing saved). A notice of 0 s is a hard loss at once.
  - The capacity comes back `return_s` later: the notice is withdrawn, the node uncordoned.

Pure parts (the schedule, the notice patches) are functions; SpotMarket does the I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import threading
import time
from collections.abc import Callable

NOTICES = {
    # cloud -> (taint key, or None for a condition; what the cloud gives as notice, seconds)
    "gke": ("cloud.google.com/impending-node-termination", 30),
    "aws": ("aws-node-termination-handler/spot-itn", 120),
    "karpenter": ("karpenter.sh/disrupted", 30),
    "azure": (None, 30),  # AKS node problem detector: condition VMEventScheduled (Preempt)
}
AZURE_CONDITION = "VMEventScheduled"


def reclaim_times(seed: int, rate_per_hour: float, duration_s: float, time_scale: float = 1.0) -> list[float]:
    """When (real seconds from the start) the reclaims of a market come: exponential gaps
    with mean 3600 / (rate x scale)."""
    if rate_per_hour <= 0:
        return []
    rng = random.Random(seed)
    mean = 3600.0 / (rate_per_hour * time_scale)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(1.0 / mean)
        if t > duration_s:
            return out
        out.append(round(t, 3))


def with_notice(taints: list[dict], key: str) -> list[dict]:
    return [t for t in taints if t.get("key") != key] + [{"key": key, "effect": "NoSchedule"}]


def without_notice(taints: list[dict], key: str) -> list[dict]:
    return [t for t in taints if t.get("key") != key]


def azure_condition(on: bool, now: dt.datetime) -> dict:
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": AZURE_CONDITION,
        "status": "True" if on else "False",
        "reason": AZURE_CONDITION if on else "NoVMEventScheduled",
        "message": "Preempt scheduled" if on else "VM has no scheduled event",
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp,
    }


@dataclasses.dataclass
class Reclaim:
    at_s: float  # real seconds from the market's start
    node: str
    cloud: str
    notice_s: float  # real
    evicted: list[str] = dataclasses.field(default_factory=list)  # namespace/name
    lost_hard: list[str] = dataclasses.field(default_factory=list)
    back_at_s: float | None = None


class SpotMarket:
    """Runs in a thread: start(), then stop() (which also gives every node back)."""

    def __init__(
        self,
        core,  # kubernetes.client.CoreV1Api
        nodes: list[str],
        rate_per_hour: float,
        seed: int = 0,
        cloud: str = "gke",
        notice_s: float | None = None,
        shutdown_s: float = 30.0,
        return_s: float = 120.0,
        time_scale: float = 1.0,
        duration_s: float = 24 * 3600.0,
        hard_loss: Callable[[str, str], None] | None = None,  # (namespace, pod): no SIGTERM
        log: Callable[[str], None] = print,
        prefer: Callable[[list[str]], str | None] | None = None,  # tests: which up node goes
        max_reclaims: int | None = None,
    ) -> None:
        if cloud not in NOTICES:
            raise ValueError(f"cloud must be one of {', '.join(NOTICES)}")
        if not nodes:
            raise ValueError("a market needs at least one node")
        self.core, self.nodes, self.cloud = core, list(nodes), cloud
        self.key = NOTICES[cloud][0]
        self.rate, self.scale = rate_per_hour, float(time_scale)
        scale = self.scale
        self.notice_s = (NOTICES[cloud][1] if notice_s is None else notice_s) / scale
        self.shutdown_s, self.return_s = shutdown_s / scale, return_s / scale
        self.times = reclaim_times(seed, rate_per_hour, duration_s / scale, scale)
        self.rng = random.Random(seed + 1)
        self.hard_loss, self.log, self.prefer = hard_loss, log, prefer
        if max_reclaims is not None:
            self.times = self.times[:max_reclaims]
        self.reclaims: list[Reclaim] = []
        self.down: dict[str, Reclaim] = {}  # nodes reclaimed and not back yet
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def describe(self) -> str:
        return (
            f"spot market: {self.rate:g} reclaims/hour over {', '.join(self.nodes)}, {self.cloud} notices "
            f"{self.notice_s:.1f} s ahead, capacity back after {self.return_s:.0f} s "
            f"(time scale {self.scale:g}: real seconds)"
        )

    # -- running -------------------------------------------------------------------------
    def start(self) -> SpotMarket:
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True, name="spot-market")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread:
            self.thread.join(timeout=60)
        for node in list(self.down):
            self._give_back(node)

    def _run(self) -> None:
        pending = list(self.times)
        workers: list[threading.Thread] = []
        while not self.stopping.is_set():
            now = time.monotonic() - self.t0
            for node, rec in list(self.down.items()):
                if rec.back_at_s is not None and now >= rec.back_at_s:
                    self._give_back(node)
            if pending and now >= pending[0]:
                pending.pop(0)
                up = [n for n in self.nodes if n not in self.down]
                if up:
                    node = (self.prefer(up) if self.prefer else None) or self.rng.choice(up)
                    # each reclaim on its own thread: one node's notice window holds up no other
                    w = threading.Thread(target=self._reclaim, args=(self._register(node),), daemon=True)
                    w.start()
                    workers.append(w)
            self.stopping.wait(0.2)
        for w in workers:
            w.join(timeout=60)

    def reclaim_now(self, node: str) -> Reclaim:
        """Announce, wait the notice, take `node` (returns once taken; it comes back
        return_s later while the market runs, or at stop())."""
        rec = self._register(node)
        self._reclaim(rec)
        return rec

    def _register(self, node: str) -> Reclaim:
        if not hasattr(self, "t0"):
            self.t0 = time.monotonic()
        rec = Reclaim(
            at_s=round(time.monotonic() - self.t0, 1), node=node, cloud=self.cloud, notice_s=self.notice_s
        )
        with self.lock:
            self.down[node] = rec
            self.reclaims.append(rec)
        return rec

    def _reclaim(self, rec: Reclaim) -> None:
        try:
            self._announce(rec.node, True)
            self.log(
                f"[market {rec.at_s:7.1f}s] {rec.node}: {self.cloud} notice, reclaimed in {rec.notice_s:.1f} s"
            )
            if self.stopping.wait(rec.notice_s):
                return
            self.core.patch_node(rec.node, {"spec": {"unschedulable": True}})
            pods = self._pods_on(rec.node)
            if rec.notice_s > 0:
                for pod in pods:
                    self._evict(pod)
                    rec.evicted.append(f"{pod.metadata.namespace}/{pod.metadata.name}")
                deadline = time.monotonic() + self.shutdown_s
                while time.monotonic() < deadline and self._pods_on(rec.node):
                    self.stopping.wait(0.2)
            for pod in self._pods_on(rec.node):  # the VM is gone: what still runs is lost
                rec.lost_hard.append(f"{pod.metadata.namespace}/{pod.metadata.name}")
                try:
                    if self.hard_loss is None:
                        raise LookupError("no hard loss here")
                    self.hard_loss(pod.metadata.namespace, pod.metadata.name)
                except Exception:  # (a kwok node's pods have no processes to kill)
                    self.core.delete_namespaced_pod(
                        pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
                    )
            self.log(
                f"[market {time.monotonic() - self.t0:7.1f}s] {rec.node}: taken "
                f"(evicted: {', '.join(rec.evicted) or 'none'}; lost hard: {', '.join(rec.lost_hard) or 'none'})"
            )
        except Exception as e:  # a market that stops on one API error would hide the rest
            self.log(f"[market] {rec.node}: reclaim failed: {e}")
        finally:
            rec.back_at_s = time.monotonic() - self.t0 + self.return_s

    def _give_back(self, node: str) -> None:
        try:
            self._announce(node, False)
            self.core.patch_node(node, {"spec": {"unschedulable": False}})
            self.log(f"[market {time.monotonic() - self.t0:7.1f}s] {node}: capacity back")
        except Exception as e:
            self.log(f"[market] {node}: could not give back: {e}")
        self.down.pop(node, None)

    # -- the Kubernetes side -------------------------------------------------------------
    def _announce(self, node: str, on: bool) -> None:
        if self.key is None:
            now = dt.datetime.now(dt.UTC)
            self.core.patch_node_status(node, {"status": {"conditions": [azure_condition(on, now)]}})
            return
        set_notice_taint(self.core, node, self.key, on)

    def _pods_on(self, node: str) -> list:
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
        return [
            p
            for p in pods
            if p.status.phase in ("Pending", "Running")
            and not any(o.kind == "DaemonSet" for o in p.metadata.owner_references or [])
        ]

    def _evict(self, pod) -> None:
        from kubernetes import client

        try:
            self.core.create_namespaced_pod_eviction(
                pod.metadata.name,
                pod.metadata.namespace,
                client.V1Eviction(
                    metadata=client.V1ObjectMeta(name=pod.metadata.name, namespace=pod.metadata.namespace)
                ),
            )
        except client.ApiException as e:
            if e.status != 404:
                raise

    def summary(self) -> list[dict]:
        with self.lock:
            return [dataclasses.asdict(r) for r in self.reclaims]


def set_notice_taint(core, node: str, key: str, on: bool) -> None:
    """Put the NoSchedule taint `key` on `node`, or take it off: a read-modify-write of the
    taints, guarded by resourceVersion (the taints list is replaced whole by a patch)."""
    for _ in range(10):
        obj = core.read_node(node)
        taints = [{k: v for k, v in t.to_dict().items() if v is not None} for t in obj.spec.taints or []]
        new = with_notice(taints, key) if on else without_notice(taints, key)
        try:
            core.patch_node(
                node,
                {"metadata": {"resourceVersion": obj.metadata.resource_version}, "spec": {"taints": new}},
            )
            return
        except Exception as e:
            if getattr(e, "status", None) != 409:
                raise


def spot_nodes(core) -> list[str]:
    """The cluster's spot nodes, by every cloud's spot label."""
    from kubetune.placement import SPOT_LABELS

    out = []
    for node in core.list_node().items:
        labels = node.metadata.labels or {}
        if any(labels.get(k) == v for k, v in SPOT_LABELS):
            out.append(node.metadata.name)
    return sorted(out)
