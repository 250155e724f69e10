"""examples/text-to-sql-ipex-llm-cpu.yaml end to end: seed 0's shape (text-to-SQL, QLoRA
through ipex-llm + IPEX) on a CPU pool of the dev cluster. The operator picks the
trainer-ipex-llm image (trainer_image/Dockerfile.ipex-llm, built by `make test`) for
resources.intelStack: ipex-llm, a runner node's kubelet runs it, and the trainer trains
SmolLM2 from the cluster's MinIO in 4 bits with ipex-llm's CPU kernels and uploads an
adapter that stock peft reads."""

from __future__ import annotations

import json

import pytest
import yaml

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune_dev.devcluster.minio import upload_tree
from tests.e2e.helpers import pod_log, status, wait_status
from tests.helpers import REPO_ROOT, SQL_DATA, make_namespace

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXAMPLE = REPO_ROOT / "examples" / "text-to-sql-ipex-llm-cpu.yaml"
# the example's 60 steps take ~8 min on 2 cores; the pipeline is the same at 6
STEPS = 6


def ensure_bucket(s3, name: str) -> None:
    if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=name)


def test_the_ipex_llm_example_trains_in_its_image_on_a_cpu_runner(operator, custom, core, s3, dev_cluster):
    from kubetune_dev.local_models import cached_smollm2

    image = dev_cluster.images.trainer_ipex_llm
    assert image, "the ipex-llm trainer image is not built: make test builds it (make ipex-llm)"
    job = yaml.safe_load(EXAMPLE.read_text())
    spec = job["spec"]
    for bucket in ("models", "datasets", "runs"):
        ensure_bucket(s3, bucket)
    upload_tree(s3, "models", "SmolLM2-135M-Instruct", cached_smollm2())
    upload_tree(s3, "datasets", "text-to-sql", SQL_DATA)
    with make_namespace(core) as ns:
        core.create_namespaced_secret(ns, dev_cluster.s3_secret(spec["storage"]["secretRef"]["name"]))
        # what differs from the file: this cluster's MinIO, a run of its own, fewer steps
        spec["storage"]["endpoint"] = dev_cluster.endpoints.s3
        spec["checkpoint"]["uri"] = f"s3://runs/{ns}/checkpoints/"
        spec["output"]["uri"] = f"s3://runs/{ns}/adapter/"
        spec["training"].update(maxSteps=STEPS, loggingSteps=2)
        spec["checkpoint"]["everySteps"] = 3
        name = job["metadata"]["name"]
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)

        pod_name = f"{name}-a1-w0"
        st = wait_status(
            custom, ns, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), 900, f"{name} to end"
        )
        log = pod_log(dev_cluster, ns, pod_name)
        assert st["phase"] == "Succeeded", f"{st}\n{log[-4000:]}"

        pod = core.read_namespaced_pod(pod_name, ns)
        container = pod.spec.containers[0]
        assert container.image == image
        assert {e.name: e.value for e in container.env}["KUBETUNE_BACKEND"] == "ipex-llm"
        assert "backend ipex-llm" in log and "quantized to sym_int4" in log, log[-4000:]

        assert st["adapter"]["uri"] == spec["output"]["uri"]
        prefix = f"{ns}/adapter/"
        config = json.loads(s3.get_object(Bucket="runs", Key=prefix + "adapter_config.json")["Body"].read())
        assert config["peft_type"] == "LORA" and "training_mode" not in config
        assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
        metrics = json.loads(s3.get_object(Bucket="runs", Key=prefix + "metrics.json")["Body"].read())
        assert metrics["steps"] == STEPS and metrics["low_bit"] == "sym_int4"
        # every step's loss at a pretrained model's level (a misread or garbled 4-bit base
        # starts near ln(49152) = 10.8); learning itself: tests/trainer/test_ipex_llm.py
        losses = [loss for _, loss in metrics["history"]]
        assert len(losses) == STEPS and all(0 < loss < 4 for loss in losses), losses
        assert status(custom, ns, name)["evaluation"]["evalLoss"] > 0
