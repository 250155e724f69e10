"""Real nodes for the dev cluster: each runner node is a kubelet on its own containerd
(runc, a CNI bridge), joined to the API server with a node client certificate from the
dev cluster's CA, pulling the project's images from the registry on loopback.

Several kubelets share this machine, and a kubelet writes fixed host paths
(/var/lib/kubelet/device-plugins, /var/log/containers, /run/netns, /var/lib/cni,
/run/containerd): each node runs its containerd and kubelet in a private mount namespace
where those paths are bind mounts of the node's own folders. When the node stops, its
mounts go with the namespace; what outlives it (runc containers, their cgroups, the
kubelet's iptables chains, the bridge) is removed by `cleanup()`, which also runs before
a start, so a killed run leaves nothing that breaks the next.

The network: one bridge per cluster holds the host side (the subnet's first address, where
MinIO and CoreDNS listen for pods) and the node addresses; each node's pods get addresses
from its own range of the subnet and no other route, so a pod reaches the other pods, the
nodes and the host side of the bridge, and nothing else: no packet leaves the machine.
Several dev clusters may run at once (a test session and `make dev-up`): each takes a
free slot, with its own bridge and subnet."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import procs
from .certs import CertPaths, node_client_cert, node_serving_cert

SLOTS = 4  # dev clusters with real nodes at once on one machine
CLUSTER_DOMAIN = "cluster.local"
REGISTRY_HOST = "registry.kubetune.invalid"  # images are named so; containerd maps it to loopback
CNI_BIN_DIR = "/usr/lib/cni"
# Fixed host paths a kubelet or containerd writes, private per node (see the module doc).
PRIVATE_PATHS = {
    "kubelet": "/var/lib/kubelet",
    "log-containers": "/var/log/containers",
    "log-pods": "/var/log/pods",
    "netns": "/run/netns",
    "cni-cache": "/var/lib/cni",
    "run-containerd": "/run/containerd",
}
# iptables chains the kubelet creates in the host's network namespace (it has no option to
# not create them): table -> chains, and the built-in chains that jump to them
KUBELET_CHAINS = {
    "filter": ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY"],
    "nat": ["KUBE-KUBELET-CANARY"],
    "mangle": ["KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"],
}


@dataclass(frozen=True)
class Network:
    """A dev cluster's pod network: slot 0 is 10.252.0.0/16 on bridge kubetune0, slot 1
    10.251.0.0/16 on kubetune1, and so on."""

    slot: int

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"10.{252 - self.slot}.0.0/16")

    @property
    def bridge(self) -> str:
        return f"kubetune{self.slot}"

    @property
    def host_ip(self) -> str:
        """The bridge's own address: the host, as pods reach it."""
        return str(self.subnet.network_address + 1)

    def node_ip(self, index: int) -> str:
        return str(self.subnet.network_address + 11 + index)

    @property
    def run_dir(self) -> Path:
        return Path("/run/kubetune") / str(self.slot)

    @property
    def fake_pod_cidr(self) -> str:
        """kwok's pods: the subnet's upper half, on the bridge but never assigned to a link.
        Whatever connects to a fake pod (the operator asking for its progress) then stays on
        this bridge and fails there, instead of following the default route off the machine."""
        return f"{self.subnet.network_address + 128 * 256}/17"

    @property
    def fake_node_ip(self) -> str:
        """kwok's nodes' InternalIP: on the bridge, never assigned (see fake_pod_cidr)."""
        return str(self.subnet.network_address + 5)

    def pod_range(self, index: int) -> tuple[str, str]:
        """Node `index`'s pod addresses: 10.x.<index+1>.2-254."""
        base = self.subnet.network_address + 256 * (index + 1)
        return str(base + 2), str(base + 254)


