"""Pure builders: a FineTuneJob (and the attempt being started) -> the objects the
operator creates. No I/O; names are deterministic so creation is idempotent."""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

from kubetune import __version__
from kubetune.api import GROUP, KIND, VERSION, Accelerator, FineTuneJobSpec
from kubetune.gang import GANG_GATE
from kubetune.placement import place
from kubetune_trainer.config import CONFIG_ENV, TrainingConfig
from kubetune_trainer.contract import CONTROL_TOKEN_ENV, STANDBY_ENV

JOB_LABEL = f"{GROUP}/job"
ATTEMPT_LABEL = f"{GROUP}/attempt"
RANK_LABEL = f"{GROUP}/rank"
PROGRESS_PORT = 9090
# Trainer image per backend (trainer_image/Dockerfile.*); the chart sets the env vars.
TRAINER_IMAGES = {
    "cuda": f"ghcr.io/kubetune/trainer-cuda:{__version__}",
    "xpu": f"ghcr.io/kubetune/trainer-xpu:{__version__}",
    # the seed notebooks' stack: its CPU build (PyPI's IPEX) and its Intel GPU build
    "ipex-llm": f"ghcr.io/kubetune/trainer-ipex-llm:{__version__}",
    "ipex-llm-xpu": f"ghcr.io/kubetune/trainer-ipex-llm-xpu:{__version__}",
    # the CUDA image runs the cpu backend too (KUBETUNE_BACKEND=cpu in the pod): one image
    # for NVIDIA and CPU pools, the one the dev cluster runs
    "cpu": f"ghcr.io/kubetune/trainer-cuda:{__version__}",
}
TRAINER_IMAGE_ENV = "KUBETUNE_TRAINER_IMAGE_"  # + CUDA, XPU, IPEX_LLM, IPEX_LLM_XPU, CPU
# set in ipex-llm pods on Intel GPUs: the trainer refuses to fall back to the CPU there
REQUIRE_XPU_ENV = "KUBETUNE_REQUIRE_XPU"


def pod_group_name(job: str, attempt: int) -> str:
    """An attempt's Kueue pod group, which is also its Workload's name."""
    return f"{job}-a{attempt}"


def image_backend(res) -> str:
    """Which trainer image a job's pods run: its accelerator's, and on Intel GPUs or CPUs
    the ipex-llm one where resources.intelStack asks for it: its Intel GPU build on GPUs,
    its CPU build (PyPI's IPEX, ipex-llm's CPU kernels) on a CPU pool."""
    if res.accelerator == Accelerator.nvidia.value:
        return "cuda"
    on_cpu = res.accelerator == Accelerator.cpu.value
    if res.intel_stack == "ipex-llm":
        return "ipex-llm" if on_cpu else "ipex-llm-xpu"
    return "cpu" if on_cpu else res.intel_stack


def trainer_image(spec: FineTuneJobSpec, environ=os.environ) -> str:
    """podOverrides.image, else the image of the job's backend as the operator was
    configured (KUBETUNE_TRAINER_IMAGE_<BACKEND>), else the default of this version."""
    if spec.pod_overrides.image:
        return spec.pod_overrides.image
    backend = image_backend(spec.resources)
    return environ.get(TRAINER_IMAGE_ENV + backend.upper().replace("-", "_")) or TRAINER_IMAGES[backend]


# Where the Secret's keys go in the trainer's environment (boto3's own names).
# the trainer images' user (trainer_image/Dockerfile.*)
TRAINER_UID = 10001
SECRET_ENV = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))


def master_port(uid: str) -> int:
    """The rendezvous port of a job: fixed per job, and different between jobs, so that
    workers sharing a network namespace (hostNetwork pods for RDMA, the dev cluster's pod
    runner) never collide. Below the Linux ephemeral range (32768+)."""
    return 20000 + zlib.crc32(uid.encode()) % 10000


def master_addr(job: str) -> str:
    """Worker 0's name through the job's headless Service (hostname w0, subdomain <job>);
    the pods' DNS search path adds <namespace>.svc.<cluster domain>."""
    return f"w0.{job}"


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}-w{rank}"


