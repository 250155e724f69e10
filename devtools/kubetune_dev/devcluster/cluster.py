"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager,
scheduler, CoreDNS, kwok for fake GPU nodes, real kubelets on containerd for the nodes
whose pods really run (kubelets.py), a registry serving the project's images to them, and
MinIO for S3. Used by `make dev-up` and by pytest as a session fixture.

    host (root)                                      pods: no route off 10.252.0.0/16
    ├─ 127.0.0.1: etcd, kube-apiserver, controller-manager, scheduler, kwok, registry
    ├─ bridge kubetune0 (10.252.0.1/16): MinIO, CoreDNS (:53); node IPs 10.252.0.1x
    │   ├─ runner-0: containerd + kubelet (own mount namespace) ── pods 10.252.1.x
    │   ├─ runner-1: containerd + kubelet                        ── pods 10.252.2.x
    │   └─ runner-2: containerd + kubelet                        ── pods 10.252.3.x
    └─ kwok: the fake GPU pools (Nodes and pods that never run), their addresses on the
       bridge (pods 10.252.128.0/17, nodes 10.252.0.5) but on no link: nothing sent to
       them leaves the machine
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import kubelets, procs
from .certs import CertPaths, write_dev_certs
from .minio import S3_REGION, minio_command, minio_env, s3_client
from .nodes import NVIDIA_GPU, NodeSpec, default_nodes, node_manifest
from .tools import REPO_ROOT, cache_dir, http_ok, tool_dirs

STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")


