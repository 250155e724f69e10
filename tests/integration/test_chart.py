"""The Helm chart: lint, render with default and non-default values, validate every
manifest against the Kubernetes 1.34 schemas, check the RBAC rules and the Deployment;
then install it into the dev cluster with the operator image: the operator runs as the
chart's pod under a real kubelet (its ServiceAccount token, probes and read-only root
filesystem), its RBAC is enough to take a job to Succeeded, and Secrets stay out of reach."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kubetune.api import ADAPTER_PLURAL, GROUP, PLURAL, VERSION
from kubetune.gang import CAPACITY_NAMESPACES_ENV, capacity_scope
from kubetune.policy import Policy, violations
from kubetune_dev.crd import ADAPTER_CRD_FILE, CRD_FILE
from kubetune_dev.devcluster.tools import REPO_ROOT, tool_binary
from tests.helpers import install_crd, make_namespace, wait_for

CHART = REPO_ROOT / "charts" / "kubetune"
K8S_VERSION = "1.34.4"
RELEASE_NS = "kubetune-system"
CRD_NAME = f"{PLURAL}.{GROUP}"
ADAPTER_CRD_NAME = f"{ADAPTER_PLURAL}.{GROUP}"
DIGEST = "sha256:" + "ab" * 32

# Value sets the chart must render (and lint, and validate) with.
VALUES = {
    "default": {},
    "namespaced-ha": {
        "replicaCount": 3,
        "watch": {"namespaces": ["team-a", "team-b"]},
        "image": {"digest": DIGEST, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "ghcr"}],
        "trainerImages": {"cuda": {"tag": "0.2.0"}, "ipexLlm": {"digest": DIGEST}},
        "operator": {"workers": 16, "verbose": True, "extraArgs": ["--progress-interval=5"]},
        "metrics": {
            "serviceMonitor": {"enabled": True, "scrapeTimeout": "10s", "labels": {"release": "prom"}}
        },
        "podAnnotations": {"example.com/team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    },
    "cluster-wide-ha": {"replicaCount": 2},
    "namespaced-own-capacity": {"watch": {"namespaces": ["team-a"]}, "gang": {"capacityView": "namespaces"}},
    "bare": {
        "crds": {"enabled": False},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "kubetune"},
        "metrics": {"service": {"enabled": False}},
        "fullnameOverride": "ops",
    },
}

# What the operator may do in a namespace it watches: (group, resource, verb).
NAMESPACED = {
    *((GROUP, "finetunejobs", v) for v in ("get", "list", "watch", "patch", "delete")),
    *((GROUP, "finetunejobs/status", v) for v in ("get", "patch", "update")),
    (GROUP, "finetunejobs/finalizers", "update"),
    *((GROUP, "adapters", v) for v in ("get", "create")),
    *(("", "pods", v) for v in ("get", "list", "watch", "create", "delete", "patch")),
    *(("", "services", v) for v in ("get", "create", "delete")),
    *((g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")),
    *(("networking.k8s.io", "networkpolicies", v) for v in ("create", "get")),
    ("kueue.x-k8s.io", "workloads", "patch"),
}
NODES = {("", "nodes", v) for v in ("get", "list", "watch")}
# Leader election (replicaCount > 1): the release's Lease, in the release namespace only.
LEASE = {("coordination.k8s.io", "leases", "create")} | {
    ("coordination.k8s.io", "leases", v, ("kt-kubetune",)) for v in ("get", "update")
}
NEVER = {"secrets", "configmaps", "serviceaccounts", "roles", "rolebindings", "clusterroles", "*"}


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
    return subprocess.run(
        [str(tool_binary("helm")), *args], capture_output=True, text=True, check=check, env=env
    )


def values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def render(tmp_path: Path, values: dict) -> list[dict]:
    out = helm(
        "template", "kt", str(CHART), "-n", RELEASE_NS, "--kube-version", K8S_VERSION,
        "-f", values_file(tmp_path, values),
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def grants(rules: list[dict]) -> set[tuple]:
    """RBAC rules -> (group, resource, verb) triples; a rule limited to resourceNames adds
    the names as a fourth element."""
    out = set()
    for r in rules:
        names = tuple(sorted(r.get("resourceNames", [])))
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v, names) if names else (g, res, v))
    return out


def container(docs: list[dict]) -> dict:
    (deployment,) = by_kind(docs, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


# -- rendering, no cluster ------------------------------------------------------------


@pytest.mark.tools
def test_renders_offline_as_users_first_meet_it():
    """`helm template` with no cluster and no --kube-version (helm then assumes 1.20): the
    1.30 minimum is checked against a cluster at install time, not against that guess."""
    out = helm("template", "kt", str(CHART), check=False)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Deployment", "CustomResourceDefinition", "ServiceAccount"} <= kinds


@pytest.mark.tools
@pytest.mark.parametrize("name", sorted(VALUES))
def test_lints(name, tmp_path):
    out = helm("lint", "--strict", str(CHART), "-f", values_file(tmp_path, VALUES[name]), check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.tools
@pytest.mark.parametrize("name", sorted(VALUES))
def test_manifests_validate_against_kubernetes_1_34(name, tmp_path):
    docs = render(tmp_path, VALUES[name])
    for doc in docs:
        what = f"{doc['kind']} {doc['metadata']['name']}"
        assert doc["apiVersion"] != "kopf.dev/v1", f"{what}: kopf peering is gone (a Lease elects)"
        if doc["apiVersion"] == "monitoring.coreos.com/v1":  # no schema of the Prometheus operator's here
            assert doc["kind"] == "ServiceMonitor", what
        else:
            try:
                assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.34", what
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{what}: {e.message} at {'.'.join(map(str, e.path))}")


@pytest.mark.tools
@pytest.mark.parametrize(
    "values, error",
    [
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"replicaCount": 0}, "replicaCount"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"trainerImages": {"rocm": {"repository": "x"}}}, "rocm"),
        ({"watch": {"namespaces": ["Team_A"]}}, "namespaces"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, "needs"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
        ({"gang": {"capacityView": "tenants"}}, "capacityView"),
        # kopf peering's values are gone with it
        ({"peering": {"name": "x"}}, "additional properties 'peering' not allowed"),
        ({"crds": {"kopfPeering": False}}, "additional properties 'kopfPeering' not allowed"),
    ],
)
def test_bad_values_are_refused(values, error, tmp_path):
    out = helm(
        "template", "kt", str(CHART), "--kube-version", K8S_VERSION, "-f", values_file(tmp_path, values),
        check=False,
    )  # fmt: skip
    assert out.returncode != 0 and error in out.stderr, out.stderr


@pytest.mark.tools
def test_rbac_cluster_wide(tmp_path):
    docs = render(tmp_path, {})
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    (role,) = by_kind(docs, "ClusterRole")
    assert grants(role["rules"]) == NAMESPACED | NODES
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == f"{RELEASE_NS}-kt-kubetune"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": RELEASE_NS}]
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["metadata"] == {**sa["metadata"], "name": "kt-kubetune", "namespace": RELEASE_NS}

    # replicas > 1: the Lease, granted in the release namespace only (nothing cluster-wide)
    ha = render(tmp_path, {"replicaCount": 2})
    (role,) = by_kind(ha, "ClusterRole")
    assert grants(role["rules"]) == NAMESPACED | NODES
    assert_leader_election_role(ha)
    assert not any(d["apiVersion"].startswith("kopf.dev") for d in ha)


def assert_leader_election_role(docs: list[dict]) -> None:
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["namespace"] == RELEASE_NS]
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == RELEASE_NS]
    assert role["metadata"]["name"] == "kt-kubetune-leader-election"
    assert grants(role["rules"]) == LEASE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "kt-kubetune-leader-election",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": RELEASE_NS}]


@pytest.mark.tools
def test_rbac_namespaced(tmp_path):
    docs = render(tmp_path, VALUES["namespaced-ha"])
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert grants(cluster_role["rules"]) == NODES | {("", "pods", "list")}
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b", RELEASE_NS}  # (3 replicas: the Lease)
    assert_leader_election_role(docs)
    for ns in ("team-a", "team-b"):
        role = roles[ns]
        assert grants(role["rules"]) == NAMESPACED, ns
        assert bindings[ns]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert bindings[ns]["subjects"][0]["namespace"] == RELEASE_NS


def operator_env(docs: list[dict]) -> dict:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


@pytest.mark.tools
def test_gang_capacity_view_namespaces_needs_no_cluster_wide_pod_list(tmp_path):
    """gang.capacityView: namespaces, in namespaced mode: no ClusterRole rule grants pods,
    and the operator counts only the watched namespaces' pods (listed under their Roles)."""
    namespaced = {"watch": {"namespaces": ["team-a", "team-b"]}}
    docs = render(tmp_path, {**namespaced, "gang": {"capacityView": "namespaces"}})
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert grants(cluster_role["rules"]) == NODES
    assert not [r for r in cluster_role["rules"] if {"pods", "*"} & set(r["resources"])]
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert ("", "pods", "list") in grants(role["rules"])
    assert capacity_scope(operator_env(docs)) == ["team-a", "team-b"]

    # the default (cluster): the pod list stays cluster-wide, and the operator uses it
    docs = render(tmp_path, namespaced)
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert grants(cluster_role["rules"]) == NODES | {("", "pods", "list")}
    assert CAPACITY_NAMESPACES_ENV not in operator_env(docs)
    assert capacity_scope(operator_env(docs)) is None

    # every namespace watched: the value changes nothing
    for view in ("cluster", "namespaces"):
        docs = render(tmp_path, {"gang": {"capacityView": view}})
        (cluster_role,) = by_kind(docs, "ClusterRole")
        assert grants(cluster_role["rules"]) == NAMESPACED | NODES, view
        assert CAPACITY_NAMESPACES_ENV not in operator_env(docs), view


