"""The operator, running for real against the dev cluster: examples are placed on the
nodes they ask for; invalid specs are refused with the field named; status, events,
suspend, deadlines, TTL and garbage collection behave as Kubernetes users expect."""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune_dev.devcluster.nodes import GKE_SPOT_LABEL, RUNNER_LABEL
from kubetune_dev.devcluster.procs import tail
from tests.helpers import OPERATOR_LOG, kubectl, wait_for
from tests.integration.helpers import create, get, minimal_job, report_trainer_exit, status

pytestmark = pytest.mark.cluster
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def wait_phase(custom, namespace, name, phase, timeout_s=30) -> dict:
    try:
        return wait_for(
            lambda: (s := status(custom, namespace, name)).get("phase") == phase and s,
            timeout_s,
            f"{name} to be {phase}",
        )
    except TimeoutError as e:
        # what the job and the operator show at the end of the wait, not at its start
        raise TimeoutError(
            f"{e}; status now {status(custom, namespace, name)}; operator log:\n{operator_log_tail()}"
        ) from None


def operator_log_tail() -> str:
    return tail(OPERATOR_LOG[0], 40) if OPERATOR_LOG else "(no operator)"


def job_pods(core, namespace, name):
    return core.list_namespaced_pod(namespace, label_selector=f"kubetune.io/job={name}").items


def scheduled_pods(core, namespace, name, count):
    return wait_for(
        lambda: (
            (ps := job_pods(core, namespace, name))
            and len(ps) == count
            and all(p.spec.node_name for p in ps)
            and ps
        ),
        30,
        f"{count} pod(s) of {name} scheduled",
    )


def condition(st: dict, kind: str) -> dict | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), None)


# -- placement -------------------------------------------------------------------------------

PLACEMENT = {
    "text-to-sql-intel.yaml": lambda labels: labels.get("intel.feature.node.kubernetes.io/gpu") == "true",
    "llama2-chat-guanaco-spot.yaml": lambda labels: (
        labels.get(GKE_SPOT_LABEL) == "true" and labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    ),
    # spot not asked for: never on spot capacity
    "falcon-7b-faq.yaml": lambda labels: (
        GKE_SPOT_LABEL not in labels and labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    ),
    "falcon-7b-alpaca-finance.yaml": lambda labels: (
        labels.get(GKE_SPOT_LABEL) == "true" and labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    ),
    "phi2-toxic-spot-t4.yaml": lambda labels: (
        labels.get(GKE_SPOT_LABEL) == "true" and labels["nvidia.com/gpu.product"] == "Tesla-T4"
    ),
    "multi-worker.yaml": lambda labels: (
        labels.get(GKE_SPOT_LABEL) == "true" and labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    ),
}


@pytest.mark.parametrize("example", sorted(PLACEMENT))
def test_example_pods_land_on_the_nodes_they_ask_for(operator, core, custom, namespace, example):
    job = load(example)
    create(custom, namespace, job)
    name = job["metadata"]["name"]
    workers = job["spec"].get("workers", 1)
    pods = scheduled_pods(core, namespace, name, workers)
    for pod in pods:
        labels = core.read_node(pod.spec.node_name).metadata.labels
        assert PLACEMENT[example](labels), f"{pod.metadata.name} on {pod.spec.node_name}: {labels}"
    st = wait_phase(custom, namespace, name, "Running")
    assert st["attempt"] == 1 and st["preemptions"] == 0 and st["failures"] == 0
    assert condition(st, "Running")["status"] == "True"
    assert (
        st["progress"]["totalSteps"] == job["spec"]["training"].get("maxSteps", 300)
        if "training" in job["spec"]
        else st["progress"]["totalSteps"] == 300
    )
    if workers > 1:
        svc = core.read_namespaced_service(name, namespace)
        assert svc.spec.cluster_ip == "None"