@dataclass(frozen=True)
class Images:
    """The project's images as `make images` (hack/images.sh) pushed them: references by
    digest under the dev cluster's registry name."""

    operator: str
    trainer: str
    pause: str
    registry_storage: Path
    stamp: str
    # the opt-in ipex-llm trainer image (~7 GB): only where asked for (DevCluster.ipex_llm)
    trainer_ipex_llm: str | None = None

    @classmethod
    def load(cls, ipex_llm: bool = False) -> Images:
        """The images of this tree, built and pushed first when an input changed (a code
        edit rebuilds only the small top layer of the image it touches); with ipex_llm,
        the ipex-llm trainer image too (hack/images.sh --ipex-llm)."""
        data, stamps = {}, []
        for args in ([["--ipex-llm"]] if ipex_llm else []) + [[]]:
            out = subprocess.run(
                [str(REPO_ROOT / "hack" / "images.sh"), *args], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise RuntimeError(f"hack/images.sh {' '.join(args)} failed:\n{out.stderr[-4000:]}")
            path = Path(out.stdout.strip().splitlines()[-1])
            data.update(json.loads(path.read_text()))
            stamps.append(path.stem)
        stamp = "-".join(reversed(stamps))

        def ref(k: str) -> str:
            return f"{kubelets.REGISTRY_HOST}/{data[k]['repository']}@{data[k]['digest']}"

        return cls(
            ref("operator"),
            ref("trainer"),
            ref("pause"),
            Path(data["registry_storage"]),
            stamp,
            ref("trainer-ipex-llm") if "trainer-ipex-llm" in data else None,
        )


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
    dns: str | None = None  # CoreDNS, for pods (on the bridge)
    registry: str | None = None  # host:port on loopback, for containerd


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
    images: Images | None = None
    _kubelets: kubelets.KubeletNodes | None = None
    _slot: kubelets.Slot | None = None
    _guard: subprocess.Popen | None = None
    certs: CertPaths | None = None
    kueue: object | None = None  # devcluster.kueue.Kueue, once start_kueue() ran
    # the ipex-llm trainer image in the nodes' store and the operator's settings (7 GB:
    # test sessions ask for it; `KUBETUNE_DEV_IPEX_LLM=1 make dev-up` for its example)
    ipex_llm: bool = field(default_factory=lambda: os.environ.get("KUBETUNE_DEV_IPEX_LLM") == "1")

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
        if self._kubelets:
            self._kubelets.stop()  # their pods' SIGTERM while the API server takes their status
            self._kubelets = None
        for _name, proc, _log in reversed(self._procs):
            procs.stop_group(proc)
        self._procs.clear()
        if self._slot:
            kubelets.bridge_down(self._slot.network)
            self._slot.release()
            self._slot = None
        if self._guard:
            self._guard.kill()
            self._guard.wait()
            self._guard = None
        self.kueue = None
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        shutil.rmtree(self.workdir / "minio-data", ignore_errors=True)

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_kueue(self):
        """Kueue in this cluster (devcluster.kueue), once: its CRDs, webhooks on loopback and
        controller manager, stopped with the cluster."""
        from kubernetes import config

        from . import kueue

        if self.kueue is None:
            api = config.new_client_from_config(str(self.endpoints.kubeconfig))
            self.kueue = kueue.start(self, tool_dirs()["kueue"], api)
        return self.kueue

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
        """What a client of this cluster needs: kubeconfig and the S3 endpoint and keys, and
        for an operator, the trainer image its nodes pull."""
        ep = self.endpoints
        return {
            "KUBECONFIG": str(ep.kubeconfig),
            "AWS_ENDPOINT_URL": ep.s3,
            "AWS_ACCESS_KEY_ID": ep.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": ep.s3_secret_key,
            "AWS_REGION": S3_REGION,
            **self.operator_env(),
        }

    def operator_env(self) -> dict[str, str]:
        """The operator's image settings for this cluster (as the chart sets them): the
        CUDA trainer image, for NVIDIA and CPU jobs alike."""
        if not self.images:
            return {}
        ipex = (
            {"KUBETUNE_TRAINER_IMAGE_IPEX_LLM": self.images.trainer_ipex_llm}
            if self.images.trainer_ipex_llm
            else {}
        )
        return {
            "KUBETUNE_TRAINER_IMAGE_CUDA": self.images.trainer,
            "KUBETUNE_TRAINER_IMAGE_CPU": self.images.trainer,
            **ipex,
            # the objects are made as with the chart; the bridge CNI does not enforce them
            "KUBETUNE_NETWORK_POLICY": json.dumps(
                {"namespace": "kubetune-system", "podLabels": {"app.kubernetes.io/name": "kubetune"}}
            ),
        }

    @property
    def network(self) -> kubelets.Network | None:
        """The pod network of the runner nodes (None without them)."""
        return self._slot.network if self._slot else None

    def lose_pod(self, namespace: str, pod: str) -> None:
        """A pod lost the way a vanished spot VM loses it: its processes stop at once, with
        no SIGTERM and no chance to save anything, and the pod object is gone. (Deleting
        with grace 0 alone would not do: the kubelet still gives SIGTERM and 2 s.) The
        containers are frozen first, then the pod is deleted, then they are killed."""
        with self._pod_containers(namespace, pod) as (core, runc, ids):
            for cid in ids:
                runc("pause", cid)
            core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
            for cid in ids:
                runc("kill", cid, "KILL")
                runc("resume", cid, check=False)

    def freeze_pod(self, namespace: str, pod: str) -> None:
        """Every process of the pod stops where it is (the cgroup freezer) and the pod stays:
        a hung worker, as a stuck read or a wedged GPU leaves one."""
        with self._pod_containers(namespace, pod) as (_, runc, ids):
            for cid in ids:
                runc("pause", cid)

    def thaw_pod(self, namespace: str, pod: str) -> None:
        with self._pod_containers(namespace, pod) as (_, runc, ids):
            for cid in ids:
                runc("resume", cid, check=False)

    @contextlib.contextmanager
    def _pod_containers(self, namespace: str, pod: str):
        """(core API, runc on the pod's node, the pod's container IDs)."""
        from kubernetes import client, config

        api = config.new_client_from_config(str(self.endpoints.kubeconfig))
        try:
            core = client.CoreV1Api(api)
            obj = core.read_namespaced_pod(pod, namespace)
            root = self.workdir / "nodes" / obj.spec.node_name / "runc" / "k8s.io"  # <Root>/<namespace>
            ids = [
                s.container_id.split("://", 1)[1]
                for s in obj.status.container_statuses or []
                if s.container_id
            ]

            def runc(*args: str, check: bool = True) -> None:
                subprocess.run(["runc", "--root", str(root), *args], check=check, capture_output=True)

            yield core, runc, ids
        finally:
            api.close()

    def pod_log(self, namespace: str, pod: str, container: str = "trainer") -> str:
        """A container's output, kept after its pod is gone (kubectl logs only has it while
        the pod exists): the log keeper hard-links each log file as the kubelet creates it."""
        return kubelets.read_kept_logs(self.workdir / "pod-logs", namespace, pod, container)

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
        runners = [n for n in self.nodes if n.runner]
        # The API server, MinIO and CoreDNS listen where pods reach them too: the host side
        # of the pod bridge (pods have no route to loopback, and no kube-proxy serves them
        # the kubernetes Service).
        if runners:
            self.images = Images.load(ipex_llm=self.ipex_llm)
        # a network slot also without real nodes: kwok's fake pods and nodes get addresses
        # on its bridge, so nothing sent to them can leave the machine
        self._take_the_nodes(len(runners))
        network = self._slot.network
        host = network.host_ip
        self.certs = certs = write_dev_certs(w / "pki", extra_ips=(host,))
        port = {
            k: procs.free_port()
            for k in ("etcd", "peer", "api", "kcm", "sched", "kwok", "s3", "s3console", "registry")
        }
        api = f"https://{host}:{port['api']}"
        kubeconfig_path = w / "kubeconfig"
        kubeconfig_path.write_text(yaml.safe_dump(kubeconfig(api, certs)))
        kubeconfig_path.chmod(0o600)
        s3_key, s3_secret = "kubetune-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        self.endpoints = Endpoints(api, f"http://{host}:{port['s3']}", s3_key, s3_secret, kubeconfig_path)
        if runners:
            self.endpoints.dns = host
            self.endpoints.registry = f"127.0.0.1:{port['registry']}"
            self._spawn(
                "registry", ["docker-registry", "serve", str(self._registry_config(port["registry"]))]
            )

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
                minio_command(bins["minio"] / "minio", port["s3"], port["s3console"], w / "minio-data", host),
                env=minio_env(w, s3_key, s3_secret),
            )
        self._wait(lambda: http_ok(f"{etcd}/health"), "etcd /health")

        c = certs
        self._spawn(
            "kube-apiserver",
            [
                str(bins["kubernetes"] / "kube-apiserver"),
                f"--etcd-servers={etcd}",
                f"--bind-address={host}",
                f"--secure-port={port['api']}",
                f"--advertise-address={host}",
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                # as on GKE: pods asking for an extended resource tolerate the taint of that name;
                # NodeRestriction: a kubelet may only touch its own Node and its pods
                "--enable-admission-plugins=ExtendedResourceToleration,NodeRestriction",
                # logs, exec: the API server dials the kubelets at their node IP, checks their
                # serving certificate against the dev CA and shows them the admin certificate
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={c.ca_cert}",
                f"--kubelet-client-certificate={c.admin_cert}",
                f"--kubelet-client-key={c.admin_key}",
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
        self._wait(lambda: http_ok(f"{api}/readyz", ctx), "kube-apiserver /readyz", timeout_s=90)

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
                f"--cidr={network.fake_pod_cidr}",
                f"--node-ip={network.fake_node_ip}",
                f"--server-address=127.0.0.1:{port['kwok']}",
            ],
        )
        if runners:
            self._spawn("coredns", self._coredns_command(bins, kubeconfig_path, w))
            self._kubelets = kubelets.KubeletNodes(
                w,
                self._slot.network,
                bins["kubelet"] / "kubelet",
                certs,
                api,
                self.log,
                fake_gpu_plugin=bins["fake-gpu-plugin"] / "fake-gpu-plugin",
            )
            seed = kubelets.seed_images(
                cache_dir() / "node-images",
                self.images.stamp,
                [self.images.pause, self.images.trainer, self.images.operator]
                + ([self.images.trainer_ipex_llm] if self.images.trainer_ipex_llm else []),
                self.endpoints.registry,
                self.log,
            )
            nodes = [
                self._kubelets.node(n.name, i, n.labels, n.taints, n.fake_gpus) for i, n in enumerate(runners)
            ]
            self._procs += self._kubelets.start(nodes, self.endpoints.registry, self.images.pause, host, seed)
            self._spawn_log_keeper([n.log_pods for n in nodes])

        from kubernetes import client, config  # lazily: cluster code runs before deps exist

        api_client = config.new_client_from_config(str(kubeconfig_path))
        core = client.CoreV1Api(api_client)
        for n in self.nodes:
            if not n.runner:
                core.create_node(node_manifest(n))

        if self.minio:
            self._wait(lambda: http_ok(f"{self.endpoints.s3}/minio/health/ready"), "MinIO ready")
        self._wait(lambda: _ready_nodes(core) >= {n.name for n in self.nodes}, "all nodes Ready")
        gpu_nodes = {n.name: str(n.fake_gpus) for n in self.nodes if n.runner and n.fake_gpus}
        self._wait(
            lambda: all(
                (core.read_node(name).status.capacity or {}).get(NVIDIA_GPU) == count
                for name, count in gpu_nodes.items()
            ),
            "the device plugin's GPUs on the runner nodes",
        )
        self._wait(
            lambda: core.read_namespaced_service_account("default", "default"),
            "the default ServiceAccount (controller-manager)",
        )
        self._wait(
            lambda: http_ok(f"https://127.0.0.1:{port['sched']}/healthz", _insecure()),
            "kube-scheduler /healthz",
        )
        api_client.close()

        (w / "env").write_text("".join(f"export {k}={v}\n" for k, v in self.env().items()))

    def _take_the_nodes(self, count: int) -> None:
        """Real nodes use host resources (a bridge, its subnet): take a free slot, clear what
        an earlier, killed holder of it left behind, and start the guard that clears up
        after this cluster if its process is killed."""
        self._slot = kubelets.Slot(cache_dir() / "node-images", self.workdir)
        if self._slot.previous:
            kubelets.cleanup(Path(self._slot.previous) / "nodes", self._slot.network)
        kubelets.cleanup(self.workdir / "nodes", self._slot.network)
        self._guard = kubelets.start_guard(self.workdir, self._slot.network.slot)
        kubelets.bridge_up(self._slot.network, count)

    def _registry_config(self, port: int) -> Path:
        """The CNCF distribution registry, read-only over the storage `make images` pushed to."""
        path = self.workdir / "registry.yml"
        path.write_text(
            yaml.safe_dump(
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {
                        "filesystem": {"rootdirectory": str(self.images.registry_storage)},
                        "maintenance": {"readonly": {"enabled": True}},
                    },
                    "http": {"addr": f"127.0.0.1:{port}"},
                }
            )
        )
        return path

    def _coredns_command(self, bins: dict[str, Path], kubeconfig_path: Path, w: Path) -> list[str]:
        """CoreDNS with the kubernetes plugin: Services and the pod names of headless
        Services (w0.<job> for distributed jobs). Nothing is forwarded off the machine."""
        corefile = w / "Corefile"
        corefile.write_text(
            f"""{kubelets.CLUSTER_DOMAIN}:53 {{
    bind {self._slot.network.host_ip}
    errors
    kubernetes {kubelets.CLUSTER_DOMAIN} {{
        kubeconfig {kubeconfig_path} kubetune-dev
        ttl 5
    }}
    cache 5
}}
.:53 {{
    bind {self._slot.network.host_ip}
    errors
}}
"""
        )
        return [str(bins["coredns"] / "coredns"), "-conf", str(corefile)]

    def _spawn_log_keeper(self, dirs: list[Path]) -> None:
        keep = self.workdir / "pod-logs"
        self._spawn(
            "log-keeper",
            [
                sys.executable,
                "-m",
                "kubetune_dev.devcluster.kubelets",
                "keep-logs",
                str(keep),
                *map(str, dirs),
            ],
            env={**os.environ, "PYTHONPATH": repo_pythonpath()},
        )


def repo_pythonpath() -> str:
    """The tree's packages first: what every process started from the tree imports."""
    parts = [str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image"), str(REPO_ROOT / "devtools")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


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
