"""Kueue in the dev cluster, for real: the controller manager built from its Go module at
the pinned version (hack/kueue/go.mod, hack/build-tools.sh), its CRDs and webhooks from
that same module, the webhooks served on loopback with a certificate from the dev
cluster's CA (no cert-manager, no in-cluster Service: the API server dials 127.0.0.1).

Only the pod integration is on: kubetune's attempts are pod groups (the
`kueue.x-k8s.io/pod-group-name` label and `pod-group-total-count` annotation, set by
kubetune.manifests when a job names spec.queueName). The pod webhook sees only pods that
carry a queue name (an objectSelector), so the rest of the cluster never waits on Kueue.
PriorityBoost is on: kubetune annotates the Workloads with kubetune.kueue.priority_boost."""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import procs
from .certs import CertPaths, issue

QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
# the webhooks kept: the pod integration's and Kueue's own objects'; the other
# frameworks' (batch Jobs, JobSets, ...) are not served when they are off, and a webhook
# that is not served with failurePolicy Fail would refuse every such object
KEPT_RESOURCES = {
    "pods",
    "workloads",
    "clusterqueues",
    "localqueues",
    "resourceflavors",
    "cohorts",
    "workloadpriorityclasses",
    "admissionchecks",
    "topologies",
}
FEATURE_GATES = "PriorityBoost=true,VisibilityOnDemand=false"
CLUSTER_QUEUE = "kubetune"
API = ("kueue.x-k8s.io", "v1beta2")
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"


def controller_config(webhook_port: int, cert_dir: Path, health_port: int) -> dict:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for the dev cluster."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["pod"]},
        # the test namespaces; not Kueue's own or the system's
        "managedJobsNamespaceSelector": {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": ["kube-system", "kueue-system", "kubetune-system"],
                }
            ]
        },
    }


def webhook_configurations(manifests: str, url: str, ca_bundle: bytes) -> list[dict]:
    """Kueue's webhook configurations (config/components/webhook/manifests.yaml) pointed at
    `url` (its webhook server on loopback) instead of an in-cluster Service, trusting the
    dev CA, with only the webhooks of KEPT_RESOURCES; the pod webhook sees queue-named
    pods only."""
    out = []
    for doc in yaml.safe_load_all(manifests):
        if not doc:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"]["name"] = f"kueue-{doc['metadata']['name']}"
        kept = []
        for hook in doc.get("webhooks") or []:
            resources = {r for rule in hook.get("rules") or [] for r in rule.get("resources") or []}
            if not resources & KEPT_RESOURCES:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": url.rstrip("/") + path,
                "caBundle": base64.b64encode(ca_bundle).decode(),
            }
            if "pods" in resources:
                hook["objectSelector"] = {
                    "matchExpressions": [{"key": QUEUE_NAME_LABEL, "operator": "Exists"}]
                }
            kept.append(hook)
        doc["webhooks"] = kept
        out.append(doc)
    return out


def queue_objects(namespace: str, cpu: str, memory: str) -> list[dict]:
    """One ResourceFlavor, a ClusterQueue with cpu/memory quota that preempts lower
    priorities within itself, and a LocalQueue in `namespace` named like it."""
    return [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": "default-flavor"},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [
                            {
                                "name": "default-flavor",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": cpu},
                                    {"name": "memory", "nominalQuota": memory},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        local_queue(namespace),
    ]


def local_queue(namespace: str, name: str = CLUSTER_QUEUE) -> dict:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": CLUSTER_QUEUE},
    }


@dataclass
class Kueue:
    """A running Kueue controller manager of a dev cluster."""

    version: str
    webhook_url: str
    health_url: str


def serving_cert(ca: CertPaths, cert_dir: Path):
    """tls.crt/tls.key for 127.0.0.1, signed by the dev CA (controller-runtime's names)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kueue-webhook")])
    pair = issue(ca, cert_dir, "tls", subject, ExtendedKeyUsageOID.SERVER_AUTH, ips=("127.0.0.1",))
    return pair


def start(cluster, kueue_dir: Path, api_client) -> Kueue:
    """Install Kueue's CRDs and webhooks into `cluster` and start its controller manager
    (a process of the cluster: stopped with it). kueue_dir: hack/build-tools.sh's (the
    binary, and the module's crds/ and webhook manifests.yaml beside it). Returns once a
    webhook call goes through."""
    from kubernetes import client, utils

    w = cluster.workdir / "kueue"
    w.mkdir(parents=True, exist_ok=True)
    ext = client.ApiextensionsV1Api(api_client)
    for crd_file in sorted((kueue_dir / "crds").glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except client.ApiException as e:
            if e.status != 409:
                raise
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in (kueue_dir / "crds").glob("*.yaml")]

    def established() -> bool:
        for name in names:
            conds = (ext.read_custom_resource_definition(name).status.conditions) or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    cluster._wait(established, "Kueue's CRDs established", timeout_s=60)
    cert_dir = w / "certs"
    serving_cert(cluster.certs, cert_dir)
    webhook_port, health_port = procs.free_port(), procs.free_port()
    config_path = w / "config.yaml"
    config_path.write_text(yaml.safe_dump(controller_config(webhook_port, cert_dir, health_port)))
    cluster._spawn(
        "kueue",
        # Kueue reads its metrics certificate from a fixed path when it does not make its
        # own (main.go), even with metrics off: a private mount namespace binds ours
        # there, as the kubelet nodes do with their fixed paths
        procs.in_private_mount_namespace(
            'mkdir -p "$2" && mount --bind "$1" "$2" && shift 2 && exec "$@"',
            "kueue",
            str(cert_dir),
            METRICS_CERT_DIR,
            str(kueue_dir / "kueue"),
            f"--config={config_path}",
            f"--feature-gates={FEATURE_GATES}",
            f"--kubeconfig={cluster.endpoints.kubeconfig}",
            "--zap-log-level=2",
        ),
    )
    kueue = Kueue(
        kueue_dir.name.removeprefix("kueue-"),
        f"https://127.0.0.1:{webhook_port}",
        f"http://127.0.0.1:{health_port}/readyz",
    )
    from .tools import http_ok

    cluster._wait(lambda: http_ok(kueue.health_url), "kueue /readyz", timeout_s=90)
    manifests = (kueue_dir / "webhook-manifests.yaml").read_text()
    for doc in webhook_configurations(manifests, kueue.webhook_url, cluster.certs.ca_cert.read_bytes()):
        utils.create_from_dict(api_client, doc)
    # the webhooks answer (the CRDs are served and Kueue's server has its certificate): a
    # dry-run of a ResourceFlavor goes through Kueue's defaulting webhook
    custom = client.CustomObjectsApi(api_client)

    def webhook_answers() -> bool:
        try:
            custom.create_cluster_custom_object(
                "kueue.x-k8s.io",
                "v1beta2",
                "resourceflavors",
                {
                    "apiVersion": "kueue.x-k8s.io/v1beta2",
                    "kind": "ResourceFlavor",
                    "metadata": {"name": "probe"},
                },
                dry_run="All",
            )
            return True
        except client.ApiException:
            return False

    cluster._wait(webhook_answers, "kueue webhooks", timeout_s=60)
    return kueue
