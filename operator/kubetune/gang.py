"""Gang admission without Kueue, pure: can every worker of an attempt be placed now?

Workers of a multi-worker attempt are created with a scheduling gate, so the scheduler
leaves them alone and none of them holds a GPU while the others wait. The operator lifts
the gate only when this check finds room for all of them at once: nodes that are Ready,
schedulable, whose taints the worker tolerates and whose labels its node selector and
required node affinity accept, with enough allocatable resources left after the pods
already bound there. Workers of other gangs that were let through but are not bound yet
are placed first, so two gangs are never let through on the same free capacity.

It is the scheduler's filter in miniature (resources, taints, selectors, affinity), not
all of it: inter-pod affinity, topology spread and volume limits are left to the
scheduler, which still places the pods; a gang it then cannot place whole shows up as
Unschedulable like any other pod.

The pods it counts are every active pod in the cluster, unless the chart's
`gang.capacityView: namespaces` (namespaced installs only) narrows them to the watched
namespaces' (capacity_scope): then the operator needs no cluster-wide pod list, and
other tenants' pods on the same nodes are invisible to this check, so it can let a gang
through that the scheduler then cannot place whole."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from kubernetes.utils.quantity import parse_quantity

from kubetune.api import GROUP

GANG_GATE = f"{GROUP}/gang"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
# JSON list of namespaces: count only their pods (the chart sets it with
# gang.capacityView: namespaces and watch.namespaces); unset: every pod in the cluster
CAPACITY_NAMESPACES_ENV = "KUBETUNE_GANG_CAPACITY_NAMESPACES"


@dataclass
class Fit:
    ok: bool
    message: str


def capacity_scope(environ: Mapping[str, str] = os.environ) -> list[str] | None:
    """Whose pods hold node capacity in the gang check: None, every active pod in the
    cluster (a cluster-wide pod list); else only those of these namespaces (each listed
    under the operator's Role there). Unset or empty: the whole cluster."""
    raw = json.loads(environ.get(CAPACITY_NAMESPACES_ENV) or "null")
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list) or not all(isinstance(ns, str) and ns for ns in raw):
        raise ValueError(f"{CAPACITY_NAMESPACES_ENV} must be a JSON list of namespace names, not {raw!r}")
    return list(dict.fromkeys(raw))


def queued_in_kueue(pod: dict) -> bool:
    """Held by Kueue's admission gate: its pod group waits in a queue for quota."""
    return any(g.get("name") == KUEUE_ADMISSION_GATE for g in pod["spec"].get("schedulingGates") or [])


def gated(pod: dict) -> bool:
    return any(g.get("name") == GANG_GATE for g in pod["spec"].get("schedulingGates") or [])


def without_gang_gate(pod: dict) -> list[dict]:
    """The pod's scheduling gates once ours is lifted (another controller's stay)."""
    return [g for g in pod["spec"].get("schedulingGates") or [] if g.get("name") != GANG_GATE]


def declared(container: dict) -> dict[str, str]:
    """A container's requests, its limit standing in where only a limit is given."""
    res = container.get("resources") or {}
    return {**(res.get("limits") or {}), **(res.get("requests") or {})}


def requests(pod: dict) -> dict[str, Decimal]:
    """What the scheduler charges a pod: the sum of its containers' requests, at least
    each init container's."""
    total: dict[str, Decimal] = {}
    for c in pod["spec"].get("containers") or []:
        for k, v in declared(c).items():
            total[k] = total.get(k, Decimal(0)) + parse_quantity(v)
    for c in pod["spec"].get("initContainers") or []:
        for k, v in declared(c).items():
            total[k] = max(total.get(k, Decimal(0)), parse_quantity(v))
    total["pods"] = Decimal(1)
    return total