@dataclass(frozen=True)
class KubeletNode:
    name: str
    index: int
    network: Network
    labels: dict[str, str]
    taints: tuple[dict[str, str], ...]
    dir: Path  # this run's state: kubelet root, logs, containerd's root, state and socket
    fake_gpus: int = 0  # nvidia.com/gpu from the fake device plugin

    @property
    def ip(self) -> str:
        return self.network.node_ip(self.index)

    @property
    def images_dir(self) -> Path:
        """containerd's root (images, snapshots): a hard-linked copy of the seed store."""
        return self.dir / "containerd-root"

    @property
    def socket(self) -> Path:
        """Under /run, not the work directory: a unix socket path has at most 104 bytes."""
        return self.network.run_dir / self.name / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc"

    @property
    def log_pods(self) -> Path:
        return self.dir / "log-pods"


def containerd_config(node: KubeletNode, pause_image: str, registry: str) -> str:
    """containerd 1.6: runc with cgroupfs, the CNI bridge, our pause image, the registry
    name mapped to loopback. restrict_oom_score_adj: without CAP_SYS_RESOURCE, sandbox
    creation fails otherwise ("can't get final child's PID from pipe")."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{node.images_dir}"
state = "{node.dir / "containerd" / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{node.socket}"

[ttrpc]
  address = "{node.socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{node.dir / "containerd" / "opt"}"

[{cri}]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_apparmor = true
  enable_selinux = false
  max_container_log_line_size = 65536

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{node.runc_root}"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{node.dir / "cni"}"
  max_conf_num = 1

[{cri}.registry]
  config_path = "{node.dir / "certs.d"}"
"""


def registry_hosts_toml(registry: str) -> str:
    """containerd's hosts.toml: REGISTRY_HOST is served by the registry on loopback, over
    plain HTTP (it never leaves the machine)."""
    return (
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
    )


def cni_config(node: KubeletNode) -> dict:
    """A bridge network with no gateway and no routes: pods reach NETWORK (other pods, the
    nodes, the host side) and nothing else. No masquerade, no port maps."""
    start, end = node.network.pod_range(node.index)
    return {
        "cniVersion": "0.4.0",
        "name": f"kubetune-{node.name}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.network.bridge,
                "isGateway": False,
                "isDefaultGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(node.network.subnet), "rangeStart": start, "rangeEnd": end}]],
                    "routes": [],
                    "dataDir": str(node.dir / "ipam"),
                },
            },
            {"type": "loopback"},
        ],
    }


def kubelet_config(
    node: KubeletNode, ca: Path, serving: tuple[Path, Path], port: int, healthz: int, dns: str | None
) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving[0]),
        "tlsPrivateKeyFile": str(serving[1]),
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        # cgroup v1 hybrid, no systemd: cgroupfs, no QoS hierarchy, nothing reserved
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "failCgroupV1": False,
        "protectKernelDefaults": False,
        "registerWithTaints": [dict(t) for t in node.taints],
        # tests fill the disk and memory on purpose at times: no evictions, no image GC
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "containerLogMaxSize": "1Gi",
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [dns] if dns else [],
        # pods with dnsPolicy Default get this, not the host's resolvers
        "resolvConf": str(node.dir / "resolv.conf"),
        "nodeStatusUpdateFrequency": "2s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "maxPods": 20,
        "localStorageCapacityIsolation": False,
    }


