"""Each trainer process gets threads for its share of the pod's CPU request, not the node's
core count: two CPU trainers on one node would otherwise run twice the threads the cores
take (measured ~10x slower on the dev cluster)."""

from __future__ import annotations

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.manifests import build_pod
from kubetune_trainer.launch import process_env


def spec(cpu: str, procs: int) -> FineTuneJobSpec:
    resources = (
        {"accelerator": "cpu", "cpu": cpu}
        if procs == 1
        else {"accelerator": "nvidia", "cpu": cpu, "gpusPerWorker": procs}
    )
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "m"},
            "dataset": {"uri": "s3://bkt/d/"},
            "checkpoint": {"uri": "s3://bkt/c/"},
            "output": {"uri": "s3://bkt/o/"},
            "resources": resources,
        }
    )


def test_the_pod_gets_its_cpu_request_in_whole_cores_from_the_downward_api():
    container = build_pod("j", "uid", spec("500m", 1), attempt=1, rank=0, preemptions=0)["spec"][
        "containers"
    ][0]
    env = {e["name"]: e for e in container["env"]}
    # the kubelet rounds requests.cpu up to whole cores (divisor 1): 500m -> 1
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": container["name"],
        "resource": "requests.cpu",
    }
    assert container["resources"]["requests"]["cpu"] == "500m"
    assert env["KUBETUNE_BACKEND"]["value"] == "cpu"  # the CUDA image, on a CPU pool


def test_intel_stack_ipex_llm_on_a_cpu_pool_runs_the_ipex_llm_image_and_backend():
    from kubetune.manifests import TRAINER_IMAGES, trainer_image

    job = spec("2", 1).model_copy(deep=True)
    job.resources.intel_stack = "ipex-llm"
    env = {
        e["name"]: e
        for e in build_pod("j", "uid", job, attempt=1, rank=0, preemptions=0)["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_BACKEND"]["value"] == "ipex-llm"
    assert trainer_image(job, environ={}) == TRAINER_IMAGES["ipex-llm"]
    assert (
        trainer_image(job, environ={"KUBETUNE_TRAINER_IMAGE_IPEX_LLM": "r/ipex@sha256:1"})
        == "r/ipex@sha256:1"
    )
    # the default stack on a CPU pool: the CUDA image's cpu backend, as before
    assert trainer_image(spec("2", 1), environ={}) == TRAINER_IMAGES["cpu"]


@pytest.mark.parametrize(
    ("cores", "procs", "expected"), [("1", 1, "1"), ("2", 1, "2"), ("8", 4, "2"), ("1", 4, "1")]
)
def test_a_pods_processes_share_its_cores(cores, procs, expected):
    environ = {"OMP_NUM_THREADS": cores, "KUBETUNE_PROCS_PER_WORKER": str(procs)}
    assert process_env(environ, local_rank=0)["OMP_NUM_THREADS"] == expected


def test_without_the_setting_torch_keeps_its_default():
    assert "OMP_NUM_THREADS" not in process_env({"KUBETUNE_PROCS_PER_WORKER": "2"}, local_rank=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "lora"}, "qlora only"),
        ({"output": {"uri": "s3://bkt/o/", "mergedModel": True}}, "adapter only"),
        ({"quantization": {"computeDtype": "bfloat16"}}, "float32 only"),
        ({"workers": 2}, "one worker"),
    ],
)
def test_what_ipex_llm_on_cpu_cannot_do_is_refused_at_admission(change, message):
    from pydantic import ValidationError

    body = {
        "model": {"name": "m"},
        "dataset": {"uri": "s3://bkt/d/"},
        "checkpoint": {"uri": "s3://bkt/c/"},
        "output": {"uri": "s3://bkt/o/"},
        "method": "qlora",
        "resources": {"accelerator": "cpu", "intelStack": "ipex-llm"},
    }
    FineTuneJobSpec.model_validate(body)  # as it is: fine
    with pytest.raises(ValidationError, match=message):
        FineTuneJobSpec.model_validate({**body, **change})
    # the same settings on the default CPU stack are fine
    FineTuneJobSpec.model_validate({**body, **change, "resources": {"accelerator": "cpu"}})


def test_ipex_llm_on_intel_gpus_runs_its_xpu_image_and_never_falls_back_to_the_cpu():
    from kubetune.manifests import REQUIRE_XPU_ENV, TRAINER_IMAGES, trainer_image

    job = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "m"},
            "dataset": {"uri": "s3://bkt/d/"},
            "checkpoint": {"uri": "s3://bkt/c/"},
            "output": {"uri": "s3://bkt/o/"},
            "resources": {"accelerator": "intel", "intelStack": "ipex-llm"},
        }
    )
    assert trainer_image(job, environ={}) == TRAINER_IMAGES["ipex-llm-xpu"]
    env = {
        e["name"]: e
        for e in build_pod("j", "uid", job, attempt=1, rank=0, preemptions=0)["spec"]["containers"][0]["env"]
    }
    assert env[REQUIRE_XPU_ENV]["value"] == "1" and "KUBETUNE_BACKEND" not in env  # the image's own