@pytest.mark.tools
@pytest.mark.parametrize("name", sorted(VALUES))
def test_least_privilege(name, tmp_path):
    for role in by_kind(render(tmp_path, VALUES[name]), "ClusterRole") + by_kind(
        render(tmp_path, VALUES[name]), "Role"
    ):
        for rule in role["rules"]:
            assert not NEVER & set(rule["resources"]), rule
            assert "*" not in rule["verbs"] and "*" not in rule["apiGroups"], rule


@pytest.mark.tools
def test_no_rbac_objects_when_disabled(tmp_path):
    docs = render(tmp_path, VALUES["bare"])
    assert {d["kind"] for d in docs} == {"Deployment"}
    assert by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune"


@pytest.mark.tools
def test_deployment_defaults(tmp_path):
    docs = render(tmp_path, {})
    (deployment,) = by_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kt-kubetune"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(docs)
    assert c["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert c["args"] == [  # one replica: no leader election
        "--workers=8",
        "--progress-interval=10",
        "--metrics-port=8080",
        "--health-port=8081",
    ]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env == {
        "POD_NAME": None,  # from the pod's name: its identity in the leader-election Lease
        "KUBETUNE_TRAINER_IMAGE_CUDA": "ghcr.io/kubetune/trainer-cuda:0.1.0",
        "KUBETUNE_TRAINER_IMAGE_XPU": "ghcr.io/kubetune/trainer-xpu:0.1.0",
        "KUBETUNE_TRAINER_IMAGE_CPU": "ghcr.io/kubetune/trainer-cuda:0.1.0",
        "KUBETUNE_TRAINER_IMAGE_IPEX_LLM": "ghcr.io/kubetune/trainer-ipex-llm:0.1.0",
        "KUBETUNE_TRAINER_IMAGE_IPEX_LLM_XPU": "ghcr.io/kubetune/trainer-ipex-llm-xpu:0.1.0",
        "KUBETUNE_POLICY": env["KUBETUNE_POLICY"],
        "KUBETUNE_NETWORK_POLICY": env["KUBETUNE_NETWORK_POLICY"],
    }
    # each job's NetworkPolicy admits the operator's pods: this release's, by their labels
    where = json.loads(env["KUBETUNE_NETWORK_POLICY"])
    assert where["namespace"] == RELEASE_NS
    assert where["podLabels"] == spec["selector"]["matchLabels"]
    assert grants(
        by_kind(render(tmp_path, {"networkPolicy": {"enabled": False}}), "ClusterRole")[0]["rules"]
    ) == ({(g, r, v) for g, r, v in NAMESPACED if r != "networkpolicies"} | NODES)
    assert Policy.from_env({"KUBETUNE_POLICY": env["KUBETUNE_POLICY"]}) == Policy()  # unbounded by default
    # the metrics Service reaches the pods on their metrics port
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not by_kind(docs, "ServiceMonitor")