def owner_reference(name: str, uid: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_uid(obj: dict) -> str | None:
    """The UID of the FineTuneJob that controls obj (its controller ownerReference), or
    None. Labels say which job a pod claims to belong to; only this says which job made it
    (anyone who can create pods in the namespace can copy the labels)."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == KIND
            and ref.get("apiVersion") == f"{GROUP}/{VERSION}"
        ):
            return ref.get("uid")
    return None


def selector_labels(job: str) -> dict[str, str]:
    return {JOB_LABEL: job}


def training_config_json(spec: FineTuneJobSpec) -> str:
    """The training part of the spec, as the trainer reads it (kubetune_trainer.config)."""
    config = spec.model_dump(
        mode="json", by_alias=True, exclude_none=True, include=set(TrainingConfig.model_fields)
    )
    return json.dumps(config, sort_keys=True)


def trainer_env(spec: FineTuneJobSpec, job: str, attempt: int, rank: int, uid: str = "") -> list[dict]:
    env = [
        {"name": CONFIG_ENV, "value": training_config_json(spec)},
        {"name": "KUBETUNE_JOB", "value": job},
        {"name": "KUBETUNE_JOB_UID", "value": uid},
        {"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETUNE_RANK", "value": str(rank)},
        {"name": "KUBETUNE_WORKERS", "value": str(spec.workers)},
        {"name": "KUBETUNE_PROCS_PER_WORKER", "value": str(max(spec.resources.gpus, 1))},
        {"name": "KUBETUNE_PROGRESS_PORT", "value": str(PROGRESS_PORT)},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "AWS_REGION", "value": spec.storage.region},
        # torch sizes its thread pool by the node's cores, not the pod's share: two CPU
        # trainers on one node then run 2x the threads the cores can take, and OpenMP's
        # spinning makes that ~10x slower (measured on the dev cluster). The pod's CPU
        # request, rounded up to whole cores, is its share (launch divides it per process).
        {
            "name": "OMP_NUM_THREADS",
            "valueFrom": {"resourceFieldRef": {"containerName": "trainer", "resource": "requests.cpu"}},
        },
    ]
    procs = max(spec.resources.gpus, 1)
    if spec.workers * procs > 1:
        # torchrun's static rendezvous: rank from the pod index, worker 0 hosts the store
        env += [
            {"name": "MASTER_ADDR", "value": master_addr(job)},
            {"name": "MASTER_PORT", "value": str(master_port(uid))},
        ]
    if procs == 1:
        # one process per pod is the trainer itself, with the environment torchrun would give
        env += [
            {"name": "RANK", "value": str(rank)},
            {"name": "WORLD_SIZE", "value": str(spec.workers)},
            {"name": "LOCAL_RANK", "value": "0"},
            {"name": "LOCAL_WORLD_SIZE", "value": "1"},
        ]
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    if spec.storage.secret_ref:
        # credentials only by reference: their values never enter the pod spec or status
        secret = spec.storage.secret_ref.name
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
            for key, optional in SECRET_ENV
        ]
    if spec.model.uri:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if spec.resources.accelerator == Accelerator.cpu.value:
        # the image's own backend is its accelerator's; a CPU pool runs the cpu one, or
        # ipex-llm's CPU path in the ipex-llm image
        backend = "ipex-llm" if spec.resources.intel_stack == "ipex-llm" else "cpu"
        env.append({"name": "KUBETUNE_BACKEND", "value": backend})
    elif spec.resources.accelerator == Accelerator.intel.value and spec.resources.intel_stack == "ipex-llm":
        env.append({"name": REQUIRE_XPU_ENV, "value": "1"})
    return env


def build_pod(
    name: str,
    uid: str,
    spec: FineTuneJobSpec,
    attempt: int,
    rank: int,
    preemptions: int,
    avoid_nodes=(),
    last_seen_step: int | None = None,
    standby: bool = False,
) -> dict:
    """Worker `rank` of attempt `attempt` of job `name`. last_seen_step: the highest step
    the operator saw the earlier attempts reach (for the trainer's goodput ledger);
    standby: made while the attempt before still runs, it loads and waits for POST /start."""
    placement = place(spec, preemptions, avoid_nodes)
    overrides = spec.pod_overrides
    labels = {
        **overrides.labels,
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "kubetune",
        JOB_LABEL: name,
        ATTEMPT_LABEL: str(attempt),
        RANK_LABEL: str(rank),
    }
    container = {
        "name": "trainer",
        "image": trainer_image(spec),
        # several processes (one per GPU): kubetune_trainer.launch starts them
        "command": [
            "python",
            "-m",
            "kubetune_trainer" if spec.resources.gpus <= 1 else "kubetune_trainer.launch",
        ],
        "env": trainer_env(spec, name, attempt, rank, uid)
        + ([{"name": "KUBETUNE_LAST_SEEN_STEP", "value": str(last_seen_step)}] if last_seen_step else [])
        + ([{"name": STANDBY_ENV, "value": "1"}] if standby else []),
        "ports": [{"name": "metrics", "containerPort": PROGRESS_PORT, "protocol": "TCP"}],
        "resources": {"requests": placement.requests, "limits": placement.limits},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/cache"}],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "hostname": f"w{rank}",
        "subdomain": name,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
        "tolerations": placement.tolerations,
    }
    if placement.node_selector:
        pod_spec["nodeSelector"] = placement.node_selector
    affinity = placement.affinity()
    if affinity:
        pod_spec["affinity"] = affinity
    if overrides.service_account_name:
        pod_spec["serviceAccountName"] = overrides.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False  # the trainer never calls the API
    if overrides.priority_class_name:
        pod_spec["priorityClassName"] = overrides.priority_class_name
    metadata = {
        "name": pod_name(name, attempt, rank),
        "labels": labels,
        "annotations": dict(overrides.annotations),
        "ownerReferences": [owner_reference(name, uid)],
    }
    if spec.queue_name:
        # Kueue plain pod groups: Kueue gates the pods itself and admits all or none
        labels["kueue.x-k8s.io/queue-name"] = spec.queue_name
        labels["kueue.x-k8s.io/pod-group-name"] = pod_group_name(name, attempt)
        metadata["annotations"]["kueue.x-k8s.io/pod-group-total-count"] = str(spec.workers)
        # an attempt is never retried in its group (a lost worker ends it; the next attempt
        # is a new group): once no pod of it runs, Kueue finishes its Workload and frees the
        # quota, rather than holding it for replacement pods that never come
        metadata["annotations"]["kueue.x-k8s.io/retriable-in-group"] = "false"
    elif spec.workers > 1:
        # no worker is scheduled (and holds a GPU) until the operator finds room for all
        pod_spec["schedulingGates"] = [{"name": GANG_GATE}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


@dataclass(frozen=True)
class Attempt:
    """What one attempt of a job is made of: its worker pods, and the headless Service
    their rendezvous needs when there is more than one worker."""

    pods: list[dict]
    service: dict | None

    def objects(self) -> list[dict]:
        """In the order to create them: the Service before the pods that resolve it."""
        return ([self.service] if self.service else []) + self.pods


def build_attempt(
    name: str,
    uid: str,
    spec: FineTuneJobSpec,
    attempt: int,
    preemptions: int,
    avoid_nodes=(),
    last_seen_step: int | None = None,
    standby: bool = False,
) -> Attempt:
    """Attempt `attempt` of job `name` (see build_pod for the arguments); the operator's
    reconcile and `kubetune render` both build attempts with this."""
    pods = [
        build_pod(name, uid, spec, attempt, rank, preemptions, avoid_nodes, last_seen_step, standby)
        for rank in range(spec.workers)
    ]
    return Attempt(pods, build_service(name, uid) if spec.workers > 1 else None)


def is_standby(pod: dict) -> bool:
    """Made as a standby (its trainer waits for POST /start once it has loaded)."""
    return any(
        e.get("name") == STANDBY_ENV and e.get("value") == "1"
        for c in (pod.get("spec") or {}).get("containers") or []
        for e in c.get("env") or []
    )


def with_control_token(pod: dict, token: str) -> dict:
    """The pod with the bearer token its trainer takes checkpoint requests with (the
    operator reads it back from the pod when a notice comes)."""
    container = pod["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != CONTROL_TOKEN_ENV]
    container["env"].append({"name": CONTROL_TOKEN_ENV, "value": token})
    return pod


def control_token(pod: dict) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for e in container.get("env") or []:
            if e.get("name") == CONTROL_TOKEN_ENV and isinstance(e.get("value"), str):
                return e["value"]
    return None


def build_service(name: str, uid: str) -> dict:
    """Headless Service giving workers stable names w<rank>.<job> for the rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "kubetune", JOB_LABEL: name},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [{"name": "metrics", "port": PROGRESS_PORT, "targetPort": "metrics"}],
        },
    }


def build_network_policy(name: str, uid: str, operator: dict) -> dict:
    """Who may reach a job's trainer pods: each other (torch.distributed's ports, the
    rendezvous) and the operator, on the progress port only. `operator` says where the
    operator runs: {"namespace": ..., "podLabels": {...}} (the chart passes it)."""
    own = {"podSelector": {"matchLabels": selector_labels(name)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"kubetune-{name}",
            "labels": {"app.kubernetes.io/managed-by": "kubetune", JOB_LABEL: name},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": operator["namespace"]}
                            },
                            "podSelector": {"matchLabels": dict(operator.get("podLabels") or {})},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": PROGRESS_PORT}],
                },
            ],
        },
    }
