"""The dev cluster's runner nodes are real kubelets on containerd: pods run in the project's
images pulled from the registry, the kubelet reports exit codes, termination messages and
OOM kills, carries out the grace period, and the pod network reaches the cluster's own
addresses and nothing else."""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import textwrap
import time

import pytest
from kubernetes.client.rest import ApiException

from kubetune_dev.devcluster.nodes import GKE_SPOT_LABEL, RUNNER_LABEL
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

HOLD = "kubetune.dev/test-hold"  # keeps a deleted pod readable until the test lets go
TOLERATIONS = [
    {"key": RUNNER_LABEL, "operator": "Exists", "effect": "NoSchedule"},
    {"key": GKE_SPOT_LABEL, "operator": "Exists", "effect": "NoSchedule"},
]


def node_pod(
    image: str,
    name: str,
    script: str,
    shared=None,
    grace_s: int = 30,
    hold: bool = False,
    memory: str | None = None,
    **spec,
) -> dict:
    """A pod on a runner node running `script` with the image's python; `shared` (a host
    folder) is mounted at /shared to hand files between test and pod."""
    container = {
        "name": "main",
        "image": image,
        "command": ["python", "-c", textwrap.dedent(script)],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
    }
    volumes = []
    if shared is not None:
        shared.chmod(0o777)  # the image's user is not root
        container["volumeMounts"] = [{"name": "shared", "mountPath": "/shared"}]
        volumes = [{"name": "shared", "hostPath": {"path": str(shared), "type": "Directory"}}]
    if memory:
        container["resources"] = {"limits": {"memory": memory}, "requests": {"memory": memory}}
    return {
        "metadata": {"name": name, "labels": {"app": "node-test"}, "finalizers": [HOLD] if hold else []},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace_s,
            "nodeSelector": {RUNNER_LABEL: "true"},
            "tolerations": TOLERATIONS,
            "containers": [container],
            "volumes": volumes,
            **spec,
        },
    }


@pytest.fixture(scope="session")
def image(dev_cluster):
    """A small image with python: the operator's."""
    return dev_cluster.images.operator


def phase(core, namespace, name):
    return core.read_namespaced_pod(name, namespace).status.phase


def terminated(core, namespace, name):
    try:
        pod = core.read_namespaced_pod(name, namespace)
    except ApiException:
        return None
    statuses = pod.status.container_statuses or []
    return statuses and statuses[0].state.terminated


def gone(core, namespace, name):
    try:
        core.read_namespaced_pod(name, namespace)
        return False
    except ApiException as e:
        return e.status == 404


def release(core, namespace, name):
    core.patch_namespaced_pod(name, namespace, {"metadata": {"finalizers": None}})
    wait_for(lambda: gone(core, namespace, name), 30, f"pod {name} to be removed")


def test_runner_nodes_are_kubelets_that_joined_with_node_certificates(core, dev_cluster):
    from kubernetes import client, config

    nodes = core.list_node(label_selector=RUNNER_LABEL).items
    assert len(nodes) >= 2
    for node in nodes:
        info = node.status.node_info
        assert info.container_runtime_version.startswith("containerd://") and info.kubelet_version.startswith(
            "v1."
        )
        addresses = {a.type: a.address for a in node.status.addresses}
        assert ipaddress.ip_address(addresses["InternalIP"]) in dev_cluster.network.subnet
    # a kubelet's certificate (system:node:<name>) may change its own Node and no other
    first, second = nodes[0].metadata.name, nodes[1].metadata.name
    api = config.new_client_from_config(str(dev_cluster.workdir / "nodes" / first / "kubeconfig"))
    as_node = client.CoreV1Api(api)
    try:
        as_node.patch_node(first, {"metadata": {"annotations": {"kubetune.dev/touched": "yes"}}})
        with pytest.raises(ApiException) as denied:
            as_node.patch_node(second, {"metadata": {"annotations": {"kubetune.dev/touched": "yes"}}})
        assert denied.value.status == 403
    finally:
        as_node.patch_node(first, {"metadata": {"annotations": {"kubetune.dev/touched": None}}})
        api.close()