@pytest.mark.tools
def test_policy_values_reach_the_operator_and_bound_pod_overrides(tmp_path):
    values = {
        "policy": {
            "allowedImages": ["registry.example.com/ml/"],
            "allowedServiceAccounts": ["trainer"],
            "allowedPriorityClasses": ["batch-low"],
            "allowedTolerationKeys": ["nvidia.com/gpu"],
            "allowedLabelKeyPrefixes": ["team"],
            "allowedAnnotationKeyPrefixes": ["example.com/"],
        }
    }
    env = {e["name"]: e.get("value") for e in container(render(tmp_path, values))["env"]}
    policy = Policy.from_env({"KUBETUNE_POLICY": env["KUBETUNE_POLICY"]})
    inside = {
        "image": "registry.example.com/ml/trainer:1",
        "serviceAccountName": "trainer",
        "priorityClassName": "batch-low",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "labels": {"team": "nlp"},
        "annotations": {"example.com/owner": "me"},
    }
    assert violations({"podOverrides": inside}, policy) == []
    assert violations({}, policy) == []  # no overrides: the chart's own trainer images
    outside = {
        "image": "docker.io/evil/miner",
        "serviceAccountName": "admin",
        "priorityClassName": "system-cluster-critical",
        "tolerations": [{"operator": "Exists"}],
        "labels": {"app": "db-client"},
        "annotations": {"iam.amazonaws.com/role": "admin"},
    }
    found = violations({"podOverrides": outside}, policy)
    assert [f.split(":")[0] for f in found] == [
        "spec.podOverrides.image",
        "spec.podOverrides.serviceAccountName",
        "spec.podOverrides.priorityClassName",
        "spec.podOverrides.tolerations[0]",
        "spec.podOverrides.labels['app']",
        "spec.podOverrides.annotations['iam.amazonaws.com/role']",
    ]
    out = helm(
        "template", "kt", str(CHART), "--kube-version", K8S_VERSION,
        "-f", values_file(tmp_path, {"policy": {"allowedImages": "registry.example.com/"}}), check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "allowedImages" in out.stderr


@pytest.mark.tools
def test_cluster_wide_mode_protects_the_system_namespaces_from_the_operator(tmp_path):
    (policy,) = by_kind(render(tmp_path, {}), "ValidatingAdmissionPolicy")
    (binding,) = by_kind(render(tmp_path, {}), "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    (condition,) = policy["spec"]["matchConditions"]
    assert (
        condition["expression"]
        == "request.userInfo.username == 'system:serviceaccount:kubetune-system:kt-kubetune'"
    )
    (rule,) = policy["spec"]["validations"]
    assert rule["expression"] == "!(request.namespace in ['kube-system','kube-public','kube-node-lease'])"
    # namespaced mode grants nothing there to begin with
    assert not by_kind(render(tmp_path, {"watch": {"namespaces": ["team-a"]}}), "ValidatingAdmissionPolicy")
    assert not by_kind(render(tmp_path, {"rbac": {"protectedNamespaces": []}}), "ValidatingAdmissionPolicy")


@pytest.mark.tools
def test_deployment_non_default(tmp_path):
    docs = render(tmp_path, VALUES["namespaced-ha"])
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3 and "strategy" not in deployment["spec"]
    c = container(docs)
    assert c["image"] == f"ghcr.io/kubetune/operator@{DIGEST}" and c["imagePullPolicy"] == "Always"
    assert c["args"] == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--leader-elect",
        f"--leader-election-namespace={RELEASE_NS}",
        "--leader-election-id=kt-kubetune",
        "--workers=16",
        "--progress-interval=10",
        "--metrics-port=8080",
        "--health-port=8081",
        "--verbose",
        "--progress-interval=5",
    ]
    env = {e["name"]: e.get("value") for e in c["env"]}
    # the holder's identity in the Lease
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    assert env["KUBETUNE_TRAINER_IMAGE_CUDA"] == "ghcr.io/kubetune/trainer-cuda:0.2.0"
    assert env["KUBETUNE_TRAINER_IMAGE_IPEX_LLM"] == f"ghcr.io/kubetune/trainer-ipex-llm@{DIGEST}"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (service,) = by_kind(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prom"


# -- installed into the dev cluster ---------------------------------------------------


def token_kubeconfig(dev_cluster, core, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token), with
    the dev cluster's server and CA."""
    token = core.create_namespaced_service_account_token(
        service_account, namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    admin = yaml.safe_load(Path(dev_cluster.endpoints.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": service_account, "user": {"token": token}}],
                "contexts": [
                    {"name": "sa", "context": {"cluster": cluster["name"], "user": service_account}}
                ],
                "current-context": "sa",
            }
        )
    )
    path.chmod(0o600)
    return path


def can(
    api_client,
    sa: str,
    sa_ns: str,
    verb: str,
    resource: str,
    namespace: str = "",
    group: str = "",
    name: str = "",
) -> bool:
    """A SubjectAccessReview for the ServiceAccount, with the groups its token carries."""
    from kubernetes import client

    review = client.AuthorizationV1Api(api_client).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{sa_ns}:{sa}",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{sa_ns}",
                    "system:authenticated",
                ],
                "resourceAttributes": {
                    "verb": verb,
                    "resource": resource,
                    "group": group,
                    "namespace": namespace,
                    "name": name,
                },
            },
        }
    )
    return review.status.allowed


