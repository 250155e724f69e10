"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager,
scheduler, kwok for fake GPU nodes, the pod runner for nodes whose pods really run,
and MinIO for S3. Used by `kubetune dev up` and by pytest as a session fixture."""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import procs
from .certs import CertPaths, write_dev_certs
from .minio import S3_REGION, minio_command, minio_env, s3_client
from .nodes import NodeSpec, default_nodes, node_manifest

REPO_ROOT = Path(__file__).resolve().parents[3]
STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")


@functools.cache
def _tool_dir_names() -> tuple[tuple[str, Path], ...]:
    """hack/build-tools.sh's cache directory per piece: fixed for a checkout, so asked once
    per process (the tests call kubectl and helm hundreds of times)."""
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "build-tools.sh"), "--print"], check=True, capture_output=True, text=True
    ).stdout
    return tuple((k, Path(v)) for k, v in (line.split("=", 1) for line in out.split()))


def tool_dirs() -> dict[str, Path]:
    """Cache directories of the Go-built binaries, as hack/build-tools.sh names them."""
    dirs = dict(_tool_dir_names())
    missing = [k for k, d in dirs.items() if not (d / ".complete").exists()]
    if missing:
        raise RuntimeError(
            f"dev-cluster binaries not built: {', '.join(missing)}; "
            "run hack/build-tools.sh (make tools) first"
        )
    return dirs


def tool_binary(piece: str) -> Path:
    """The binary of a one-binary piece (kubectl, helm, minio), named after it."""
    return tool_dirs()[piece] / piece


def kubeconfig(server: str, certs: CertPaths) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-dev",
                "cluster": {"server": server, "certificate-authority": str(certs.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {"client-certificate": str(certs.admin_cert), "client-key": str(certs.admin_key)},
            }
        ],
        "contexts": [{"name": "kubetune-dev", "context": {"cluster": "kubetune-dev", "user": "admin"}}],
        "current-context": "kubetune-dev",
    }


@dataclass
class Endpoints:
    api: str
    s3: str
    s3_access_key: str
    s3_secret_key: str
    kubeconfig: Path


@dataclass
class DevCluster:
    workdir: Path
    nodes: list[NodeSpec] = field(default_factory=default_nodes)
    minio: bool = True
    log: callable = print
    _procs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)
    endpoints: Endpoints | None = None
    startup_s: float | None = None
    # seconds from start() until each readiness check passed, in order
    timings: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0

    # -- public ---------------------------------------------------------------------------

    def start(self) -> Endpoints:
        self._t0 = t0 = time.monotonic()
        self.timings.clear()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        self.log(
            f"[dev-cluster] ready in {self.startup_s:.1f} s: API {self.endpoints.api}, "
            f"S3 {self.endpoints.s3}, kubeconfig {self.endpoints.kubeconfig}"
        )
        return self.endpoints

    def stop(self) -> None:
        """Stop every process, newest first (the runner first, so its pods get their
        SIGTERM while the API server still takes their final status)."""
        for _name, proc, _log in reversed(self._procs):
            procs.stop_group(proc)
        self._procs.clear()
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        shutil.rmtree(self.workdir / "minio-data", ignore_errors=True)

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def s3_client(self):
        ep = self.endpoints
        return s3_client(ep.s3, ep.s3_access_key, ep.s3_secret_key)

    def s3_secret(self, name: str) -> dict:
        """A Secret with this MinIO's keys, as a FineTuneJob's storage.secretRef expects."""
        ep = self.endpoints
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": {"AWS_ACCESS_KEY_ID": ep.s3_access_key, "AWS_SECRET_ACCESS_KEY": ep.s3_secret_key},
        }

    def env(self) -> dict[str, str]:
        """What a client of this cluster needs: kubeconfig and the S3 endpoint and keys."""
        ep = self.endpoints
        return {
            "KUBECONFIG": str(ep.kubeconfig),
            "AWS_ENDPOINT_URL": ep.s3,
            "AWS_ACCESS_KEY_ID": ep.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": ep.s3_secret_key,
            "AWS_REGION": S3_REGION,
        }

    # -- start-up -------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.workdir / "logs" / f"{name}.log"
        proc = procs.spawn(args, log, env=env)
        self._procs.append((name, proc, log))
        return proc

    def _wait(self, predicate, what: str, timeout_s: float = 60):
        result = procs.wait_for(predicate, timeout_s, what, procs=self._procs)
        self.timings[what] = time.monotonic() - self._t0
        return result

    def _start(self) -> None:
        bins = tool_dirs()
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        (w / "logs").mkdir(exist_ok=True)
        shutil.rmtree(w / "etcd", ignore_errors=True)
        shutil.rmtree(w / "minio-data", ignore_errors=True)
        certs = write_dev_certs(w / "pki")
        port = {
            k: procs.free_port() for k in ("etcd", "peer", "api", "kcm", "sched", "kwok", "s3", "s3console")
        }
        api = f"https://127.0.0.1:{port['api']}"
        kubeconfig_path = w / "kubeconfig"
        kubeconfig_path.write_text(yaml.safe_dump(kubeconfig(api, certs)))
        kubeconfig_path.chmod(0o600)
        s3_key, s3_secret = "kubetune-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        self.endpoints = Endpoints(api, f"http://127.0.0.1:{port['s3']}", s3_key, s3_secret, kubeconfig_path)

        etcd = f"http://127.0.0.1:{port['etcd']}"
        peer = f"http://127.0.0.1:{port['peer']}"
        self._spawn(
            "etcd",
            [
                str(bins["etcd"] / "etcd"),
                f"--data-dir={w / 'etcd'}",
                "--name=default",
                f"--listen-client-urls={etcd}",
                f"--advertise-client-urls={etcd}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        if self.minio:
            self._spawn(
                "minio",
                minio_command(bins["minio"] / "minio", port["s3"], port["s3console"], w / "minio-data"),
                env=minio_env(w, s3_key, s3_secret),
            )
        self._wait(lambda: _http_ok(f"{etcd}/health"), "etcd /health")

        c = certs
        self._spawn(
            "kube-apiserver",
            [
                str(bins["kubernetes"] / "kube-apiserver"),
                f"--etcd-servers={etcd}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port['api']}",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                # as on GKE: pods asking for an extended resource tolerate the taint of that name
                "--enable-admission-plugins=ExtendedResourceToleration",
                f"--tls-cert-file={c.admin_cert}",
                f"--tls-private-key-file={c.admin_key}",
                f"--client-ca-file={c.ca_cert}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={c.admin_key}",
                f"--service-account-signing-key-file={c.admin_key}",
                f"--cert-dir={w / 'pki' / 'apiserver'}",
            ],
        )
        ctx = ssl.create_default_context(cafile=str(c.ca_cert))
        ctx.load_cert_chain(str(c.admin_cert), str(c.admin_key))
        self._wait(lambda: _http_ok(f"{api}/readyz", ctx), "kube-apiserver /readyz", timeout_s=90)

        kc = f"--kubeconfig={kubeconfig_path}"
        self._spawn(
            "kube-controller-manager",
            [
                str(bins["kubernetes"] / "kube-controller-manager"),
                kc,
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port['kcm']}",
                f"--root-ca-file={c.ca_cert}",
                f"--service-account-private-key-file={c.admin_key}",
                "--node-monitor-period=2s",
                "--node-monitor-grace-period=20s",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
                f"--cert-dir={w / 'pki' / 'kcm'}",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bins["kubernetes"] / "kube-scheduler"),
                kc,
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port['sched']}",
                f"--cert-dir={w / 'pki' / 'scheduler'}",
            ],
        )
        self._spawn(
            "kwok",
            [
                str(bins["kwok"] / "kwok"),
                kc,
                f"--config={STAGES_FILE}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
                "--cidr=10.244.0.0/16",
                f"--server-address=127.0.0.1:{port['kwok']}",
            ],
        )
        runner_nodes = [node_manifest(n) for n in self.nodes if n.runner]
        if runner_nodes:
            nodes_file = w / "runner-nodes.json"
            nodes_file.write_text(json.dumps(runner_nodes))
            self._spawn(
                "pod-runner",
                [
                    sys.executable,
                    "-m",
                    "kubetune.devcluster.podrunner",
                    kc,
                    f"--workdir={w / 'pods'}",
                    f"--nodes-file={nodes_file}",
                ],
                env={**os.environ, "PYTHONPATH": repo_pythonpath()},
            )

        from kubernetes import client, config  # lazily: cluster code runs before deps exist

        api_client = config.new_client_from_config(str(kubeconfig_path))
        core = client.CoreV1Api(api_client)
        for n in self.nodes:
            if not n.runner:
                core.create_node(node_manifest(n))

        if self.minio:
            self._wait(lambda: _http_ok(f"{self.endpoints.s3}/minio/health/ready"), "MinIO ready")
        self._wait(lambda: _ready_nodes(core) >= {n.name for n in self.nodes}, "all nodes Ready")
        self._wait(
            lambda: core.read_namespaced_service_account("default", "default"),
            "the default ServiceAccount (controller-manager)",
        )
        self._wait(
            lambda: _http_ok(f"https://127.0.0.1:{port['sched']}/healthz", _insecure()),
            "kube-scheduler /healthz",
        )
        api_client.close()

        (w / "env").write_text("".join(f"export {k}={v}\n" for k, v in self.env().items()))


def repo_pythonpath() -> str:
    """The tree's packages first: what every process started from the tree imports."""
    parts = [str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
        return r.status == 200


LIFECYCLE_TAINTS = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}


def _ready_nodes(core) -> set[str]:
    """Nodes that are Ready and that the node lifecycle controller has untainted: until
    then the scheduler would skip them, and the first pods would land elsewhere."""
    ready = set()
    for node in core.list_node().items:
        tainted = any(t.key in LIFECYCLE_TAINTS for t in node.spec.taints or [])
        if not tainted and any(
            c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
        ):
            ready.add(node.metadata.name)
    return ready
