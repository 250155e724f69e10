"""Shared fixtures: one real dev cluster per test session (started only when a test
asks for it), a namespace per test, and clients for the API server and S3."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.helpers import OperatorProcess, install_crd, wait_for

STARTUP_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory):
    from kubetune.devcluster.cluster import DevCluster

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
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    # the ServiceAccount controller must have made "default" before pods can be created
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, "default ServiceAccount")
    yield name
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:  # jobs first, or their operator would replace the pods deleted below
        client.CustomObjectsApi(core.api_client).delete_collection_namespaced_custom_object(
            "kubetune.io", "v1alpha1", name, "finetunejobs"
        )
    except ApiException as e:
        if e.status != 404:
            raise
    # free the nodes for the next test: GPUs held by this test's pods must be released
    core.delete_collection_namespaced_pod(name)
    wait_for(lambda: not core.list_namespaced_pod(name).items, 60, f"the pods of {name} to go")
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3(dev_cluster):
    import boto3

    ep = dev_cluster.endpoints
    return boto3.client(
        "s3",
        endpoint_url=ep.s3,
        aws_access_key_id=ep.s3_access_key,
        aws_secret_access_key=ep.s3_secret_key,
        region_name="us-east-1",
    )


def pytest_terminal_summary(terminalreporter):
    for what, seconds in STARTUP_TIMES.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f} s (target < 20 s)")


@pytest.fixture(scope="session")
def crd_installed(api_client):
    from kubetune.crd import CRD_FILE

    install_crd(api_client, CRD_FILE)
    return True


@pytest.fixture(scope="session")
def operator(dev_cluster, crd_installed):
    """The operator, running for real against the session's dev cluster."""
    from kubetune.devcluster.procs import free_port

    proc = OperatorProcess(
        dev_cluster.endpoints.kubeconfig, dev_cluster.workdir / "logs" / "operator.log", free_port()
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def custom(api_client):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)