@contextlib.contextmanager
def installed(dev_cluster, api_client, core, release: str, values: dict, tmp_path: Path, adopt_crd: bool):
    """helm install into a fresh namespace; uninstall on exit. With adopt_crd, the
    session's FineTuneJob CRD is handed to the release (as an upgrade from a CRD
    applied by hand would be); the uninstall keeps it (resource-policy keep)."""
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    ns = f"kt-{uuid.uuid4().hex[:6]}"
    kubeconfig = dev_cluster.endpoints.kubeconfig
    if adopt_crd:
        for name in (CRD_NAME, ADAPTER_CRD_NAME):
            ext.patch_custom_resource_definition(
                name,
                {
                    "metadata": {
                        "labels": {"app.kubernetes.io/managed-by": "Helm"},
                        "annotations": {
                            "meta.helm.sh/release-name": release,
                            "meta.helm.sh/release-namespace": ns,
                        },
                    }
                },
            )
    out = helm(
        "install", release, str(CHART), "-n", ns, "--create-namespace", "--wait", "--timeout", "120s",
        "-f", values_file(tmp_path, values), kubeconfig=kubeconfig, check=False,
    )  # fmt: skip
    try:
        assert out.returncode == 0, out.stderr
        yield ns, out.stdout
    finally:
        helm("uninstall", release, "-n", ns, "--wait", kubeconfig=kubeconfig, check=False)
        core.delete_namespace(ns)
        if adopt_crd:
            # helm.sh/resource-policy: keep: the uninstall leaves the CRD, and every job, in place
            if out.returncode == 0:
                assert ext.read_custom_resource_definition(CRD_NAME).metadata.name == CRD_NAME
                assert ext.read_custom_resource_definition(ADAPTER_CRD_NAME).metadata.name == ADAPTER_CRD_NAME
            install_crd(api_client, CRD_FILE)  # replaced without helm's marks
            install_crd(api_client, ADAPTER_CRD_FILE)


