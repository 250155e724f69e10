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
    cluster = DevCluster(workdir)
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


def pytest_collection_modifyitems(config, items):
    """Tests that need no dev cluster first: the session's cluster (control plane, three
    kubelets, containerd, CoreDNS, the operator) stays up once started, and its background
    work on these 2 cores slowed the real-model training test by half in CI (1315 s against
    865 s alone). Order within each group is kept."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


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