def example_files() -> list[str]:
    """Every example that is a Kubernetes object (local-*.yaml are `python -m kubetune_dev train` configs)."""
    return sorted(
        f.name
        for f in EXAMPLES.glob("*.yaml")
        if all("apiVersion" in d for d in yaml.safe_load_all(f.read_text()) if d)
    )


@pytest.mark.parametrize("example", example_files())
def test_every_example_passes_a_server_side_dry_run(dev_cluster, crd_installed, namespace, example):
    out = kubectl(
        dev_cluster, namespace, "apply", "--dry-run=server", "-f", str(EXAMPLES / example), check=False
    )
    assert out.returncode == 0, out.stderr
    assert "(server dry run)" in out.stdout


def test_every_gpu_example_is_placed_by_a_test():
    gpu = {
        name
        for name in example_files()
        for d in yaml.safe_load_all((EXAMPLES / name).read_text())
        if d
        and d["kind"] == "FineTuneJob"
        and d["spec"].get("resources", {}).get("accelerator", "nvidia") != "cpu"
    }
    assert gpu == set(PLACEMENT)


def test_a_job_that_fits_nowhere_shows_the_schedulers_reason(operator, core, custom, namespace):
    create(
        custom, namespace, minimal_job("too-big", resources={"accelerator": "nvidia", "gpusPerWorker": 16})
    )
    st = wait_for(
        lambda: (s := status(custom, namespace, "too-big")).get("reason") == "Unschedulable" and s,
        30,
        "an Unschedulable status",
    )
    assert st["phase"] == "Pending"
    cond = condition(st, "Scheduled")
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]


# -- invalid specs ---------------------------------------------------------------------------


def spec_with(path: str, value):
    job = minimal_job("bad")
    node = job["spec"]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return job


DELETE = object()
INVALID = [  # (path, value, text the API server's message must contain)
    ("training.learningRate", "fast", "spec.training.learningRate"),
    ("training.learningRate", -1e-4, "spec.training.learningRate"),
    ("training.batchSize", 0, "spec.training.batchSize"),
    ("training.maxSteps", 0, "spec.training.maxSteps"),
    ("training.gradientAccumulation", -2, "spec.training.gradientAccumulation"),
    ("training.scheduler", "exponential", "spec.training.scheduler"),
    ("training.warmupRatio", 1.5, "spec.training.warmupRatio"),
    ("lora.r", 0, "spec.lora.r"),
    ("lora.dropout", 1.0, "spec.lora.dropout"),
    ("lora.alpha", 0, "spec.lora.alpha"),
    ("lora.targetModules", [], "spec.lora.targetModules"),
    ("lora.initFrom", {}, "set adapter or uri"),
    ("lora.initFrom", {"adapter": "Not_A_Name"}, "spec.lora.initFrom.adapter"),
    ("lora.initFrom", {"uri": "s3://b/a/", "sha256": "xyz"}, "spec.lora.initFrom.sha256"),
    ("resources.accelerator", "tpu", "spec.resources.accelerator"),
    ("resources.gpusPerWorker", -1, "spec.resources.gpusPerWorker"),
    ("resources.memory", "lots", "spec.resources.memory"),
    ("resources.intelResource", "gaudi", "spec.resources.intelResource"),
    ("dataset", DELETE, "spec.dataset"),
    ("dataset.uri", "http://example.com/data", "spec.dataset.uri"),
    ("dataset.uri", "s3://", "spec.dataset.uri"),
    ("dataset.maxSeqLength", 8, "spec.dataset.maxSeqLength"),
    ("dataset.template", "sql", "spec.dataset.template"),
    ("dataset.template", "custom", "format is required with template custom"),
    (
        "dataset",
        {"uri": "s3://data/x/", "template": "custom", "format": "Q: {q} A:"},
        "format must contain {output}",
    ),
    ("dataset.validation", {"fraction": 0.1, "uri": "s3://d/v/"}, "at most one of fraction and uri"),
    ("checkpoint.uri", "/local/path", "spec.checkpoint.uri"),
    ("checkpoint.uri", "file:///ckpt/", "spec.checkpoint.uri must be s3://"),
    ("output.uri", "file:///adapter/", "spec.output.uri must be s3://"),
    ("checkpoint.everySteps", 0, "spec.checkpoint.everySteps"),
    ("output", DELETE, "spec.output"),
    ("model", {"name": "a/b", "uri": "s3://m/b/"}, "exactly one of name and uri"),
    ("model", {}, "exactly one of name and uri"),
    ("workers", 0, "spec.workers"),
    ("backoffLimit", -1, "spec.backoffLimit"),
    ("quantization.type", "int3", "spec.quantization.type"),
    ("storage.endpoint", "minio:9000", "spec.storage.endpoint"),
    ("resources", {"accelerator": "cpu", "gpusPerWorker": 2}, "gpusPerWorker must be 0 or unset"),
    ("resources", {"accelerator": "nvidia", "gpusPerWorker": 0}, "gpusPerWorker must be at least 1"),
    # what the API server would refuse the pods for, refused with the job itself
    ("podOverrides.labels", {"bad key!": "x"}, "label keys must be Kubernetes qualified names"),
    ("podOverrides.labels", {"team": "a b"}, "label values must be up to 63 characters"),
    ("podOverrides.tolerations", [{"key": "k", "operator": "Exists", "value": "x"}], "must not set a value"),
    ("podOverrides.tolerations", [{"operator": "Equal", "value": "x"}], "without a key must have operator"),
    ("queueName", "q" * 64, "spec.queueName"),
    ("queueName", "team queue", "spec.queueName"),
]


