"""A kubelet stand-in for the dev cluster's runner nodes: pods bound to them run as real
local processes, each with its own 127.0.0.N pod IP, and report their state, exit code
and termination message as a kubelet would. Deleting a pod sends SIGTERM, then SIGKILL
after its grace period; a pod or node that vanishes without grace is SIGKILLed at once.

    python -m kubetune.devcluster.podrunner --kubeconfig K --workdir D --nodes-file N
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from . import podspec, procs

log = logging.getLogger("pod-runner")

LEASE_RENEW_S = 5.0
LEASE_DURATION_S = 40
# What the "image" provides: the runner's interpreter and the tree's packages. Cluster
# credentials and S3 keys of the host are not passed: pods get only what their spec gives.
BASE_ENV_KEYS = (
    "PATH",
    "PYTHONPATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "VIRTUAL_ENV",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "OMP_NUM_THREADS",
    "XDG_CACHE_HOME",
    "KUBETUNE_CACHE",
)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def can_use_mount_namespaces() -> bool:
    """Bind-mounting volumes and the termination-message file needs a private mount
    namespace (root, or an unprivileged-userns kernel). Without it they are skipped."""
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return r.returncode == 0


class IpPool:
    """127.0.0.10 upwards; all of 127/8 reaches loopback on Linux."""

    def __init__(self) -> None:
        self._free: list[str] = []
        self._next = 10
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            if self._free:
                return self._free.pop()
            n, self._next = self._next, self._next + 1
            return f"127.0.{n // 250}.{n % 250 + 1}" if n >= 250 else f"127.0.0.{n}"

    def give(self, ip: str) -> None:
        with self._lock:
            self._free.append(ip)


@dataclass
class RunnerPod:
    uid: str
    name: str
    namespace: str
    node: str
    ip: str
    dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    deleting: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def signal_all(self, sig: int) -> None:
        with self.lock:
            for p in self.procs.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, sig)

    def request_stop(self, grace_s: float, deleting: bool = True) -> None:
        """Graceful stop: SIGTERM now, SIGKILL once the grace period is over. A deleted
        pod's object is removed once its containers are gone."""
        if self.stop.is_set():
            return
        self.deleting = deleting
        self.stop.set()
        self.signal_all(signal.SIGTERM)
        timer = threading.Timer(max(grace_s, 0), self.signal_all, args=(signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    def kill_now(self) -> None:
        self.stop.set()
        self.signal_all(signal.SIGKILL)


class Hosts:
    """The /etc/hosts every pod sees (bind-mounted over its own): the host's, plus the
    headless-Service names of the pods running now. Rewritten in place — a bind mount
    holds the inode — new content first, then truncated, so a reader never sees it empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        self.entries: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.path.write_text(podspec.hosts_file(self.base, {}))

    def set(self, ip: str, names: list[str] | None) -> None:
        with self.lock:
            if names:
                self.entries[ip] = names
            elif self.entries.pop(ip, None) is None:
                return
            with open(self.path, "r+") as f:
                f.write(podspec.hosts_file(self.base, self.entries))
                f.truncate()


class PodRunner:
    def __init__(self, api: client.ApiClient, nodes: list[dict], workdir: Path) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self.node_specs = {n["metadata"]["name"]: n for n in nodes}
        self.live_nodes = set(self.node_specs)
        self.workdir = workdir
        self.pods: dict[str, RunnerPod] = {}
        self.lock = threading.Lock()
        self.ips = IpPool()
        self.mount_ns = can_use_mount_namespaces()
        workdir.mkdir(parents=True, exist_ok=True)
        self.hosts = Hosts(workdir / "hosts")
        self.stopping = threading.Event()
        self.base_env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        self.base_env["PATH"] = os.pathsep.join(
            [str(Path(sys.executable).parent), self.base_env.get("PATH", "/usr/bin:/bin")]
        )
        host = api.configuration.host.split("://", 1)[-1]
        self.base_env["KUBERNETES_SERVICE_HOST"], _, port = host.rpartition(":")
        self.base_env["KUBERNETES_SERVICE_PORT"] = port

    # -- nodes ----------------------------------------------------------------------------

    def register_nodes(self) -> None:
        for name, manifest in self.node_specs.items():
            try:
                self.core.create_node(manifest)
            except ApiException as e:
                if e.status != 409:
                    raise
            self.core.patch_node_status(name, {"status": self._node_status(manifest)})

    def _node_status(self, manifest: dict) -> dict:
        t = now()

        def cond(kind: str, status: str, reason: str) -> dict:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": reason,
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }

        return {
            **manifest["status"],
            "conditions": [
                cond("Ready", "True", "KubeletReady"),
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": manifest["metadata"]["name"]},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "kubetune pod runner",
                "kubeletVersion": "kubetune-runner",
                "containerRuntimeVersion": "runner://local",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
        }

    def heartbeat_forever(self) -> None:
        """Renew each live node's Lease well inside the controller-manager's grace period."""
        while not self.stopping.wait(LEASE_RENEW_S):
            for name in sorted(self.live_nodes):
                try:
                    self._renew_lease(name)
                except ApiException as e:
                    log.warning("lease renewal for %s failed: %s", name, e.reason)

    def _renew_lease(self, node: str) -> None:
        renew = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        try:
            self.leases.patch_namespaced_lease(node, "kube-node-lease", {"spec": {"renewTime": renew}})
        except ApiException as e:
            if e.status != 404:
                raise
            uid = self.core.read_node(node).metadata.uid
            self.leases.create_namespaced_lease(
                "kube-node-lease",
                {
                    "metadata": {
                        "name": node,
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}],
                    },
                    "spec": {
                        "holderIdentity": node,
                        "leaseDurationSeconds": LEASE_DURATION_S,
                        "renewTime": renew,
                    },
                },
            )

    def watch_nodes_forever(self) -> None:
        """A deleted runner node takes its processes with it, at once (hard loss)."""
        while not self.stopping.is_set():
            try:
                for ev in watch.Watch().stream(self.core.list_node, timeout_seconds=300):
                    name = ev["object"].metadata.name
                    if ev["type"] == "DELETED" and name in self.live_nodes:
                        log.info("node %s deleted: killing its pods", name)
                        self.live_nodes.discard(name)
                        with self.lock:
                            lost = [p for p in self.pods.values() if p.node == name]
                        for p in lost:
                            p.kill_now()
            except Exception as e:  # watch dropped: resume
                log.warning("node watch restarted: %s", e)
                time.sleep(1)

    # -- pods -----------------------------------------------------------------------------

    def watch_pods_forever(self, node: str) -> None:
        selector = f"spec.nodeName={node}"
        while not self.stopping.is_set() and node in self.live_nodes:
            try:
                listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                seen = set()
                for pod in listed.items:
                    seen.add(pod.metadata.uid)
                    self.handle("ADDED", self.api.sanitize_for_serialization(pod))
                with self.lock:
                    gone = [p for p in self.pods.values() if p.node == node and p.uid not in seen]
                for p in gone:
                    p.kill_now()
                for ev in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    self.handle(ev["type"], self.api.sanitize_for_serialization(ev["object"]))
            except Exception as e:  # 410 Gone or a dropped connection: list again
                log.warning("pod watch on %s restarted: %s", node, e)
                time.sleep(0.5)

    def handle(self, kind: str, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.lock:
            rp = self.pods.get(uid)
        if kind == "DELETED":
            if rp:
                rp.kill_now()  # force-deleted (grace 0, or by PodGC): no grace left to give
                with self.lock:
                    self.pods.pop(uid, None)
            return
        if meta.get("deletionTimestamp"):
            if rp is None or rp.finished.is_set():
                self._remove(pod)
            else:
                rp.request_stop(float(meta.get("deletionGracePeriodSeconds") or 0))
            return
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if rp is not None or phase in ("Succeeded", "Failed"):
            return
        if phase == "Running":
            # Running here but not by us: the runner restarted and its processes died with it.
            self._report_lost(pod)
            return
        rp = RunnerPod(
            uid,
            meta["name"],
            meta["namespace"],
            pod["spec"]["nodeName"],
            self.ips.take(),
            self.workdir / f"{meta['namespace']}_{meta['name']}_{uid[:8]}",
        )
        with self.lock:
            self.pods[uid] = rp
        threading.Thread(
            target=self._run_pod, args=(rp, pod), name=f"pod-{meta['name']}", daemon=True
        ).start()

    def _lookup(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            if kind == "secret":
                data = self.core.read_namespaced_secret(name, namespace).data or {}
                return {k: base64.b64decode(v).decode() for k, v in data.items()}
            return self.core.read_namespaced_config_map(name, namespace).data or {}
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _patch_status(self, rp: RunnerPod, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(rp.name, rp.namespace, {"status": status})
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("status patch of %s/%s failed: %s", rp.namespace, rp.name, e.reason)

    def _remove(self, pod: dict) -> None:
        """The kubelet's last word on a pod whose containers are gone: delete it for good."""
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("final delete of %s/%s failed: %s", meta["namespace"], meta["name"], e.reason)

    def _report_lost(self, pod: dict) -> None:
        t = now()
        state = podspec.terminated_state(137, t, t, "the dev pod runner restarted; the process is gone")
        self.core.patch_namespaced_pod_status(
            pod["metadata"]["name"],
            pod["metadata"]["namespace"],
            {
                "status": {
                    "phase": "Failed",
                    "conditions": podspec.pod_conditions(t, ready=False),
                    "containerStatuses": [
                        podspec.container_status(c, {"terminated": state}, False)
                        for c in pod["spec"]["containers"]
                    ],
                }
            },
        )

    # -- one pod's life -------------------------------------------------------------------

    def _run_pod(self, rp: RunnerPod, pod: dict) -> None:
        try:
            self._live(rp, pod)
        except Exception:
            log.exception("pod %s/%s: runner error", rp.namespace, rp.name)
        finally:
            rp.finished.set()
            if rp.deleting:
                self._remove(pod)
            self.hosts.set(rp.ip, None)
            self.ips.give(rp.ip)

    def _live(self, rp: RunnerPod, pod: dict) -> None:
        spec = pod["spec"]
        rp.dir.mkdir(parents=True, exist_ok=True)
        started = now()
        pod = {
            **pod,
            "status": {
                **(pod.get("status") or {}),
                "podIP": rp.ip,
                "podIPs": [{"ip": rp.ip}],
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
            },
        }
        base = {
            "phase": "Pending",
            "podIP": rp.ip,
            "podIPs": [{"ip": rp.ip}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": started,
        }
        containers = spec["containers"]
        self.hosts.set(rp.ip, podspec.hosts_names(pod))

        argvs = self._resolve_until_ok(rp, pod, base)
        if argvs is None:
            return
        mounts = self._volumes(rp, pod)

        for c in spec.get("initContainers") or []:
            code, state = self._run_to_end(rp, pod, c, argvs[c["name"]], mounts)
            if code != 0 or rp.stop.is_set():
                self._patch_status(
                    rp,
                    {
                        **base,
                        "phase": "Failed",
                        "initContainerStatuses": [podspec.container_status(c, state, False)],
                    },
                )
                return

        for c in containers:
            try:
                self._launch(rp, pod, c, argvs[c["name"]], mounts)
            except (OSError, RuntimeError) as e:  # e.g. command not found without a mount namespace
                rp.kill_now()
                t = now()
                failed = {"terminated": podspec.terminated_state(128, t, t, str(e), "StartError")}
                self._patch_status(
                    rp,
                    {
                        **base,
                        "phase": "Failed",
                        "containerStatuses": [podspec.container_status(c, failed, False)],
                    },
                )
                return
        running = {"running": {"startedAt": now()}}
        self._patch_status(
            rp,
            {
                **base,
                "phase": "Running",
                "conditions": podspec.pod_conditions(now(), True),
                "containerStatuses": [
                    podspec.container_status(c, running, True, rp.procs[c["name"]].pid) for c in containers
                ],
            },
        )
        states, codes = [], []
        for c in containers:
            code, state = self._finish(rp, c, running["running"]["startedAt"])
            codes.append(code)
            states.append(podspec.container_status(c, state, False, rp.procs[c["name"]].pid))
        self._patch_status(
            rp,
            {
                **base,
                "phase": podspec.final_phase(codes),
                "conditions": podspec.pod_conditions(now(), False),
                "containerStatuses": states,
            },
        )

    def _resolve_until_ok(self, rp: RunnerPod, pod: dict, base: dict) -> dict[str, list] | None:
        """Like the kubelet, retry while a referenced Secret/ConfigMap is missing."""
        while not rp.stop.is_set():
            try:
                argvs = {}
                for c in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]:
                    env = podspec.container_env(pod, c, {**self.base_env, "HOSTNAME": rp.name}, self._lookup)
                    argvs[c["name"]] = (podspec.container_argv(c, env), env)
                return argvs
            except podspec.ConfigError as e:
                waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                self._patch_status(
                    rp,
                    {
                        **base,
                        "containerStatuses": [
                            podspec.container_status(c, waiting, False) for c in pod["spec"]["containers"]
                        ],
                    },
                )
                rp.stop.wait(2.0)
        return None

    def _volumes(self, rp: RunnerPod, pod: dict) -> dict[str, Path]:
        """Materialize emptyDir, configMap and secret volumes under the pod's directory."""
        out = {}
        for vol in pod["spec"].get("volumes") or []:
            d = rp.dir / "volumes" / vol["name"]
            d.mkdir(parents=True, exist_ok=True)
            for kind, key in (("configmap", "configMap"), ("secret", "secret")):
                if key in vol:
                    ref = vol[key]
                    data = self._lookup(kind, rp.namespace, ref.get("name") or ref.get("secretName")) or {}
                    items = ref.get("items") or [{"key": k, "path": k} for k in data]
                    for item in items:
                        if item["key"] in data:
                            target = d / item["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_text(data[item["key"]])
            out[vol["name"]] = d
        return out

    def _launch(self, rp: RunnerPod, pod: dict, c: dict, argv_env: tuple, volumes: dict[str, Path]) -> None:
        argv, env = argv_env
        name = c["name"]
        term_file = rp.dir / f"{name}.termination-log"
        term_file.write_text("")
        cwd = c.get("workingDir") or str(rp.dir)
        if self.mount_ns:
            binds = [
                (term_file, c.get("terminationMessagePath") or "/dev/termination-log"),
                (self.hosts.path, "/etc/hosts"),
            ]
            binds += [
                (volumes[m["name"]] / (m.get("subPath") or ""), m["mountPath"])
                for m in c.get("volumeMounts") or []
                if m["name"] in volumes
            ]
            binds += self._image_binds([dst for _, dst in binds])
            argv = self._in_mount_ns(binds, cwd, argv, cwd_first=not c.get("workingDir"))
        elif c.get("workingDir"):
            Path(cwd).mkdir(parents=True, exist_ok=True)
        with rp.lock:
            if rp.stop.is_set():
                raise RuntimeError("stopped before start")
            rp.procs[name] = procs.spawn(
                argv, rp.dir / f"{name}.log", env=env, cwd=None if self.mount_ns else Path(cwd)
            )
        log.info(
            "pod %s/%s container %s: pid %d ip %s: %s",
            rp.namespace,
            rp.name,
            name,
            rp.procs[name].pid,
            rp.ip,
            shlex.join(argv[-3:]),
        )

    def _image_binds(self, mount_points: list[str]) -> list[tuple[Path, str]]:
        """What stands in for the image (the tree's packages on PYTHONPATH, the venv) must
        stay visible when a volume is mounted over a folder holding it — e.g. an emptyDir on
        /tmp while the checkout lives under /tmp: bind it back on top, at the same path."""
        paths = [p for p in self.base_env.get("PYTHONPATH", "").split(os.pathsep) if p] + [sys.prefix]
        out = []
        for p in dict.fromkeys(paths):
            if Path(p).is_dir() and any(p == m or p.startswith(m.rstrip("/") + "/") for m in mount_points):
                out.append((Path(p), p))
        return out

    @staticmethod
    def _in_mount_ns(binds: list[tuple[Path, str]], cwd: str, argv: list[str], cwd_first: bool) -> list[str]:
        """Wrap argv to run in a private mount namespace with each bind mounted at its path
        (a missing mount point is created as an empty file or directory). Every source is
        opened before anything is mounted, so a volume mounted over /tmp cannot hide the
        sources that live under it."""
        lines = ["set -e"]
        for fd, (src, _dst) in enumerate(binds, start=10):
            lines.append(f"exec {fd}< {shlex.quote(str(src))}")
        if cwd_first:  # the pod's own directory: enter it before a mount may cover it
            lines.append(f"cd {shlex.quote(cwd)}")
        for fd, (src, dst) in enumerate(binds, start=10):
            d = shlex.quote(dst)
            if Path(src).is_dir():
                lines.append(f"mkdir -p {d}")
            else:
                lines.append(f'mkdir -p "$(dirname {d})"; [ -e {d} ] || : > {d}')
            # --no-canonicalize: mount(8) would otherwise resolve /proc/self/fd/N to the path
            # it names, which the mounts made so far may already cover
            lines.append(f"mount --no-canonicalize --bind /proc/self/fd/{fd} {d}")
            lines.append(f"exec {fd}<&-")
        if not cwd_first:
            lines.append(f"mkdir -p {shlex.quote(cwd)}; cd {shlex.quote(cwd)}")
        lines.append('exec "$@"')
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            "\n".join(lines),
            "bash",
            *argv,
        ]

    def _run_to_end(self, rp, pod, c, argv_env, volumes) -> tuple[int, dict]:
        started = now()
        try:
            self._launch(rp, pod, c, argv_env, volumes)
        except (OSError, RuntimeError) as e:
            return 128, {"terminated": podspec.terminated_state(128, started, now(), str(e), "StartError")}
        return self._finish(rp, c, started)

    def _finish(self, rp: RunnerPod, c: dict, started: str) -> tuple[int, dict]:
        proc = rp.procs[c["name"]]
        code = podspec.exit_code(proc.wait())
        term = rp.dir / f"{c['name']}.termination-log"
        message = term.read_bytes()[:4096].decode(errors="replace") if term.exists() else ""
        if not message and code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = podspec.fallback_message(procs.tail(rp.dir / f"{c['name']}.log", 80))
        log.info("pod %s/%s container %s exited %d", rp.namespace, rp.name, c["name"], code)
        return code, {"terminated": podspec.terminated_state(code, started, now(), message)}

    # -- main -----------------------------------------------------------------------------

    def run(self) -> None:
        if not self.mount_ns:
            log.warning("no private mount namespaces here: volumes and termination messages are skipped")
        self.register_nodes()
        for target in (self.heartbeat_forever, self.watch_nodes_forever):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        for node in self.node_specs:
            threading.Thread(
                target=self.watch_pods_forever, args=(node,), daemon=True, name=f"watch-{node}"
            ).start()
        log.info("pod runner ready for nodes %s", ", ".join(self.node_specs))
        self.stopping.wait()

    def shutdown(self) -> None:
        """Stop as a kubelet going down would: every container gets SIGTERM, then SIGKILL."""
        self.stopping.set()
        with self.lock:
            pods = list(self.pods.values())
        for p in pods:
            p.request_stop(2.0, deleting=False)
        for p in pods:
            p.finished.wait(5.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--nodes-file", required=True, type=Path, help="JSON list of Node manifests to serve")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    runner = PodRunner(
        config.new_client_from_config(args.kubeconfig), json.loads(args.nodes_file.read_text()), args.workdir
    )
    signal.signal(signal.SIGTERM, lambda *_: runner.stopping.set())
    try:
        runner.run()
    finally:
        runner.shutdown()


if __name__ == "__main__":
    main()
