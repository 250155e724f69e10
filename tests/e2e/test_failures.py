"""Failures as the kubelet reports them, end to end: a trainer over its memory limit is
OOM-killed by the kernel and the job says OOMKilled with what to change; an image without
the trainer's code fails with the interpreter's own message. Neither is retried past
backoffLimit, and neither is mistaken for a preemption."""

from __future__ import annotations

import pytest

from kubetune.api import GROUP, PLURAL, VERSION
from tests.e2e.helpers import RUNNER, e2e_job, wait_status

pytestmark = pytest.mark.cluster


def failing_job(name, namespace, model, endpoint, **spec) -> dict:
    job = e2e_job(name, namespace, model, endpoint, **spec)
    job["spec"]["backoffLimit"] = 0
    job["spec"]["spot"] = {"enabled": False}
    job["spec"]["podOverrides"] = {**RUNNER, **job["spec"].get("podOverrides", {})}
    return job


def test_a_trainer_over_its_memory_limit_is_reported_oom_killed(
    operator, custom, core, namespace, s3_secret, tiny_model_in_s3, dev_cluster
):
    job = failing_job("greedy", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3)
    job["spec"]["resources"]["memory"] = "160Mi"  # importing torch alone needs more
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    st = wait_status(
        custom, namespace, "greedy", lambda s: s.get("phase") == "Failed", 180, "the job to fail"
    )
    term = core.read_namespaced_pod("greedy-a1-w0", namespace).status.container_statuses[0].state.terminated
    assert (term.reason, term.exit_code) == ("OOMKilled", 137)  # the kernel's word, through the kubelet
    assert st["reason"] == "BackoffLimitExceeded" and (st["failures"], st["preemptions"]) == (1, 0), st
    assert "OOMKilled" in st["message"] and "resources.memory" in st["message"], st["message"]


def test_an_image_without_the_trainer_fails_with_the_interpreters_message(
    operator, custom, core, namespace, s3_secret, tiny_model_in_s3, dev_cluster
):
    job = failing_job(
        "wrong-image",
        namespace,
        tiny_model_in_s3,
        dev_cluster.endpoints.s3,
        podOverrides={**RUNNER, "image": dev_cluster.images.operator},  # python, but no trainer
    )
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    st = wait_status(
        custom, namespace, "wrong-image", lambda s: s.get("phase") == "Failed", 180, "the job to fail"
    )
    term = (
        core.read_namespaced_pod("wrong-image-a1-w0", namespace).status.container_statuses[0].state.terminated
    )
    # terminationMessagePolicy FallbackToLogsOnError: the kubelet kept the log's tail
    assert term.exit_code == 1 and "No module named kubetune_trainer.__main__" in term.message, term
    assert st["reason"] == "BackoffLimitExceeded" and (st["failures"], st["preemptions"]) == (1, 0), st
    assert "No module named kubetune_trainer.__main__" in st["message"], st["message"]