@pytest.mark.parametrize(("path", "value", "needle"), INVALID, ids=[f"{p}={v!r}"[:40] for p, v, _ in INVALID])
def test_invalid_specs_are_rejected_with_the_field_named(
    custom, crd_installed, namespace, path, value, needle
):
    with pytest.raises(ApiException) as err:
        create(custom, namespace, spec_with(path, value))
    assert err.value.status == 422
    assert needle in json.loads(err.value.body)["message"]


def test_a_name_too_long_for_pod_names_is_rejected(custom, crd_installed, namespace):
    with pytest.raises(ApiException) as err:
        create(custom, namespace, minimal_job("x" * 49))
    assert "at most 48 characters" in json.loads(err.value.body)["message"]


@pytest.mark.parametrize(
    ("name", "workers", "needle"),
    [
        ("my.job", 1, "must be a DNS label"),
        ("My-Job", 1, "must be a DNS label"),
        ("7b-sql", 2, "must start with a letter"),
    ],
)
def test_names_the_pods_and_service_cannot_carry_are_rejected(
    custom, crd_installed, namespace, name, workers, needle
):
    with pytest.raises(ApiException) as err:
        create(custom, namespace, minimal_job(name, workers=workers))
    assert needle in json.loads(err.value.body)["message"]
    create(custom, namespace, minimal_job("7b-sql-single"))  # a digit first is fine with one worker


@pytest.mark.parametrize("field", ["model", "dataset", "lora", "quantization", "method"])
def test_what_makes_the_run_cannot_change_but_training_settings_can(custom, crd_installed, namespace, field):
    create(custom, namespace, minimal_job("fixed"))
    change = {
        "model": {"name": "other/model"},
        "dataset": {"uri": "s3://other/data/"},
        "lora": {"r": 4},
        "quantization": {"type": "fp4"},
        "method": "lora",
    }[field]
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {field: change}}
        )
    assert err.value.status == 422
    assert f"spec.{field} cannot change once the job exists" in json.loads(err.value.body)["message"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {"training": {"maxSteps": 77}}}
    )
    assert get(custom, namespace, "fixed")["spec"]["training"]["maxSteps"] == 77


