"""Gang admission's capacity check (kubetune.gang.gang_fit), pure: the scheduler's
filters in miniature — readiness, cordons, taints, selectors, affinity, resources."""

from __future__ import annotations

from kubetune.gang import expression_matches, gang_fit, requests, tolerates

GPU = "nvidia.com/gpu"


def node(name, gpus="4", cpu="16", labels=None, taints=(), ready=True, cordoned=False):
    return {
        "metadata": {"name": name, "labels": {"pool": "a", **(labels or {})}},
        "spec": {"taints": list(taints), **({"unschedulable": True} if cordoned else {})},
        "status": {
            "allocatable": {"cpu": cpu, "memory": "64Gi", "pods": "110", GPU: gpus},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def worker(
    gpus="4", cpu="2", selector=None, tolerations=(), affinity=None, node_name=None, gates=True, job="j"
):
    spec = {
        "containers": [{"resources": {"requests": {"cpu": cpu, GPU: gpus}, "limits": {GPU: gpus}}}],
        "nodeSelector": selector or {},
        "tolerations": list(tolerations),
    }
    if affinity:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": affinity}]
                }
            }
        }
    if node_name:
        spec["nodeName"] = node_name
    if gates:
        spec["schedulingGates"] = [{"name": "kubetune.io/gang"}]
    return {
        "metadata": {"name": "w", "labels": {"kubetune.io/job": job}},
        "spec": spec,
        "status": {"phase": "Pending"},
    }


def test_two_workers_need_two_nodes_with_room():
    assert gang_fit(worker(), 2, [node("n0"), node("n1")], []).ok
    fit = gang_fit(worker(), 2, [node("n0")], [])
    assert not fit.ok and "room for 1 of 2 workers" in fit.message
    assert "(cpu 2, nvidia.com/gpu 4 each)" in fit.message  # as the spec spells them
    # two smaller workers share one node
    assert gang_fit(worker(gpus="2"), 2, [node("n0")], []).ok


def test_bound_pods_and_admitted_gangs_hold_capacity():
    nodes = [node("n0"), node("n1")]
    busy = worker(gpus="1", node_name="n1", gates=False, job="other")
    assert not gang_fit(worker(), 2, nodes, [busy]).ok
    finished = {**busy, "status": {"phase": "Succeeded"}}
    assert gang_fit(worker(), 2, nodes, [finished]).ok
    # another gang let through but not bound yet is placed first
    admitted = worker(gates=False, job="other")
    assert not gang_fit(worker(), 2, nodes, [admitted]).ok
    # a gated pod of another gang holds nothing
    assert gang_fit(worker(), 2, nodes, [worker(job="other")]).ok


def test_nodes_the_scheduler_would_filter_out_do_not_count():
    taint = {"key": GPU, "effect": "NoSchedule"}
    nodes = [node("n0", taints=[taint]), node("n1", ready=False), node("n2", cordoned=True)]
    fit = gang_fit(worker(), 1, nodes, [])
    assert not fit.ok and "taint nvidia.com/gpu not tolerated" in fit.message and "cordoned" in fit.message
    assert gang_fit(
        worker(tolerations=[{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]), 1, nodes, []
    ).ok
    labelled = [node("n0", labels={"gpu": "a100"}), node("n1", labels={"gpu": "t4"})]
    assert not gang_fit(worker(selector={"gpu": "a100"}), 2, labelled, []).ok
    assert gang_fit(
        worker(affinity=[{"key": "gpu", "operator": "In", "values": ["a100", "t4"]}]), 2, labelled, []
    ).ok


def test_affinity_operators_and_tolerations():
    labels = {"mem": "81920", "spot": "true"}
    assert expression_matches(labels, {"key": "mem", "operator": "Gt", "values": ["40959"]})
    assert not expression_matches(labels, {"key": "mem", "operator": "Lt", "values": ["40959"]})
    assert expression_matches(labels, {"key": "x", "operator": "NotIn", "values": ["1"]})
    assert expression_matches(labels, {"key": "x", "operator": "DoesNotExist"})
    assert not expression_matches(labels, {"key": "spot", "operator": "NotIn", "values": ["true"]})
    taint = {"key": "k", "value": "v", "effect": "NoSchedule"}
    assert tolerates([{"key": "k", "operator": "Equal", "value": "v"}], taint)
    assert not tolerates([{"key": "k", "operator": "Equal", "value": "w"}], taint)
    assert not tolerates([{"key": "k", "operator": "Exists", "effect": "NoExecute"}], taint)
    assert tolerates([{"operator": "Exists"}], taint)


def test_requests_follow_the_scheduler():
    pod = worker(cpu="500m")
    pod["spec"]["initContainers"] = [{"resources": {"requests": {"cpu": "2"}}}]
    r = requests(pod)
    assert r["cpu"] == 2 and r[GPU] == 4 and r["pods"] == 1
