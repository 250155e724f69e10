"""End-to-end fixtures: the tiny model and the shipped data in the dev cluster's MinIO
(once per session), the S3 Secret in a test's namespace, runner nodes uncordoned after."""

from __future__ import annotations

import pytest

from kubetune_dev.devcluster.nodes import RUNNER_LABEL
from tests.e2e.helpers import upload_tiny_model_and_data
from tests.helpers import tiny_sql_llama


@pytest.fixture(scope="session")
def tiny_model_in_s3(s3, tmp_path_factory):
    return upload_tiny_model_and_data(s3, tiny_sql_llama(tmp_path_factory.mktemp("e2e-model") / "tiny"))


@pytest.fixture
def s3_secret(core, namespace, dev_cluster):
    core.create_namespaced_secret(namespace, dev_cluster.s3_secret("s3"))
    return "s3"


@pytest.fixture
def uncordon(core):
    yield
    for node in core.list_node(label_selector=RUNNER_LABEL).items:
        if node.spec.unschedulable:
            core.patch_node(node.metadata.name, {"spec": {"unschedulable": False}})