def in_cluster_values(dev_cluster) -> dict:
    """Values that run the chart on the dev cluster's real nodes: its images by digest from
    the dev registry, the operator pods on the runner nodes (kubelets on containerd), and the
    API server's address. (The dev cluster has no kube-proxy: pods reach the API server at
    the bridge address, as operator.extraEnv tells the kubernetes client.)"""
    from urllib.parse import urlsplit

    from kubetune_dev.devcluster.nodes import GKE_SPOT_LABEL, RUNNER_LABEL

    def image(ref: str) -> dict:
        repository, digest = ref.split("@")
        return {"repository": repository, "digest": digest}

    api = urlsplit(dev_cluster.endpoints.api)
    images = dev_cluster.images
    return {
        "image": image(images.operator),
        "trainerImages": {"cuda": image(images.trainer), "cpu": image(images.trainer)},
        "nodeSelector": {RUNNER_LABEL: "true"},
        "tolerations": [
            {"key": RUNNER_LABEL, "operator": "Exists", "effect": "NoSchedule"},
            {"key": GKE_SPOT_LABEL, "operator": "Exists", "effect": "NoSchedule"},
        ],
        "operator": {
            "progressIntervalSeconds": 1,
            "extraEnv": [
                {"name": "KUBERNETES_SERVICE_HOST", "value": api.hostname},
                {"name": "KUBERNETES_SERVICE_PORT", "value": str(api.port)},
            ],
        },
    }