NODE_SCRIPT = r"""
set -eu
# the node's private view of the kubelet's and containerd's fixed host paths
for pair in $PRIVATE; do
  src=${pair%%=*}; dst=${pair#*=}
  mkdir -p "$src" "$dst"
  mount --bind "$src" "$dst"
done
"$CONTAINERD" --config "$NODE_DIR/containerd.toml" >>"$NODE_DIR/containerd.log" 2>&1 &
containerd=$!
if [ -n "${FAKE_GPU_PLUGIN:-}" ]; then
  "$FAKE_GPU_PLUGIN" -count "$FAKE_GPUS" -node "$NODE_NAME" -owner "$NODE_DIR" >>"$NODE_DIR/fake-gpu-plugin.log" 2>&1 &
fi
until [ -S "$SOCKET" ]; do
  kill -0 "$containerd" 2>/dev/null || { echo "containerd exited:"; tail -5 "$NODE_DIR/containerd.log"; exit 1; }
  sleep 0.1
done
# leftovers of an earlier run in the kept image store: containers and sandboxes
for c in $("$CTR" --address "$SOCKET" -n k8s.io containers ls -q); do
  "$CTR" --address "$SOCKET" -n k8s.io containers rm "$c" >/dev/null 2>&1 || true
done
# containerd's socket can answer before its CRI server has initialized ("server is not
# initialized yet"), and the kubelet exits at once on that: started again while it fails
# within seconds, at most 40 times; a kubelet that ran longer ends the node
tries=0
while :; do
  started=$(date +%s)
  "$KUBELET" "$@" && exit 0
  rc=$?
  if [ $(( $(date +%s) - started )) -ge 5 ] || [ "$tries" -ge 40 ]; then exit "$rc"; fi
  tries=$((tries + 1))
  echo "kubelet exited $rc at start; again (containerd's CRI may not be ready yet)"
  sleep 0.25
done
"""


