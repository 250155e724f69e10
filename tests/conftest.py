"""Shared fixtures: one real dev cluster per test session (started only when a test
asks for it), a namespace per test, and clients for the API server and S3."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import OPERATOR_LOG, SESSION_OPERATOR, OperatorProcess, install_crd, make_namespace

STARTUP_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory):
    from kubetune_dev.devcluster.cluster import DevCluster

    workdir = Path(os.environ.get("KUBETUNE_TEST_WORKDIR") or tmp_path_factory.mktemp("dev-cluster"))
    cluster = DevCluster(workdir, ipex_llm=True)  # tests/e2e/test_ipex_llm_example.py
    cluster.start()
    STARTUP_TIMES["dev cluster (warm cache) start to ready"] = cluster.startup_s
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def api_client(dev_cluster):
    from kubernetes import config

    api = config.new_client_from_config(str(dev_cluster.endpoints.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def core(api_client):
    from kubernetes import client

    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(core):
    with make_namespace(core) as name:
        yield name


@pytest.fixture(scope="session")
def s3(dev_cluster):
    return dev_cluster.s3_client()


# What a test needs, as markers (pyproject.toml declares them): `tools` the built binaries
# or images but no cluster, `cluster` the dev cluster (which runs on the binaries: a test
# carries one of the two), `slow` a model trained or a long run, `gpu` a device. `make unit`
# runs the tests that carry none. A fixture that brings one of these needs, used by a test
# directly or through other fixtures, makes its marker required:
FIXTURE_NEEDS = {
    "dev_cluster": "cluster",  # tests/conftest.py: the session's dev cluster
    "minio": "tools",  # tests/trainer/conftest.py: a real MinIO (the cached binary)
    "tiny_model": "slow",  # tests/trainer/conftest.py: the tiny Llama, trained tokenizer and all
}
NEEDS_TOOLS = ("tools", "cluster")  # the markers under which the Go-built binaries may be used


def marker_errors(items) -> list[str]:
    """Tests whose markers do not say what their fixtures need, or say it twice."""
    errors = []
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        for fixture in getattr(item, "fixturenames", ()):
            need = FIXTURE_NEEDS.get(fixture)
            if need and need not in marks:
                errors.append(f"{item.nodeid}: uses the `{fixture}` fixture but is not marked `{need}`")
        if {"tools", "cluster"} <= marks:
            errors.append(f"{item.nodeid}: marked both `tools` and `cluster` (`cluster` implies the tools)")
    return errors


def pytest_collection_modifyitems(config, items):
    """Markers checked against fixtures first (collection fails, naming each test, when a
    marker is missing). Then the tests that need no dev cluster first: the session's cluster
    (control plane, three kubelets, containerd, CoreDNS, the operator) stays up once started,
    and its background work on these 2 cores slowed the real-model training test by half in
    CI (1315 s against 865 s alone). Order within each group is kept."""
    errors = marker_errors(items)
    if errors:
        raise pytest.UsageError("test markers do not say what the tests need:\n  " + "\n  ".join(errors))
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


@pytest.fixture(autouse=True)
def _binaries_only_when_marked(request, monkeypatch):
    """A test marked neither `tools` nor `cluster` gets no Go-built binary: tool_binary and
    tool_dirs (kubectl, helm, minio, the cluster's pieces) raise, naming the marker, so a
    test that needs them cannot hide in `make unit`'s selection. Session fixtures are set
    up before this (and only by marked tests: marker_errors)."""
    if any(request.node.get_closest_marker(m) for m in NEEDS_TOOLS):
        return
    from kubetune_dev.devcluster import tools

    def refuse():
        raise RuntimeError(
            f"{request.node.nodeid} asks for the Go-built binaries (hack/build-tools.sh) but is "
            "marked neither `tools` nor `cluster`: mark it (pytestmark = pytest.mark.tools)"
        )

    monkeypatch.setattr(tools, "_tool_dir_names", refuse)


def pytest_terminal_summary(terminalreporter):
    for what, seconds in STARTUP_TIMES.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f} s (target < 20 s)")


@pytest.fixture(scope="session")
def crd_installed(api_client):
    from kubetune_dev.crd import ADAPTER_CRD_FILE, CRD_FILE

    install_crd(api_client, CRD_FILE)
    install_crd(api_client, ADAPTER_CRD_FILE)
    return True


@pytest.fixture(scope="session")
def operator(dev_cluster, crd_installed):
    """The operator, running for real against the session's dev cluster."""
    from kubetune_dev.devcluster.procs import free_port

    log = dev_cluster.workdir / "logs" / "operator.log"
    OPERATOR_LOG[:] = [log]
    proc = OperatorProcess(dev_cluster.endpoints.kubeconfig, log, free_port(), dev_cluster.operator_env())
    SESSION_OPERATOR[:] = [proc]
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def custom(api_client):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)