def test_a_pod_runs_in_its_image_and_reports_exit_code_and_termination_message(
    core, namespace, image, tmp_path, dev_cluster
):
    script = """
        import json, os, pathlib, socket, sys, time
        s = socket.socket(); s.bind((os.environ["POD_IP"], 0)); s.close()  # its own address
        while not pathlib.Path("/shared/go").exists():
            time.sleep(0.05)
        msg = {k: os.environ[k] for k in ("POD_NAME", "POD_IP", "NODE_NAME")}
        msg["uid"] = os.getuid()
        pathlib.Path("/dev/termination-log").write_text(json.dumps(msg))
        print("exiting with", sys.argv[1:] or os.environ["EXIT_CODE"], flush=True)
        raise SystemExit(int(os.environ["EXIT_CODE"]))
    """
    for name, code in (("ok", 0), ("fails", 3)):
        pod = node_pod(image, name, script, shared=tmp_path)
        pod["spec"]["containers"][0]["env"].append({"name": "EXIT_CODE", "value": str(code)})
        core.create_namespaced_pod(namespace, pod)
    for name in ("ok", "fails"):
        wait_for(lambda n=name: phase(core, namespace, n) == "Running", 120, f"{name} Running")
    running = core.read_namespaced_pod("ok", namespace)
    assert ipaddress.ip_address(running.status.pod_ip) in dev_cluster.network.subnet
    assert running.status.container_statuses[0].state.running
    (tmp_path / "go").touch()

    for name, code, want in (("ok", 0, "Succeeded"), ("fails", 3, "Failed")):
        wait_for(lambda n=name, w=want: phase(core, namespace, n) == w, 60, f"{name} {want}")
        pod = core.read_namespaced_pod(name, namespace)
        status = pod.status.container_statuses[0]
        term = status.state.terminated
        assert (term.exit_code, term.reason) == (code, "Completed" if code == 0 else "Error")
        msg = json.loads(term.message)
        assert msg == {
            "POD_NAME": name,
            "POD_IP": pod.status.pod_ip,
            "NODE_NAME": pod.spec.node_name,
            "uid": 10001,  # the image's USER
        }
        assert status.container_id.startswith("containerd://")
        assert status.image_id.endswith(image.rsplit("@", 1)[1])  # the pushed image, by digest
        assert f"exiting with {code}" in core.read_namespaced_pod_log(name, namespace)


def test_deleting_a_pod_sends_sigterm_then_sigkill_after_the_grace_period(core, namespace, image, tmp_path):
    script = """
        import pathlib, signal, time
        marks = pathlib.Path("/shared/marks")
        def on_term(*_):
            with marks.open("a") as f:
                f.write(f"SIGTERM {time.time()}\\n")
        signal.signal(signal.SIGTERM, on_term)   # and keep running: only SIGKILL ends us
        marks.write_text("started\\n")
        while True:
            time.sleep(0.05)
    """
    marks = tmp_path / "marks"
    core.create_namespaced_pod(
        namespace, node_pod(image, "stubborn", script, shared=tmp_path, grace_s=2, hold=True)
    )
    wait_for(lambda: marks.exists() and "started" in marks.read_text(), 120, "the process to start")
    deleted_at = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    final = wait_for(lambda: terminated(core, namespace, "stubborn"), 30, "the final container status")
    killed_after = time.monotonic() - deleted_at
    term_lines = [line for line in marks.read_text().splitlines() if line.startswith("SIGTERM")]
    assert len(term_lines) == 1, "SIGTERM first, exactly once"
    assert final.exit_code == 128 + signal.SIGKILL, "then SIGKILL"
    assert killed_after >= 2, "not before the grace period is over"
    release(core, namespace, "stubborn")