class KubeletNodes:
    """Start, stop and clean up the dev cluster's kubelet nodes."""

    def __init__(
        self,
        workdir: Path,
        network: Network,
        kubelet: Path,
        certs: CertPaths,
        api: str,
        log=print,
        fake_gpu_plugin: Path | None = None,
    ):
        self.fake_gpu_plugin = fake_gpu_plugin
        self.workdir = workdir
        self.network = network
        self.kubelet = kubelet
        self.certs = certs
        self.api = api
        self.log = log
        self.nodes: list[KubeletNode] = []
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []

    def node(self, name: str, index: int, labels: dict[str, str], taints, fake_gpus: int = 0) -> KubeletNode:
        return KubeletNode(
            name=name,
            index=index,
            network=self.network,
            labels=dict(labels),
            taints=tuple(taints),
            dir=self.workdir / "nodes" / name,
            fake_gpus=fake_gpus,
        )

    def start(
        self, nodes: list[KubeletNode], registry: str, pause_image: str, dns: str | None, seed: Path
    ) -> list:
        """Start every node; returns their (name, process, log) for the cluster to watch."""
        self.nodes = nodes
        for node in nodes:
            self._start_node(node, registry, pause_image, dns, seed)
        return list(self._procs)

    def _start_node(
        self, node: KubeletNode, registry: str, pause_image: str, dns: str | None, seed: Path
    ) -> None:
        d = node.dir
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("containerd", "cni", "ipam", "runc", f"certs.d/{REGISTRY_HOST}", "pki", *PRIVATE_PATHS):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(node.socket.parent, ignore_errors=True)
        node.socket.parent.mkdir(parents=True)
        clone_images(seed, node.images_dir)
        (d / "containerd.toml").write_text(containerd_config(node, pause_image, registry))
        (d / "certs.d" / REGISTRY_HOST / "hosts.toml").write_text(registry_hosts_toml(registry))
        (d / "cni" / "10-kubetune.conflist").write_text(json.dumps(cni_config(node), indent=2))
        (d / "resolv.conf").write_text(f"nameserver {dns}\n" if dns else "")
        client = node_client_cert(self.certs, d / "pki", node.name)
        serving = node_serving_cert(self.certs, d / "pki", node.name, node.ip)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dev",
                    "cluster": {"server": self.api, "certificate-authority": str(self.certs.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": node.name,
                    "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
                }
            ],
            "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": node.name}}],
            "current-context": "dev",
        }
        (d / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        port, healthz = procs.free_port(), procs.free_port()
        (d / "kubelet.yaml").write_text(
            yaml.safe_dump(
                kubelet_config(node, self.certs.ca_cert, (serving.cert, serving.key), port, healthz, dns)
            )
        )
        labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
        private = " ".join(f"{d / sub}={path}" for sub, path in PRIVATE_PATHS.items())
        env = {
            "PATH": f"{CNI_BIN_DIR}:/usr/sbin:/usr/bin:/sbin:/bin",
            "NODE_DIR": str(d),
            "SOCKET": str(node.socket),
            "PRIVATE": private,
            "CONTAINERD": shutil.which("containerd") or "containerd",
            "CTR": shutil.which("ctr") or "ctr",
            "KUBELET": str(self.kubelet),
            "NODE_NAME": node.name,
        }
        if node.fake_gpus:
            env |= {"FAKE_GPU_PLUGIN": str(self.fake_gpu_plugin), "FAKE_GPUS": str(node.fake_gpus)}
        args = procs.in_private_mount_namespace(
            NODE_SCRIPT,
            "node",
            f"--config={d / 'kubelet.yaml'}",
            f"--kubeconfig={d / 'kubeconfig'}",
            f"--hostname-override={node.name}",
            f"--node-ip={node.ip}",
            f"--node-labels={labels}",
            f"--cert-dir={d / 'pki'}",
            "--v=1",
        )
        log = self.workdir / "logs" / f"kubelet-{node.name}.log"
        proc = procs.spawn(args, log, env=env)
        self._procs.append((f"kubelet-{node.name}", proc, log))

    def stop(self) -> None:
        """Containers first (SIGTERM, then SIGKILL, through runc, as a kubelet being drained
        of its node would), then the kubelet and containerd, then what they left."""
        for _name, proc, _log in self._procs:  # all at once: a node's stop waits on its pods
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc, _log in self._procs:
            procs.stop_group(proc, grace_s=5)
        self._procs.clear()
        cleanup(self.workdir / "nodes", self.network)


def _runc_leftovers(nodes_dir: Path) -> None:
    # the shim's runc root is <Root>/<containerd namespace>
    for root in nodes_dir.glob("*/runc/*"):
        out = subprocess.run(
            ["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True, check=False
        )
        for cid in out.stdout.split():
            subprocess.run(
                ["runc", "--root", str(root), "delete", "--force", cid], capture_output=True, check=False
            )


def _node_processes(markers: list[Path]) -> list[int]:
    """Processes started for these nodes that may outlive the kubelet: its containerd
    (a child of the node's shell, not of the cluster) and containerd's shims (they outlive
    containerd by design). Each names a path under one of `markers` (the nodes' folder,
    their sockets' folder)."""
    found = []
    marker_bytes = [str(m).encode() for m in markers]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmd
            and cmd[0].rsplit(b"/", 1)[-1]
            in (b"containerd", b"containerd-shim-runc-v2", b"kubelet", b"fake-gpu-plugin")
            and any(m in arg for arg in cmd for m in marker_bytes)
        ):
            found.append(int(proc.name))
    return found


def _iptables_cleanup() -> None:
    for binary in ("iptables", "ip6tables"):
        if not shutil.which(binary):
            continue
        for table, chains in KUBELET_CHAINS.items():
            for chain in chains:
                for parent in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"):
                    while (
                        subprocess.run(
                            [binary, "-w", "-t", table, "-D", parent, "-j", chain], capture_output=True
                        ).returncode
                        == 0
                    ):
                        pass
                subprocess.run([binary, "-w", "-t", table, "-F", chain], capture_output=True)
                subprocess.run([binary, "-w", "-t", table, "-X", chain], capture_output=True)


def _empty_container_cgroups(min_age_s: float = 60) -> None:
    """runc removes a container's cgroups when it deletes it; a run killed at the wrong
    moment can leave empty ones under each controller's k8s.io/. Removed when empty and
    older than a minute (a container being created elsewhere has a fresh, empty one);
    rmdir refuses a cgroup that still has processes."""
    now = time.time()
    for cg in Path("/sys/fs/cgroup").glob("*/k8s.io/*"):
        if len(cg.name) == 64 and cg.is_dir() and now - cg.stat().st_mtime > min_age_s:
            with contextlib.suppress(OSError):
                cg.rmdir()


def cleanup(nodes_dir: Path, network: Network) -> None:
    """Remove what the nodes under nodes_dir (on `network`) left behind: runc containers
    (and with them their cgroups), containerd and its shims, their sockets, the kubelet's
    iptables chains. Safe to run when nothing is left, and after a SIGKILLed run."""
    _runc_leftovers(nodes_dir)
    pids = _node_processes([nodes_dir, network.run_dir])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(pids)
    shutil.rmtree(network.run_dir, ignore_errors=True)
    _empty_container_cgroups()
    _iptables_cleanup()


def bridge_up(network: Network, node_count: int) -> None:
    """The bridge with the host side's address and the nodes' addresses (the kubelet needs
    a node IP that is not loopback; this host has no dummy links)."""
    bridge_down(network)
    subprocess.run(["ip", "link", "add", network.bridge, "type", "bridge"], check=True)
    subprocess.run(
        ["ip", "addr", "add", f"{network.host_ip}/{network.subnet.prefixlen}", "dev", network.bridge],
        check=True,
    )
    for i in range(node_count):
        subprocess.run(["ip", "addr", "add", f"{network.node_ip(i)}/32", "dev", network.bridge], check=True)
    subprocess.run(["ip", "link", "set", network.bridge, "up"], check=True)


def bridge_down(network: Network) -> None:
    subprocess.run(["ip", "link", "del", network.bridge], capture_output=True, check=False)


class Slot:
    """One of SLOTS network slots, held (flock) for a cluster's life. The lock file names
    the holder's work directory, so the next holder can clean up after a killed one."""

    def __init__(self, locks: Path, workdir: Path):
        locks.mkdir(parents=True, exist_ok=True)
        for slot in range(SLOTS):
            f = open(locks / f"slot-{slot}.lock", "a+")  # noqa: SIM115 - held while the cluster runs
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.seek(0)
            self.previous = f.read().strip()
            f.seek(0)
            f.truncate()
            f.write(str(workdir))
            f.flush()
            self.file, self.network = f, Network(slot)
            return
        raise RuntimeError(
            f"{SLOTS} dev clusters with real nodes already run on this machine; stop one first"
        )

    def release(self) -> None:
        self.file.close()


def guard(owner: int, workdir: Path, slot: int) -> None:
    """Outlives a killed cluster: when `owner` (the process that started the cluster) is
    gone, remove what its nodes left (containerd, shims, containers, chains, the bridge).
    Started in its own session, it survives the SIGKILL that ends the owner's process group."""
    while procs.alive(owner):
        time.sleep(0.5)
    cleanup(workdir / "nodes", Network(slot))
    bridge_down(Network(slot))


def start_guard(workdir: Path, slot: int) -> subprocess.Popen:
    import sys

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune_dev.devcluster.kubelets",
            "guard",
            str(os.getpid()),
            str(workdir),
            str(slot),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ},
    )