def warnings(core, namespace: str, name: str, reason: str) -> list[str]:
    return [
        e.message
        for e in core.list_namespaced_event(namespace).items
        if e.involved_object.name == name and e.reason == reason and e.type == "Warning"
    ]


def test_a_refused_pod_create_is_shown_backed_off_and_retried_until_it_passes(
    operator, core, custom, namespace
):
    # a ServiceAccount that does not exist yet: the API server refuses the pods (403)
    create(custom, namespace, minimal_job("no-sa", podOverrides={"serviceAccountName": "trainer"}))
    st = wait_for(
        lambda: (s := status(custom, namespace, "no-sa")).get("reason") == "FailedCreate" and s,
        30,
        "a FailedCreate status",
    )
    assert st["phase"] == "Pending" and 'serviceaccount "trainer" not found' in st["message"]
    assert condition(st, "PodsCreated")["status"] == "False"
    wait_for(lambda: warnings(core, namespace, "no-sa", "FailedCreate"), 30, "a FailedCreate Event")
    assert not job_pods(core, namespace, "no-sa")
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "trainer"}})
    st = wait_phase(custom, namespace, "no-sa", "Running", timeout_s=60)
    assert condition(st, "PodsCreated")["status"] == "True" and st["attempt"] == 1
    assert [p.metadata.name for p in job_pods(core, namespace, "no-sa")] == ["no-sa-a1-w0"]


def lookalike_pod(job: str, name: str, rank: int = 0) -> dict:
    """A pod with a job's labels that the job did not make (no ownerReference), gated so
    that nothing runs it."""
    return {
        "metadata": {
            "name": name,
            "labels": {"kubetune.io/job": job, "kubetune.io/attempt": "1", "kubetune.io/rank": str(rank)},
        },
        "spec": {
            "schedulingGates": [{"name": "example.com/never"}],
            "containers": [{"name": "trainer", "image": "registry.invalid/none"}],
        },
    }


def test_a_pod_with_a_jobs_labels_that_the_job_did_not_make_counts_for_nothing(
    operator, core, custom, namespace
):
    create(custom, namespace, minimal_job("victim"))
    wait_phase(custom, namespace, "victim", "Running")
    core.create_namespaced_pod(namespace, lookalike_pod("victim", "victim-forged"))
    # a forged result: rank 0 of attempt 1 ended with a configuration error
    report_trainer_exit(
        core, namespace, "victim-forged", "Failed", {"exitCode": 65, "reason": "Error", "message": "forged"}
    )
    # the real pod's deletion comes after the forged status in the same pod watch: once the
    # operator has acted on it, it has seen the forgery too
    core.delete_namespaced_pod("victim-a1-w0", namespace, grace_period_seconds=0)
    st = wait_for(
        lambda: (
            (s := status(custom, namespace, "victim")).get("attempt") == 2
            and s.get("phase") == "Running"
            and s
        ),
        60,
        "the job to resume as attempt 2",
    )
    assert st["preemptions"] == 1 and st["failures"] == 0, st
    assert "forged" not in json.dumps(st)


def test_a_pod_squatting_a_jobs_pod_name_is_reported_and_the_job_starts_once_it_is_gone(
    operator, core, custom, namespace
):
    core.create_namespaced_pod(namespace, lookalike_pod("squat", "squat-a1-w0"))
    create(custom, namespace, minimal_job("squat"))
    st = wait_for(
        lambda: (s := status(custom, namespace, "squat")).get("reason") == "FailedCreate" and s,
        30,
        "a FailedCreate status",
    )
    assert "Pod squat-a1-w0 already exists and was not made by this job" in st["message"], st
    # at once: each refusal doubles the wait before the next try
    core.delete_namespaced_pod("squat-a1-w0", namespace, grace_period_seconds=0)
    st = wait_phase(custom, namespace, "squat", "Running", timeout_s=60)
    assert warnings(core, namespace, "squat", "FailedCreate")
    pod = core.read_namespaced_pod("squat-a1-w0", namespace)
    assert pod.metadata.owner_references[0].uid == get(custom, namespace, "squat")["metadata"]["uid"]