def test_a_pod_that_exits_on_sigterm_reports_its_own_exit_code(core, namespace, image, tmp_path):
    script = """
        import pathlib, signal, sys, time
        def on_term(*_):
            pathlib.Path("/dev/termination-log").write_text('{"outcome": "preempted"}')
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        pathlib.Path("/shared/started").touch()
        while True:
            time.sleep(0.05)
    """
    core.create_namespaced_pod(namespace, node_pod(image, "polite", script, shared=tmp_path, hold=True))
    wait_for(lambda: (tmp_path / "started").exists(), 120, "the process to start")
    core.delete_namespaced_pod("polite", namespace)
    final = wait_for(lambda: terminated(core, namespace, "polite"), 20, "the final container status")
    assert final.exit_code == 75
    assert json.loads(final.message) == {"outcome": "preempted"}
    release(core, namespace, "polite")


def test_a_pod_over_its_memory_limit_is_oom_killed(core, namespace, image):
    script = """
        chunks = []
        while True:
            chunks.append(bytearray(16 << 20))  # touched: the kernel must back it
    """
    core.create_namespaced_pod(namespace, node_pod(image, "greedy", script, memory="96Mi"))
    final = wait_for(lambda: terminated(core, namespace, "greedy"), 120, "the OOM kill")
    assert (final.reason, final.exit_code) == ("OOMKilled", 137)


def test_pods_reach_the_cluster_and_nothing_outside_it(core, namespace, image, dev_cluster):
    """No route off the pod network: any other address fails at once (ENETUNREACH), while
    MinIO on the bridge's host side answers."""
    host_ips = sorted(
        {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        - {"127.0.0.1", "127.0.1.1"}
    )
    outside = ["8.8.8.8", "1.1.1.1", "192.168.1.1", "172.16.0.1", "10.0.0.1", *host_ips]
    script = f"""
        import json, socket, time, urllib.request
        results = {{}}
        for ip in {outside!r}:
            s = socket.socket(); s.settimeout(5); t = time.monotonic()
            try:
                s.connect((ip, 443)); results[ip] = "connected"
            except OSError as e:
                results[ip] = [e.errno, round(time.monotonic() - t, 3)]
        with urllib.request.urlopen({dev_cluster.endpoints.s3 + "/minio/health/live"!r}, timeout=5) as r:
            results["minio"] = r.status
        open("/dev/termination-log", "w").write(json.dumps(results))
    """
    core.create_namespaced_pod(namespace, node_pod(image, "prober", script))
    final = wait_for(lambda: terminated(core, namespace, "prober"), 120, "the probe")
    results = json.loads(final.message)
    assert results.pop("minio") == 200
    for ip, result in results.items():
        assert result != "connected", f"a pod reached {ip}"
        errno_, seconds = result
        assert errno_ == 101 and seconds < 0.5, f"{ip}: {result} (expected ENETUNREACH at once)"


def test_headless_service_names_resolve_to_the_pods(core, namespace, image, tmp_path):
    """What distributed jobs use: <hostname>.<subdomain> through CoreDNS, from another node."""
    server = """
        import socket, pathlib, time
        s = socket.socket(); s.bind(("", 7000)); s.listen(1)
        conn, addr = s.accept(); conn.sendall(b"hello " + addr[0].encode()); conn.close()
    """
    client_script = """
        import socket, time, os
        for _ in range(600):
            try:
                ip = socket.gethostbyname("w0.grp")
                c = socket.create_connection((ip, 7000), timeout=5)
                print(ip, c.recv(100).decode(), flush=True)
                open("/dev/termination-log", "w").write(ip)
                break
            except OSError:
                time.sleep(0.1)
    """
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "grp"},
            "spec": {"clusterIP": "None", "selector": {"grp": "yes"}, "publishNotReadyAddresses": True},
        },
    )
    srv = node_pod(image, "srv", server, hostname="w0", subdomain="grp")
    srv["metadata"]["labels"]["grp"] = "yes"
    core.create_namespaced_pod(namespace, srv)
    wait_for(lambda: phase(core, namespace, "srv") == "Running", 120, "the server")
    server_node = core.read_namespaced_pod("srv", namespace).spec.node_name
    cli = node_pod(
        image,
        "cli",
        client_script,
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "NotIn", "values": [server_node]}
                            ]
                        }
                    ]
                }
            }
        },
    )
    core.create_namespaced_pod(namespace, cli)
    final = wait_for(lambda: terminated(core, namespace, "cli"), 120, "the client")
    srv_pod = core.read_namespaced_pod("srv", namespace)
    assert final.message == srv_pod.status.pod_ip
    assert core.read_namespaced_pod("cli", namespace).spec.node_name != server_node