def operator_pods(core, ns: str) -> list:
    return core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/name=kubetune").items


def operator_logs(dev_cluster, core, ns: str):
    """All of the release's operator pods' output, kept by the dev cluster's nodes."""
    names = [p.metadata.name for p in operator_pods(core, ns)]
    return lambda: "\n".join(dev_cluster.pod_log(ns, name, "operator") for name in names)


def assert_runs_in_its_image_under_a_kubelet(core, ns: str, dev_cluster, replicas: int) -> None:
    from kubetune_dev.devcluster.nodes import RUNNER_LABEL

    pods = operator_pods(core, ns)
    assert len(pods) == replicas
    for pod in pods:
        node = core.read_node(pod.spec.node_name)
        assert node.metadata.labels.get(RUNNER_LABEL) == "true"
        assert node.status.node_info.container_runtime_version.startswith("containerd://")
        (status,) = pod.status.container_statuses
        assert status.ready and status.restart_count == 0
        assert status.image_id.endswith(dev_cluster.images.operator.split("@")[1])
        (c,) = pod.spec.containers
        assert c.security_context.read_only_root_filesystem and c.readiness_probe and c.liveness_probe
        assert pod.spec.service_account_name.endswith("kubetune")


@pytest.fixture
def session_operator_paused(operator):
    """The session's operator watches every namespace: stopped while the chart's runs,
    so that only the chart's credentials act; restarted after."""
    operator.stop()
    try:
        yield
    finally:
        operator.start()


@pytest.fixture(scope="module")
def tiny_job_inputs(s3, tmp_path_factory):
    """A tiny model and the shipped text-to-SQL data in the dev cluster's MinIO."""
    from kubetune_dev.devcluster.minio import upload_tree
    from tests.helpers import SQL_DATA, tiny_sql_llama

    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in ("chart-models", "chart-data", "chart-runs"):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
    upload_tree(s3, "chart-models", "tiny", tiny_sql_llama(tmp_path_factory.mktemp("chart-model") / "tiny"))
    upload_tree(s3, "chart-data", "sql", SQL_DATA)
    return "s3://chart-models/tiny/"


def tiny_job(name: str, namespace: str, model_uri: str, s3_endpoint: str) -> dict:
    """examples/quickstart.yaml as a user would apply it, pointed at this MinIO, with the
    tiny model in place of SmolLM2 and 6 steps (no generation): its RBAC needs are the same."""
    job = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    job["metadata"]["name"] = name
    spec = job["spec"]
    spec["model"] = {"uri": model_uri}
    spec["dataset"]["uri"] = "s3://chart-data/sql/train/"
    spec["dataset"]["validation"] = {"uri": "s3://chart-data/sql/eval/"}
    spec["training"]["maxSteps"] = 6
    spec["checkpoint"].update(uri=f"s3://chart-runs/{namespace}/{name}/ckpt/", everySteps=3)
    spec["output"]["uri"] = f"s3://chart-runs/{namespace}/{name}/out/"
    spec["storage"] = {"secretRef": {"name": "s3"}, "endpoint": s3_endpoint}
    return job


def status_of(custom, ns: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}


def wait_phase(custom, ns: str, name: str, phase: str, timeout_s: float, logs) -> dict:
    """The job's status once it reached `phase`; fails early when it failed, or when the
    operator was refused something (its RBAC is short): `logs()` is the operator's output."""

    def settled():
        st = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}
        if st.get("phase") in (phase, "Failed") or st.get("reason") == "FailedCreate":
            return st
        text = logs()
        if "Forbidden" in text or "forbidden" in text:
            return {"forbidden": text[-3000:]}
        return None

    try:
        st = wait_for(settled, timeout_s, f"{ns}/{name} to be {phase}", interval_s=1)
    except TimeoutError as e:
        raise AssertionError(
            f"{e}: status {status_of(custom, ns, name)}; operator log:\n{logs()[-3000:]}"
        ) from None
    assert st.get("phase") == phase, st
    return st