def test_deleting_a_finished_job_spares_a_job_recreated_under_its_name(
    api_client, custom, crd_installed, namespace
):
    """ttlSecondsAfterFinished deletes the job the operator saw finish (a UID
    precondition), never a new job that took its name meanwhile."""
    from kubetune.kube import Kube

    old = create(custom, namespace, minimal_job("reused"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "reused")
    wait_for(
        lambda: (
            not [j for j in list_jobs(custom, namespace) if j["metadata"]["uid"] == old["metadata"]["uid"]]
        ),
        30,
        "the old job to go",
    )
    new = create(custom, namespace, minimal_job("reused"))
    kube = Kube(api_client)
    kube.delete_job(namespace, "reused", old["metadata"]["uid"])
    assert get(custom, namespace, "reused")["metadata"]["uid"] == new["metadata"]["uid"]
    kube.delete_job(namespace, "reused", new["metadata"]["uid"])
    wait_for(lambda: not list_jobs(custom, namespace), 30, "the new job to be deleted by its own UID")


def list_jobs(custom, namespace: str) -> list[dict]:
    return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]


def test_pods_the_api_server_finds_invalid_fail_the_job_as_an_invalid_spec(operator, core, custom, namespace):
    # not seen by the schema: a node selector key Kubernetes does not accept
    create(custom, namespace, minimal_job("bad-selector", podOverrides={"nodeSelector": {"bad key!": "x"}}))
    st = wait_phase(custom, namespace, "bad-selector", "Failed")
    assert st["reason"] == "InvalidSpec" and "spec.nodeSelector" in st["message"], st
    wait_for(lambda: warnings(core, namespace, "bad-selector", "FailedCreate"), 30, "a FailedCreate Event")
    assert not job_pods(core, namespace, "bad-selector")


def test_a_missing_secret_fails_the_job_with_a_clear_message(operator, custom, namespace):
    job = minimal_job(
        "no-secret",
        resources={"accelerator": "cpu", "cpu": "1", "memory": "1Gi"},
        storage={"secretRef": {"name": "does-not-exist"}},
        podOverrides=RUNNER_OVERRIDES,
    )
    create(custom, namespace, job)
    st = wait_for(
        lambda: (s := status(custom, namespace, "no-secret")).get("reason") == "WaitingForConfig" and s,
        60,
        "the job to wait for its Secret",
    )
    assert 'secret "does-not-exist" not found' in st["message"] and st["phase"] == "Pending"
    st = wait_phase(custom, namespace, "no-secret", "Failed", timeout_s=90)  # after the 60 s grace
    assert st["reason"] == "InvalidSpec"
    assert 'secret "does-not-exist" not found' in st["message"]
    assert condition(st, "Failed")["status"] == "True"


def test_a_secret_created_a_little_after_the_job_is_waited_for(
    operator, core, custom, namespace, dev_cluster
):
    job = minimal_job(
        "late-secret",
        resources={"accelerator": "cpu", "cpu": "1", "memory": "1Gi"},
        storage={"secretRef": {"name": "made-later"}, "endpoint": dev_cluster.endpoints.s3},
        podOverrides=RUNNER_OVERRIDES,
    )
    create(custom, namespace, job)
    wait_for(
        lambda: status(custom, namespace, "late-secret").get("reason") == "WaitingForConfig",
        60,
        "the job to wait for its Secret",
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "made-later"},
            "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
        },
    )
    st = wait_phase(custom, namespace, "late-secret", "Running", timeout_s=90)
    assert st["attempt"] == 1 and st["failures"] == 0


