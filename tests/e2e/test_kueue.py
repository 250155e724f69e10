"""Kueue for real: the controller manager built from its Go module (hack/kueue), its
webhooks on loopback with the dev cluster's CA, in front of the real operator, trainer and
kubelets. A job that names a queue is admitted by Kueue as one pod group; a job of higher
priority preempts a running one, which checkpoints on its SIGTERM and resumes exactly;
with two jobs to choose from, Kueue preempts the one whose last checkpoint is newest (the
operator's priority boost on their Workloads)."""

from __future__ import annotations

import pytest
from kubernetes import client

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.kueue import PRIORITY_BOOST_ANNOTATION
from kubetune_dev.devcluster import kueue as dev_kueue
from tests.e2e.helpers import e2e_job, pod_log, resumed_step, status, trained_steps, wait_status
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

KUEUE = dev_kueue.API
LOW, HIGH = "kubetune-e2e-low", "kubetune-e2e-high"


def create_or_keep(fn, *args) -> None:
    try:
        fn(*args)
    except client.ApiException as e:
        if e.status != 409:
            raise


@pytest.fixture
def queue(dev_cluster, api_client, custom, namespace) -> str:
    """Kueue running, a ClusterQueue with room for two 500m/2Gi workers, and its
    LocalQueue in the test's namespace; a low and a high PriorityClass."""
    dev_cluster.start_kueue()
    for obj in dev_kueue.queue_objects(namespace, cpu="1", memory="4Gi"):
        kind = obj["kind"].lower() + "s"
        if obj["metadata"].get("namespace"):
            custom.create_namespaced_custom_object(*KUEUE, namespace, kind, obj)
        else:
            create_or_keep(custom.create_cluster_custom_object, *KUEUE, kind, obj)
    scheduling = client.SchedulingV1Api(api_client)
    for name, value in ((LOW, 100), (HIGH, 1000)):
        body = client.V1PriorityClass(metadata=client.V1ObjectMeta(name=name), value=value)
        create_or_keep(scheduling.create_priority_class, body)

    def active() -> bool:
        lq = custom.get_namespaced_custom_object(*KUEUE, namespace, "localqueues", dev_kueue.CLUSTER_QUEUE)
        return any(
            c["type"] == "Active" and c["status"] == "True"
            for c in (lq.get("status") or {}).get("conditions") or []
        )

    wait_for(active, 60, "the LocalQueue to be active")
    return dev_kueue.CLUSTER_QUEUE


def queued_job(
    name: str, namespace: str, model: str, endpoint: str, queue: str, priority: str, **spec
) -> dict:
    job = e2e_job(name, namespace, model, endpoint, queueName=queue, **spec)
    job["spec"]["podOverrides"] = {**job["spec"]["podOverrides"], "priorityClassName": priority}
    return job


def workload(custom, namespace: str, name: str) -> dict | None:
    try:
        return custom.get_namespaced_custom_object(*KUEUE, namespace, "workloads", name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def kueue_preempted(core, namespace: str, workload_name: str) -> list[str]:
    """Kueue's Preempted Events for a Workload: their messages."""
    events = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={workload_name}"
    ).items
    return [e.message for e in events if e.reason == "Preempted" and e.involved_object.kind == "Workload"]


def has_condition(obj: dict | None, kind: str) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == kind and c["status"] == "True" for c in conds)


def test_a_queued_job_is_admitted_by_kueue_as_one_pod_group(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, queue
):
    job = queued_job("group", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3, queue, LOW, workers=2)
    job["spec"]["training"]["maxSteps"] = 20
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    # Kueue made one Workload for the attempt's two pods and admitted it whole
    admitted = wait_for(
        lambda: has_condition(w := workload(custom, namespace, "group-a1"), "Admitted") and w,
        120,
        "Kueue to admit the pod group",
    )
    (podset,) = admitted["spec"]["podSets"]
    assert podset["count"] == 2
    assert admitted["status"]["admission"]["clusterQueue"] == queue
    selector = "kueue.x-k8s.io/pod-group-name=group-a1"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    assert len(pods) == 2
    for pod in pods:  # Kueue's gates held them, not ours
        assert {g.name for g in pod.spec.scheduling_gates or []} <= {
            "kueue.x-k8s.io/admission",
            "kueue.x-k8s.io/topology",
        }
    # and Kueue lifts them together, once admitted
    wait_for(
        lambda: all(
            not p.spec.scheduling_gates
            for p in core.list_namespaced_pod(namespace, label_selector=selector).items
        ),
        60,
        "Kueue to lift its gates",
    )
    st = wait_status(
        custom, namespace, "group", lambda s: s.get("phase") in ("Succeeded", "Failed"), 300, "done"
    )
    assert st["phase"] == "Succeeded" and (st["preemptions"], st["failures"]) == (0, 0), st
    # the finished group gave its quota back
    wait_for(
        lambda: has_condition(workload(custom, namespace, "group-a1"), "Finished"), 60, "Workload Finished"
    )