def test_the_trainer_image_holds_exactly_the_locked_versions(core, namespace, dev_cluster):
    """The image users get runs what the tests ran: every package of requirements/trainer.lock
    at its locked version, and the trainer importable."""
    from tests.helpers import LOCKS, read_lock

    locked = {name: version for name, (version, _) in read_lock(LOCKS / "trainer.lock").items()}
    script = """
        import json, importlib.metadata as md
        import kubetune_trainer.train  # the trainer and its heavy imports (torch, peft, bitsandbytes)
        from packaging.utils import canonicalize_name
        versions = {}
        for d in md.distributions():  # in sys.path order: the first one is what imports
            versions.setdefault(canonicalize_name(d.metadata["Name"]), d.version)
        open("/dev/termination-log", "w").write(json.dumps(versions))
    """
    pod = node_pod(dev_cluster.images.trainer, "versions", script)
    pod["spec"]["containers"][0]["resources"] = {"limits": {"memory": "2Gi"}}
    core.create_namespaced_pod(namespace, pod)
    final = wait_for(lambda: terminated(core, namespace, "versions"), 180, "the version listing")
    assert final.exit_code == 0, final.message
    installed = json.loads(final.message)
    wrong = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not wrong, f"the trainer image differs from requirements/trainer.lock (locked, installed): {wrong}"


def test_gpus_from_a_device_plugin_are_allocated_by_the_kubelet(core, namespace, image):
    """runner-2's kubelet has a (fake) NVIDIA device plugin: the kubelet advertises its
    devices as nvidia.com/gpu, the scheduler counts them, and the kubelet allocates them
    through the plugin, whose environment the container gets."""
    node = core.read_node("runner-2")
    assert node.status.capacity.get("nvidia.com/gpu") == "2"
    script = """
        import json, os
        env = {k: os.environ.get(k) for k in ("NVIDIA_VISIBLE_DEVICES", "KUBETUNE_FAKE_GPU")}
        open("/dev/termination-log", "w").write(json.dumps(env))
    """
    both = node_pod(image, "two-gpus", script, hold=False)
    both["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "2"}}
    core.create_namespaced_pod(namespace, both)
    final = wait_for(lambda: terminated(core, namespace, "two-gpus"), 120, "the GPU pod")
    env = json.loads(final.message)
    assert sorted(env["NVIDIA_VISIBLE_DEVICES"].split(",")) == ["fake-gpu-0", "fake-gpu-1"], env
    assert env["KUBETUNE_FAKE_GPU"] == "1"
    assert core.read_namespaced_pod("two-gpus", namespace).spec.node_name == "runner-2"
    # a finished pod's devices are free again: a second pod gets one
    one = node_pod(image, "one-gpu", script)
    one["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    core.create_namespaced_pod(namespace, one)
    final = wait_for(lambda: terminated(core, namespace, "one-gpu"), 120, "the second GPU pod")
    assert json.loads(final.message)["NVIDIA_VISIBLE_DEVICES"] in ("fake-gpu-0", "fake-gpu-1")