RUNNER_OVERRIDES = {
    "nodeSelector": {RUNNER_LABEL: "true"},
    "tolerations": [{"key": RUNNER_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}


# -- lifecycle -------------------------------------------------------------------------------


def test_deleting_a_job_removes_its_pods_service_and_network_policy(
    operator, core, custom, namespace, api_client
):
    from kubernetes import client

    net = client.NetworkingV1Api(api_client)
    create(custom, namespace, load("multi-worker.yaml"))
    pods = scheduled_pods(core, namespace, "codellama-2x8", 2)
    wait_for(lambda: core.read_namespaced_service("codellama-2x8", namespace), 30, "the headless service")
    # who may reach the trainers: the job's own pods, and the operator on the progress port
    policy = net.read_namespaced_network_policy("kubetune-codellama-2x8", namespace)
    selector = policy.spec.pod_selector.match_labels
    assert all(selector.items() <= p.metadata.labels.items() for p in pods)
    own, operator_rule = policy.spec.ingress
    assert own._from[0].pod_selector.match_labels == selector and not own.ports
    assert [p.port for p in operator_rule.ports] == [9090]
    assert operator_rule._from[0].namespace_selector.match_labels == {
        "kubernetes.io/metadata.name": "kubetune-system"
    }
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "codellama-2x8")
    wait_for(lambda: not job_pods(core, namespace, "codellama-2x8"), 60, "the pods to be collected")
    wait_for(lambda: not core.list_namespaced_service(namespace).items, 60, "the service to be collected")
    wait_for(
        lambda: not net.list_namespaced_network_policy(namespace).items, 60, "the policy to be collected"
    )


def test_suspend_stops_pods_and_resume_starts_a_new_attempt(operator, core, custom, namespace):
    create(custom, namespace, minimal_job("pausable"))
    wait_phase(custom, namespace, "pausable", "Running")
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pausable", {"spec": {"suspend": True}}
    )
    st = wait_phase(custom, namespace, "pausable", "Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    wait_for(
        lambda: not [p for p in job_pods(core, namespace, "pausable") if not p.metadata.deletion_timestamp],
        30,
        "the pods to be deleted",
    )
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pausable", {"spec": {"suspend": False}}
    )
    st = wait_phase(custom, namespace, "pausable", "Running")
    assert st["attempt"] == 2 and st["preemptions"] == 0 and st["failures"] == 0
    assert [p.metadata.name for p in job_pods(core, namespace, "pausable")] == ["pausable-a2-w0"]


def test_active_deadline_fails_the_job_and_ttl_deletes_it(operator, core, custom, namespace):
    create(custom, namespace, minimal_job("short", activeDeadlineSeconds=3, ttlSecondsAfterFinished=3))
    st = wait_phase(custom, namespace, "short", "Failed", timeout_s=30)
    assert st["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: not [p for p in job_pods(core, namespace, "short") if not p.metadata.deletion_timestamp],
        30,
        "the pods to be deleted",
    )

    def job_gone():
        try:
            get(custom, namespace, "short")
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(job_gone, 30, "ttlSecondsAfterFinished to delete the job")


