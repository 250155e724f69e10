"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import uuid
from pathlib import Path

from kubetune.api import GROUP, VERSION
from kubetune_dev.devcluster.cluster import REPO_ROOT
from kubetune_dev.devcluster.procs import wait_for  # the one poll-until helper, for tests too

SQL_DATA = REPO_ROOT / "examples" / "data" / "text-to-sql"

# What a FineTuneJob needs and no more: a model, data, where checkpoints and the adapter
# go, and an accelerator.
MINIMAL_SPEC = {
    "model": {"name": "org/m"},
    "dataset": {"uri": "s3://data-x/d/"},
    "checkpoint": {"uri": "s3://ck-x/c/"},
    "output": {"uri": "s3://out-x/o/"},
    "resources": {"accelerator": "nvidia"},
}


def finetune_job(
    name: str = "j",
    spec: dict | None = None,
    *,
    metadata: dict | None = None,
    status: dict | None = None,
    typed: bool = True,
    **fields,
) -> dict:
    """A FineTuneJob object, the one factory of the tests: `spec` (MINIMAL_SPEC unless
    given; copied) with each of `fields` replacing that top-level spec field whole, as a
    user's edit of the field would (model={"uri": ...} drops the base's name: no deep
    merge, which would leave both). `metadata` adds to the name (namespace, uid, ...);
    `status` is set when given; `typed` adds apiVersion and kind, as a manifest has them
    (what the operator's pure functions get in unit tests comes without)."""
    job: dict = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob"} if typed else {}
    job["metadata"] = {"name": name, **copy.deepcopy(metadata or {})}
    job["spec"] = {**copy.deepcopy(MINIMAL_SPEC if spec is None else spec), **fields}
    if status is not None:
        job["status"] = copy.deepcopy(status)
    return job


# requirements/*.lock: the pins every environment installs (tests/unit/test_lock.py checks them)
LOCKS = REPO_ROOT / "requirements"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def train_events(log: str) -> list[dict]:
    """The trainer's "train" log events (one JSON line per logging step), in order."""
    return [
        json.loads(line.split("kubetune.train: ", 1)[1])
        for line in log.splitlines()
        if '"event": "train"' in line
    ]


def read_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes), from a pip-compile/uv style lock (continuations joined)."""
    from packaging.utils import canonicalize_name

    text = re.sub(r"\\\n", " ", path.read_text())
    pins = {}
    for line in text.splitlines():
        m = PIN.match(line.strip())
        if m:
            hashes = frozenset(HASH.findall(line))
            assert hashes, f"{path.name}: {m['name']} has no hash"
            pins[canonicalize_name(m["name"])] = (m["version"], hashes)
    return pins


def kubectl(dev_cluster, namespace: str, *args: str, check: bool = True):
    """kubectl against the dev cluster, in a namespace; the finished process (text).
    The project's own kubectl (hack/build-tools.sh), at the API server's version."""
    import subprocess

    from kubetune_dev.devcluster.tools import tool_binary

    cmd = [
        str(tool_binary("kubectl")),
        "--kubeconfig",
        str(dev_cluster.endpoints.kubeconfig),
        "-n",
        namespace,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def sql_records(split: str = "train") -> list[dict]:
    """The shipped text-to-SQL records (examples/data/text-to-sql/<split>/)."""
    return [
        json.loads(line)
        for shard in sorted((SQL_DATA / split).glob("*.jsonl"))
        for line in shard.read_text().splitlines()
    ]


def tiny_sql_llama(dest: Path, **kw) -> Path:
    """A tiny random Llama whose tokenizer is trained on the shipped text-to-SQL data."""
    from kubetune_dev.local_models import tiny_llama

    texts = [f"{r['question']}\n{r['context']}\n{r['answer']}" for r in sql_records()]
    return tiny_llama(dest, texts, **kw)


OPERATOR_LOG: list = []  # the session operator's log (set by its fixture), for failure messages
SESSION_OPERATOR: list = []  # the session operator (set by its fixture), to pause it where needed


class OperatorProcess:
    """The real operator (`python -m kubetune run`) as a subprocess of the test session."""

    def __init__(
        self,
        kubeconfig,
        log_path,
        metrics_port: int,
        env: dict | None = None,
        progress_interval_s: float = 1.0,
        verbose: bool = True,
        args: tuple = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.metrics_port = metrics_port
        self.env = env or {}  # the dev cluster's image settings (DevCluster.operator_env)
        self.progress_interval_s = progress_interval_s
        # a line per reconcile, what a failed test's message shows; a benchmark turns it off
        # (a log line per reconcile would be part of the CPU it measures)
        self.verbose = verbose
        self.args = tuple(args)  # more `kubetune run` flags (-n, --leader-elect, ...)
        self.proc = None

    def start(self) -> None:
        import os
        import subprocess
        import sys

        from kubetune_dev.devcluster.cluster import repo_pythonpath

        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": repo_pythonpath(),
            **self.env,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune",
                "run",
                f"--metrics-port={self.metrics_port}",
                "--metrics-address=127.0.0.1",
                f"--progress-interval={self.progress_interval_s:g}",
                *(["--verbose"] if self.verbose else []),
                *self.args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def stop(self, sig=None) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        import signal

        self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def install_crd(api_client, path) -> None:
    from pathlib import Path

    import yaml
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    crd = yaml.safe_load(Path(path).read_text())
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as e:
        if e.status != 409:
            raise
        crd["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(
            crd["metadata"]["name"]
        ).metadata.resource_version
        ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)
    wait_established(ext, crd["metadata"]["name"])


def wait_established(ext, name: str) -> None:
    """Wait until the API server serves the CRD `name`."""
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(name).status.conditions or []
        ),
        30,
        f"CRD {name} to be established",
    )


def empty_namespace(core, name: str) -> None:
    """Delete a namespace's jobs, then its pods, and wait for the pods to be gone (freeing
    the fake GPUs, and their nodes, for what comes next)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:  # jobs first, or their operator would replace the pods deleted below
        client.CustomObjectsApi(core.api_client).delete_collection_namespaced_custom_object(
            "kubetune.io", "v1alpha1", name, "finetunejobs"
        )
    except ApiException as e:
        if e.status != 404:
            raise
    core.delete_collection_namespaced_pod(name)
    wait_for(lambda: not core.list_namespaced_pod(name).items, 60, f"the pods of {name} to go")


@contextlib.contextmanager
def make_namespace(core):
    """A fresh namespace; on exit it is emptied (jobs, then pods) and deleted."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    # the ServiceAccount controller must have made "default" before pods can be created
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, "default ServiceAccount")
    try:
        yield name
    finally:
        empty_namespace(core, name)
        core.delete_namespace(name)