def wait_gone(pids: list[int], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)


SEED_CONFIG = """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/opt"
"""


def seed_images(seed_dir: Path, stamp: str, refs: list[str], registry: str, log=print) -> Path:
    """One containerd image store holding `refs`, pulled from the registry once per set of
    images (`stamp`). Each node's store starts as a hard-linked copy of it (`clone_images`):
    the CUDA trainer image is ~6 GB unpacked, and three nodes pulling it each would take
    three times the disk and the time. The nodes still resolve every image through the
    registry; only the layers they already hold are not fetched again."""
    done = seed_dir / f".complete-{stamp}"
    if done.exists():
        return seed_dir / "root"
    t0 = time.monotonic()
    run = seed_dir / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "certs.d" / REGISTRY_HOST).mkdir(parents=True)
    (run / "certs.d" / REGISTRY_HOST / "hosts.toml").write_text(registry_hosts_toml(registry))
    socket = Path("/run/kubetune/seed.sock")  # short: a unix socket path has at most 104 bytes
    socket.parent.mkdir(parents=True, exist_ok=True)
    config = run / "config.toml"
    config.write_text(SEED_CONFIG.format(root=seed_dir / "root", state=run / "state", socket=socket))
    proc = procs.spawn(
        [shutil.which("containerd") or "containerd", "--config", str(config)], run / "containerd.log"
    )
    try:
        procs.wait_for(
            socket.exists,
            30,
            "the seed containerd's socket",
            procs=[("containerd", proc, run / "containerd.log")],
        )
        ctr = [shutil.which("ctr") or "ctr", "--address", str(socket), "-n", "k8s.io"]
        for ref in refs:
            log(f"[dev-cluster] pulling {ref} into the nodes' image store (once per image set)")
            subprocess.run(
                [*ctr, "images", "pull", "--hosts-dir", str(run / "certs.d"), ref],
                check=True,
                capture_output=True,
            )
    finally:
        procs.stop_group(proc)
    for old in seed_dir.glob(".complete-*"):
        old.unlink()
    done.touch()
    log(f"[dev-cluster] node image store ready in {time.monotonic() - t0:.0f} s")
    return seed_dir / "root"