@pytest.mark.cluster
def test_installed_chart_namespaced_runs_a_job_with_its_service_account(
    dev_cluster, api_client, core, custom, s3, session_operator_paused, tiny_job_inputs, tmp_path
):
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    with make_namespace(core) as jobs_ns:
        # two replicas (leader election), namespaced
        values = {**in_cluster_values(dev_cluster), "watch": {"namespaces": [jobs_ns]}, "replicaCount": 2}
        with installed(dev_cluster, api_client, core, "kt", values, tmp_path, adopt_crd=True) as (ns, notes):
            assert "kubectl" in notes and "get ftj" in notes and jobs_ns in notes
            # everything the chart makes is there, and the Deployment is available
            apps = client.AppsV1Api(api_client)
            rbac = client.RbacAuthorizationV1Api(api_client)
            deployment = apps.read_namespaced_deployment("kt-kubetune", ns)
            assert deployment.status.available_replicas == 2  # its pods passed their probes
            core.read_namespaced_service_account("kt-kubetune", ns)
            core.read_namespaced_service("kt-kubetune-metrics", ns)
            rbac.read_cluster_role(f"{ns}-kt-kubetune")
            rbac.read_cluster_role_binding(f"{ns}-kt-kubetune")
            rbac.read_namespaced_role("kt-kubetune", jobs_ns)
            rbac.read_namespaced_role_binding("kt-kubetune", jobs_ns)
            rbac.read_namespaced_role("kt-kubetune-leader-election", ns)
            rbac.read_namespaced_role_binding("kt-kubetune-leader-election", ns)
            helm_crd = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(CRD_NAME)
            assert helm_crd.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"

            # what the ServiceAccount may and may not do
            def sa_can(verb, resource, namespace="", group="", name=""):
                return can(api_client, "kt-kubetune", ns, verb, resource, namespace, group, name)

            assert sa_can("create", "pods", jobs_ns) and sa_can("patch", "finetunejobs", jobs_ns, GROUP)
            assert sa_can("list", "nodes") and sa_can("list", "pods")
            for verb in ("get", "list", "watch"):
                assert not sa_can(verb, "secrets", jobs_ns), verb
                assert not sa_can(verb, "secrets", ns), verb
                assert not sa_can(verb, "configmaps", jobs_ns), verb
            assert not sa_can("create", "pods", "default") and not sa_can(
                "list", "finetunejobs", "default", GROUP
            )
            assert not sa_can("delete", "nodes") and not sa_can("get", "pods")  # cluster-wide: list only
            # its own Lease, in its own namespace, and no other
            assert sa_can("update", "leases", ns, "coordination.k8s.io", name="kt-kubetune")
            assert not sa_can("update", "leases", ns, "coordination.k8s.io", name="someone-else")
            assert not sa_can("update", "leases", jobs_ns, "coordination.k8s.io", name="kt-kubetune")
            assert not sa_can("list", "leases", "", "coordination.k8s.io")

            kubeconfig = token_kubeconfig(dev_cluster, core, ns, "kt-kubetune", tmp_path / "sa-kubeconfig")
            as_sa = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
            core.create_namespaced_secret(jobs_ns, dev_cluster.s3_secret("s3"))
            with pytest.raises(ApiException) as denied:
                as_sa.read_namespaced_secret("s3", jobs_ns)
            assert denied.value.status == 403
            with pytest.raises(ApiException) as denied:
                as_sa.list_secret_for_all_namespaces()
            assert denied.value.status == 403

            # the operator in its pods, with nothing but the ServiceAccount's token
            assert_runs_in_its_image_under_a_kubelet(core, ns, dev_cluster, replicas=2)
            logs = operator_logs(dev_cluster, core, ns)
            job = tiny_job("tiny", jobs_ns, tiny_job_inputs, dev_cluster.endpoints.s3)
            custom.create_namespaced_custom_object(GROUP, VERSION, jobs_ns, PLURAL, job)
            st = wait_phase(custom, jobs_ns, "tiny", "Succeeded", 420, logs)
            # one pod holds the release's Lease (its name, POD_NAME, in the identity), the
            # other stands by: both passed their probes above
            lease = client.CoordinationV1Api(api_client).read_namespaced_lease("kt-kubetune", ns).spec
            pod_names = {p.metadata.name for p in operator_pods(core, ns)}
            (holder,) = [p for p in pod_names if lease.holder_identity.startswith(f"{p}_")]
            (standby,) = pod_names - {holder}
            assert "standing by" in dev_cluster.pod_log(ns, standby, "operator")
            assert f"{lease.holder_identity} acquired" in dev_cluster.pod_log(ns, holder, "operator")
            assert st["adapter"]["uri"].startswith(f"s3://chart-runs/{jobs_ns}/tiny/out")
            # registered in the library by the operator's own ServiceAccount (create, never delete)
            assert st["adapter"]["name"] == "tiny"
            registered = custom.get_namespaced_custom_object(GROUP, VERSION, jobs_ns, ADAPTER_PLURAL, "tiny")
            assert registered["spec"]["adapter"]["sha256"] == st["adapter"]["sha256"]
            assert not sa_can("delete", "adapters", jobs_ns, GROUP)
            text = logs()
            assert "Forbidden" not in text and " 403" not in text, text[-3000:]