def as_written(pod: dict, totals: dict[str, Decimal]) -> dict[str, object]:
    """A one-container pod's requests as its spec spells them (16Gi, not 17179869184)."""
    containers = pod["spec"].get("containers") or []
    if len(containers) != 1 or pod["spec"].get("initContainers"):
        return dict(totals)
    return {**totals, **declared(containers[0])}


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if not t.get("key"):
            if t.get("operator") == "Exists":
                return True
            continue
        if t["key"] != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def expression_matches(labels: dict[str, str], expr: dict) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    has, value = key in labels, labels.get(key)
    if op == "In":
        return has and value in values
    if op == "NotIn":
        return not has or value not in values
    if op == "Exists":
        return has
    if op == "DoesNotExist":
        return not has
    if op in ("Gt", "Lt"):
        try:
            number, bound = int(value), int(values[0])
        except (TypeError, ValueError, IndexError):
            return False
        return number > bound if op == "Gt" else number < bound
    return False


def why_not(pod: dict, node: dict) -> str | None:
    """Why the pod may not run on this node at all (resources aside), or None."""
    spec, meta = node.get("spec") or {}, node["metadata"]
    labels = meta.get("labels") or {}
    ready = next(
        (c for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None
    )
    if not ready or ready.get("status") != "True":
        return "not ready"
    if spec.get("unschedulable"):
        return "cordoned"
    tolerations = pod["spec"].get("tolerations") or []
    for taint in spec.get("taints") or []:
        if taint.get("effect") in BLOCKING_EFFECTS and not tolerates(tolerations, taint):
            return f"taint {taint['key']} not tolerated"
    for k, v in (pod["spec"].get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return f"node selector {k}={v}"
    required = (
        ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        or {}
    ).get("nodeSelectorTerms")
    if required and not any(
        all(expression_matches(labels, e) for e in term.get("matchExpressions") or []) for term in required
    ):
        return "node affinity"
    return None


def free_capacity(nodes: list[dict], pods: list[dict]) -> dict[str, dict[str, Decimal]]:
    """Allocatable minus what the pods bound to each node request."""
    free = {
        n["metadata"]["name"]: {
            k: parse_quantity(v) for k, v in ((n.get("status") or {}).get("allocatable") or {}).items()
        }
        for n in nodes
    }
    for p in pods:
        node = p["spec"].get("nodeName")
        if node in free and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            for k, v in requests(p).items():
                free[node][k] = free[node].get(k, Decimal(0)) - v
    return free


def place_one(pod: dict, want: dict[str, Decimal], nodes: list[dict], free: dict) -> str | None:
    """First node with room for the pod; its capacity is taken. None if none has."""
    for n in nodes:
        name = n["metadata"]["name"]
        if why_not(pod, n) is None and all(free[name].get(k, Decimal(0)) >= v for k, v in want.items() if v):
            for k, v in want.items():
                free[name][k] = free[name].get(k, Decimal(0)) - v
            return name
    return None


def gang_fit(worker: dict, count: int, nodes: list[dict], pods: list[dict]) -> Fit:
    """Room for `count` workers shaped like `worker`, after the pods already bound and the
    admitted-but-unbound workers of other gangs (pods without a nodeName and gates)."""
    free = free_capacity(nodes, pods)
    nodes = sorted(nodes, key=lambda n: n["metadata"]["name"])
    for p in pods:
        waiting = not p["spec"].get("nodeName") and not p["spec"].get("schedulingGates")
        if waiting and (p["metadata"].get("labels") or {}).get(f"{GROUP}/job"):
            place_one(p, requests(p), nodes, free)
    want = requests(worker)
    placed = [place_one(worker, want, nodes, free) for _ in range(count)]
    fitting = [n for n in placed if n]
    if len(fitting) == count:
        return Fit(True, f"room for all {count} workers ({', '.join(sorted(set(fitting)))})")
    need = ", ".join(f"{k} {v}" for k, v in sorted(as_written(worker, want).items()) if k != "pods" and v)
    barred = sorted({r for n in nodes if (r := why_not(worker, n))})
    detail = f"; other nodes: {', '.join(barred)}" if barred else ""
    return Fit(
        False,
        f"room for {len(fitting)} of {count} workers ({need} each) on {len(nodes)} node(s){detail}",
    )