def clone_images(seed_root: Path, dest: Path) -> None:
    """A node's containerd root as hard links to the seed's files (no disk, seconds), with
    its own copies of the bolt databases (they are written in place). Overlay lower layers
    are never written to, and a container's writes go to its own upper directory."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["cp", "-al", str(seed_root), str(dest)], capture_output=True, text=True, check=False)
    if r.returncode != 0:  # another filesystem: the node pulls from the registry itself
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        return
    for db in dest.rglob("*.db"):
        if db.is_file():
            data = db.read_bytes()
            db.unlink()
            db.write_bytes(data)


# -- the log keeper ------------------------------------------------------------------------
# A kubelet deletes a container's log with its pod; tests (and the demo) read the logs of
# pods long gone (the attempt that was evicted). Like a node's log shipper, the keeper
# hard-links every log file the moment it appears, so the file lives on, complete: the
# runtime keeps appending to the same inode (containerLogMaxSize is set above any test's).


def log_files(src: Path):
    """/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log under src. The
    kubelet removes a pod's folder whenever it likes: a folder gone between listing and
    reading is skipped (pathlib's glob raised, and the keeper died with it)."""

    def entries(path) -> list[os.DirEntry]:
        try:
            with os.scandir(path) as it:  # a file, or a folder gone: OSError, nothing in it
                return list(it)
        except OSError:
            return []

    for pod in entries(src):
        for container in entries(pod.path):
            for log in entries(container.path):
                if log.name.endswith(".log"):
                    yield Path(log.path)


def keep_logs(keep: Path, sources: list[Path], poll_s: float = 0.1) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    while True:
        for src in sources:
            for log in log_files(src):
                pod_dir, container = log.parent.parent.name, log.parent.name
                dest = keep / pod_dir / f"{container}.{log.stem}.log"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(FileNotFoundError, FileExistsError):
                        os.link(log, dest)
        time.sleep(poll_s)


def cri_log_text(raw: str) -> str:
    """The CRI log format (`<time> <stream> <P|F> <text>`) back to the program's output;
    P marks a partial line continued by the next record."""
    out = []
    for line in raw.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        text = parts[3] if len(parts) == 4 else ""
        out.append(text if parts[2] == "P" else text + "\n")
    return "".join(out)


def read_kept_logs(keep: Path, namespace: str, pod: str, container: str) -> str:
    """The kept output of a pod's container (every restart, in order; newest pod of that name)."""
    pods = sorted(keep.glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    if not pods:
        raise FileNotFoundError(f"no log kept for pod {namespace}/{pod}")
    logs = sorted(pods[-1].glob(f"{container}.*.log"), key=lambda p: int(p.name.split(".")[-2]))
    return "".join(cri_log_text(p.read_text(errors="replace")) for p in logs)


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "keep-logs":
        keep_logs(Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]])
    elif sys.argv[1] == "guard":
        guard(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