def test_kueue_preempts_the_job_with_the_newest_checkpoint_which_resumes_exactly(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, queue
):
    endpoint = dev_cluster.endpoints.s3
    # two low-priority jobs fill the queue: "fresh" checkpoints every 5 steps and was
    # admitted first; "stale" has no checkpoint. Kueue's own tie-break among equal
    # priorities takes the newest admitted ("stale"); the boost must make it "fresh".
    fresh = queued_job("fresh", namespace, tiny_model_in_s3, endpoint, queue, LOW)
    fresh["spec"]["checkpoint"]["everySteps"] = 5
    fresh["spec"]["training"]["maxSteps"] = 300
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, fresh)
    wait_for(
        lambda: has_condition(workload(custom, namespace, "fresh-a1"), "Admitted"), 120, "fresh admitted"
    )
    stale = queued_job("stale", namespace, tiny_model_in_s3, endpoint, queue, LOW)
    stale["spec"]["checkpoint"]["everySteps"] = 1000
    stale["spec"]["training"]["maxSteps"] = 500
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, stale)
    for name in ("fresh", "stale"):
        wait_status(custom, namespace, name, lambda s: s.get("phase") == "Running", 180, f"{name} running")
    # the operator has set fresh's boost below stale's (a committed checkpoint, none)
    wait_status(
        custom, namespace, "fresh", lambda s: (s.get("lastCheckpoint") or {}).get("step"), 120, "a checkpoint"
    )

    def boosts() -> tuple[int, int] | None:
        values = [
            ((workload(custom, namespace, f"{n}-a1") or {}).get("metadata", {}).get("annotations") or {}).get(
                PRIORITY_BOOST_ANNOTATION
            )
            for n in ("fresh", "stale")
        ]
        return None if None in values else tuple(int(v) for v in values)

    got = wait_for(lambda: (b := boosts()) and b[0] < b[1] and b, 60, "fresh's boost below stale's")
    assert got[1] == 0, got

    urgent = queued_job("urgent", namespace, tiny_model_in_s3, endpoint, queue, HIGH)
    urgent["spec"]["training"]["maxSteps"] = 20
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, urgent)
    # Kueue evicts fresh's pod group (TerminationTarget, then a delete with the grace
    # period): the trainer saves its step on the SIGTERM; the operator counts a preemption
    st = wait_status(custom, namespace, "fresh", lambda s: s.get("preemptions") == 1, 180, "fresh preempted")
    assert st["failures"] == 0, st
    assert status(custom, namespace, "stale").get("preemptions") == 0
    # Kueue's own record of it (its Events outlive the finished Workloads it deletes)
    assert kueue_preempted(core, namespace, "fresh-a1")
    assert not kueue_preempted(core, namespace, "stale-a1")
    for name in ("urgent", "fresh", "stale"):
        st = wait_status(
            custom, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), 420, name
        )
        assert st["phase"] == "Succeeded" and st["failures"] == 0, (name, st)
    assert status(custom, namespace, "stale")["preemptions"] == 0
    assert status(custom, namespace, "urgent")["preemptions"] == 0
    # fresh resumed from the step its SIGTERM saved: nothing trained twice
    stopped_at = trained_steps(pod_log(dev_cluster, namespace, "fresh-a1-w0"))[-1]
    log1 = pod_log(dev_cluster, namespace, "fresh-a1-w0")
    assert f"checkpoint of step {stopped_at} committed" in log1 or f"step {stopped_at} was already" in log1, (
        log1[-2000:]
    )
    assert resumed_step(pod_log(dev_cluster, namespace, "fresh-a2-w0")) == stopped_at