def test_application_failures_use_up_backoff_limit(operator, custom, core, namespace, s3, dev_cluster):
    """On runner nodes the trainer really runs; a model folder in S3 with a broken
    config.json makes it fail (exit 1, an application failure), twice. (Pods do not see
    the host's files: everything they read comes from the dev cluster's MinIO.)"""
    bucket = f"it-{namespace}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="broken-model/config.json", Body=b"{not json")
    s3.put_object(Bucket=bucket, Key="data/a.jsonl", Body=b'{"text": "hello"}\n')
    ep = dev_cluster.endpoints
    core.create_namespaced_secret(namespace, dev_cluster.s3_secret("s3"))
    job = minimal_job(
        "fails",
        backoffLimit=1,
        podOverrides=RUNNER_OVERRIDES,
        resources={"accelerator": "cpu", "cpu": "1", "memory": "1Gi"},
        model={"uri": f"s3://{bucket}/broken-model/"},
        dataset={"uri": f"s3://{bucket}/data/"},
        storage={"secretRef": {"name": "s3"}, "endpoint": ep.s3},
    )
    create(custom, namespace, job)
    st = wait_phase(custom, namespace, "fails", "Failed", timeout_s=180)
    assert st["reason"] == "BackoffLimitExceeded", st
    assert st["failures"] == 2 and st["preemptions"] == 0 and st["attempt"] == 2
    assert "fails-a2-w0" in st["message"]


def test_a_config_error_fails_at_once_without_retries(operator, custom, namespace):
    """Exit 65 (no data under the prefix) is permanent: one attempt, the trainer's message."""
    job = minimal_job(
        "nodata",
        backoffLimit=3,
        podOverrides=RUNNER_OVERRIDES,
        resources={"accelerator": "cpu", "cpu": "1", "memory": "1Gi"},
        dataset={"uri": "file:///nonexistent/kubetune-test-data/"},
    )
    create(custom, namespace, job)
    st = wait_phase(custom, namespace, "nodata", "Failed", timeout_s=120)
    assert st["attempt"] == 1 and st["failures"] <= 1
    assert "no .jsonl, .jsonl.gz, .jsonl.zst, .parquet shards under file:///nonexistent" in st["message"]


def test_events_and_kubectl_columns(operator, custom, core, namespace, dev_cluster):
    """A first attempt reaches Running without an Event (its status says it, and an Event
    is one more write per job); what the status later overwrites has one: a preemption,
    and the next attempt's start."""
    create(custom, namespace, minimal_job("visible"))
    st = wait_phase(custom, namespace, "visible", "Running")
    assert st["startTime"] and st["attemptStartTime"] and condition(st, "Running")["lastTransitionTime"]
    out = kubectl(dev_cluster, namespace, "get", "ftj").stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "PREEMPTIONS", "AGE"]
    assert row.split()[:5] == ["visible", "Running", "0/300", "(0%)", "0"]

    core.delete_namespaced_pod("visible-a1-w0", namespace, grace_period_seconds=0)  # its node reclaimed
    wait_for(
        lambda: (
            (s := status(custom, namespace, "visible")).get("attempt") == 2 and s.get("phase") == "Running"
        ),
        60,
        "attempt 2 Running",
    )

    def events():
        return sorted(
            (e.type, e.reason)
            for e in core.list_namespaced_event(namespace).items
            if e.involved_object.name == "visible" and e.involved_object.kind == "FineTuneJob"
        )

    # Events are posted from a rate-limited queue: wait for the second, then read them all
    seen = wait_for(lambda: len(events()) >= 2 and events(), 30, "the job's Events")
    assert seen == [("Normal", "Running"), ("Warning", "Preempted")], seen
    row = kubectl(dev_cluster, namespace, "get", "ftj").stdout.splitlines()[1]
    assert row.split()[:5] == ["visible", "Running", "0/300", "(0%)", "1"]


def test_operator_metrics(operator):
    wait_for(lambda: operator.alive(), 5, "the operator")
    body = wait_for(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=2)
            .read()
            .decode()
        ),
        30,
        "/metrics",
    )
    for name in (
        "kubetune_jobs",
        "kubetune_reconcile_seconds_bucket",
        "kubetune_job_pods_created_seconds",
        "kubetune_pod_losses_total",
    ):
        assert name in body


def test_spec_edits_are_reconciled_without_duplicate_pods(operator, core, custom, namespace):
    job = minimal_job("edited")
    create(custom, namespace, job)
    wait_phase(custom, namespace, "edited", "Running")
    for i in range(5):
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "edited", {"metadata": {"labels": {"touch": str(i)}}}
        )
    st = wait_for(
        lambda: (s := status(custom, namespace, "edited")).get("observedGeneration") and s, 10, "status"
    )
    assert [p.metadata.name for p in job_pods(core, namespace, "edited")] == ["edited-a1-w0"]
    assert st["attempt"] == 1
    assert copy.deepcopy(st) == status(custom, namespace, "edited")