@pytest.mark.cluster
def test_installed_chart_cluster_wide_runs_pods_everywhere(
    dev_cluster, api_client, core, custom, session_operator_paused, tmp_path
):

    # the session's CRD stays as it is: not the release's
    values = {**in_cluster_values(dev_cluster), "crds": {"enabled": False}}
    with (
        make_namespace(core) as jobs_ns,
        installed(dev_cluster, api_client, core, "kw", values, tmp_path, adopt_crd=False) as (ns, notes),
    ):
        assert "every namespace" in notes

        def sa_can(verb, resource, namespace="", group=""):
            return can(api_client, "kw-kubetune", ns, verb, resource, namespace, group)

        for where in (jobs_ns, "default", ""):
            assert sa_can("watch", "finetunejobs", where, GROUP) and sa_can("create", "pods", where)
            assert not sa_can("get", "secrets", where) and not sa_can("list", "secrets", where)
            assert not sa_can("get", "configmaps", where)
        # one replica: no leader election, no Lease
        assert not sa_can("create", "leases", ns, "coordination.k8s.io")

        assert_runs_in_its_image_under_a_kubelet(core, ns, dev_cluster, replicas=1)
        logs = operator_logs(dev_cluster, core, ns)
        # a CPU job without the runner override: placed on a kwok node, Running there
        job = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": "everywhere"},
            "spec": {
                "model": {"uri": "s3://models/m/"},
                "dataset": {"uri": "s3://data/d/"},
                "resources": {"accelerator": "cpu", "cpu": "1", "memory": "1Gi"},
                "checkpoint": {"uri": "s3://runs/ckpt/"},
                "output": {"uri": "s3://runs/out/"},
                "storage": {"secretRef": {"name": "s3"}},
            },
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, jobs_ns, PLURAL, job)
        wait_phase(custom, jobs_ns, "everywhere", "Running", 60, logs)
        assert core.list_namespaced_pod(jobs_ns, label_selector=f"{GROUP}/job=everywhere").items
        # a second attempt finds its job's NetworkPolicy there already, and may read it
        core.delete_namespaced_pod("everywhere-a1-w0", jobs_ns, grace_period_seconds=0)
        wait_for(
            lambda: (
                (s := status_of(custom, jobs_ns, "everywhere")).get("attempt") == 2
                and s.get("phase") == "Running"
            ),
            60,
            "attempt 2 of everywhere to run (a 403 on its NetworkPolicy would hold it)",
        )
        text = logs()
        assert "Forbidden" not in text and " 403" not in text, text[-3000:]
        # the cluster-wide grant stops at the protected namespaces (the chart's admission policy,
        # whose denial is a 422: the job can never run there, so it fails at once)
        protected = {**job, "metadata": {"name": "protected"}}
        custom.create_namespaced_custom_object(GROUP, VERSION, "kube-system", PLURAL, protected)
        try:
            try:
                st = wait_for(
                    lambda: (
                        (s := status_of(custom, "kube-system", "protected")).get("reason") == "InvalidSpec"
                        and s
                    ),
                    60,
                    "the create in kube-system to be refused",
                )
            except TimeoutError as e:
                pods = core.list_namespaced_pod("kube-system", label_selector=f"{GROUP}/job=protected").items
                raise AssertionError(
                    f"{e}: status {status_of(custom, 'kube-system', 'protected')}, "
                    f"pods {[p.metadata.name for p in pods]}; operator log:\n{logs()[-3000:]}"
                ) from None
            assert "creates nothing in kube-system" in st["message"], st
            assert not core.list_namespaced_pod("kube-system", label_selector=f"{GROUP}/job=protected").items
        finally:
            custom.delete_namespaced_custom_object(GROUP, VERSION, "kube-system", PLURAL, "protected")
