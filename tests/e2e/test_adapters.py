"""The adapter library end to end: the real operator registers each succeeded job's
adapter as an Adapter object, a second job warm-starts from the first by name, the
library outlives the jobs and is rebuilt from MinIO in a fresh namespace, exports name
folders and URIs a server loads, and a changed object in S3 is caught and never served."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from kubetune.api import ADAPTER_PLURAL, GROUP, PLURAL, VERSION
from kubetune_dev.devcluster.cluster import repo_pythonpath
from kubetune_trainer.library import BASE_LABEL, label_value
from tests.e2e.helpers import e2e_job, pod_log, wait_status
from tests.helpers import kubectl, make_namespace, wait_for

pytestmark = pytest.mark.cluster
STEPS = 12


def adapters_cli(dev_cluster, ns: str, *args: str) -> subprocess.CompletedProcess:
    """`kubetune adapters ...` as a user runs it, against the dev cluster."""
    cmd = [
        sys.executable,
        "-m",
        "kubetune",
        "adapters",
        "--kubeconfig",
        str(dev_cluster.endpoints.kubeconfig),
    ]
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    return subprocess.run([*cmd, "-n", ns, *args], capture_output=True, text=True, env=env, timeout=300)


def get_adapter(custom, ns: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, ADAPTER_PLURAL, name)


def small_job(name: str, ns: str, model_uri: str, endpoint: str, **spec) -> dict:
    job = e2e_job(name, ns, model_uri, endpoint, **spec)
    job["spec"]["training"].update(maxSteps=STEPS)
    job["spec"]["checkpoint"]["everySteps"] = 6
    job["spec"]["spot"] = {"enabled": False}
    job["spec"]["dataset"]["validation"]["generate"] = 4  # an exact match for the METRIC column
    return job


def succeeded(custom, ns: str, name: str) -> dict:
    return wait_status(
        custom,
        ns,
        name,
        lambda st: st.get("phase") in ("Succeeded", "Failed"),
        600,
        f"{name} to finish",
    )


def status_of_a_done(custom, ns: str) -> bool:
    st = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "sql-a").get("status") or {}
    return st.get("phase") in ("Succeeded", "Failed")


def test_jobs_register_adapters_that_outlive_them_and_a_bucket_rebuilds_the_library(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, tmp_path
):
    ep = dev_cluster.endpoints.s3
    ns = namespace
    custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, small_job("sql-a", ns, tiny_model_in_s3, ep)
    )
    # B, warm-started from A by name and applied at once (a pipeline): it waits for A's adapter
    warm = small_job("sql-b", ns, tiny_model_in_s3, ep)
    warm["spec"]["lora"]["initFrom"] = {"adapter": "sql-a"}
    warm["spec"]["dataset"]["uri"] = "s3://e2e-data/sql/eval/"
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, warm)
    waiting = wait_status(
        custom, ns, "sql-b", lambda st: st.get("reason") == "WaitingForAdapter", 60, "sql-b to wait"
    )
    assert waiting["phase"] == "Pending" and not status_of_a_done(custom, ns)
    first = succeeded(custom, ns, "sql-a")
    assert first["phase"] == "Succeeded", first
    assert first["adapter"]["name"] == "sql-a"
    job_a = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "sql-a")
    a = get_adapter(custom, ns, "sql-a")
    assert not a["metadata"].get("ownerReferences")  # not the job's: it outlives it
    assert a["spec"]["adapter"] == {k: first["adapter"][k] for k in ("uri", "sha256", "sizeBytes")}
    assert a["spec"]["source"] == {"name": "sql-a", "namespace": ns, "uid": job_a["metadata"]["uid"]}
    assert a["spec"]["base"]["model"] == tiny_model_in_s3.rstrip("/")
    assert len(a["spec"]["base"]["fingerprint"]) == 64 and a["spec"]["dataset"]["shards"] >= 1
    assert a["spec"]["evaluation"] == first["evaluation"] and len(a["spec"]["evaluation"]["samples"]) == 3
    assert a["spec"]["storage"] == {"endpoint": ep, "region": "us-east-1", "secretName": "s3"}
    # the same record beside the adapter in S3 (less the cluster's S3 access)
    prefix = f"{ns}/sql-a/out/"
    in_s3 = json.loads(s3.get_object(Bucket="e2e-runs", Key=prefix + "adapter.json")["Body"].read())
    assert in_s3["adapter"] == a["spec"]["adapter"] and in_s3["dataset"] == a["spec"]["dataset"]
    assert in_s3["base"] == a["spec"]["base"] and in_s3["source"] == a["spec"]["source"]

    # a mismatched warm start is refused before any pod: another adapter shape
    bad = small_job("sql-bad", ns, tiny_model_in_s3, ep)
    bad["spec"]["lora"] = {"r": 4, "alpha": 8, "initFrom": {"adapter": "sql-a"}}
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, bad)
    refused = succeeded(custom, ns, "sql-bad")
    assert refused["phase"] == "Failed" and refused["reason"] == "InvalidSpec", refused
    assert "LoRA rank is 8" in refused["message"], refused["message"]
    assert not core.list_namespaced_pod(ns, label_selector="kubetune.io/job=sql-bad").items

    # B starts once A's adapter is registered, from its weights, on other data
    second = succeeded(custom, ns, "sql-b")
    assert second["phase"] == "Succeeded", second
    assert second["initFrom"] == {
        "adapter": "sql-a",
        "uri": a["spec"]["adapter"]["uri"],
        "sha256": a["spec"]["adapter"]["sha256"],
    }
    assert "warm start: " in pod_log(dev_cluster, ns, "sql-b-a1-w0")
    b = get_adapter(custom, ns, "sql-b")
    assert b["spec"]["initFrom"]["adapter"] == "sql-a"
    assert b["spec"]["dataset"]["fingerprint"] != a["spec"]["dataset"]["fingerprint"]
    assert b["spec"]["base"]["fingerprint"] == a["spec"]["base"]["fingerprint"]

    # kubectl lists both by their base's label, with their metric
    base = f"{BASE_LABEL}={label_value(a['spec']['base']['model'])}"
    listed = kubectl(dev_cluster, ns, "get", "ad", "-l", base).stdout
    rows = {line.split()[0]: line.split() for line in listed.splitlines()[1:]}
    assert set(rows) == {"sql-a", "sql-b"}, listed
    assert float(rows["sql-a"][3]) == first["evaluation"]["exactMatch"], listed
    listed = adapters_cli(dev_cluster, ns, "list", "--base", tiny_model_in_s3, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [x["metadata"]["name"] for x in json.loads(listed.stdout)["items"]] == ["sql-a", "sql-b"]
    compared = adapters_cli(dev_cluster, ns, "compare", "sql-a", "sql-b")
    assert compared.returncode == 0 and "dataset fingerprint" in compared.stdout, compared

    # the jobs go; the library stays
    for job in ("sql-a", "sql-b", "sql-bad"):
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    wait_for(
        lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
        60,
        "jobs deleted",
    )
    assert {
        x["metadata"]["name"]
        for x in custom.list_namespaced_custom_object(GROUP, VERSION, ns, ADAPTER_PLURAL)["items"]
    } == {"sql-a", "sql-b"}

    # a fresh namespace rebuilds the library from the bucket
    with make_namespace(core) as fresh:
        core.create_namespaced_secret(fresh, dev_cluster.s3_secret("s3"))
        imported = adapters_cli(
            dev_cluster, fresh, "import", f"s3://e2e-runs/{ns}/", "--secret", "s3", "--endpoint", ep
        )
        assert imported.returncode == 0, imported.stderr
        assert "2 imported" in imported.stdout, imported.stdout
        for name, original in (("sql-a", a), ("sql-b", b)):
            copy = get_adapter(custom, fresh, name)
            for part in ("adapter", "base", "dataset", "lora", "evaluation", "source", "task"):
                assert copy["spec"].get(part) == original["spec"].get(part), (name, part)
            assert copy["metadata"]["labels"][BASE_LABEL] == original["metadata"]["labels"][BASE_LABEL]
            verified = [c for c in copy["status"]["conditions"] if c["type"] == "Verified"]
            assert verified[0]["status"] == "True", verified

        # serving handoff: each format parses and names the right adapters
        vllm = adapters_cli(
            dev_cluster,
            fresh,
            "export",
            "--base",
            tiny_model_in_s3,
            "--format",
            "vllm",
            "--dir",
            str(tmp_path / "served"),
        )
        assert vllm.returncode == 0, vllm.stderr
        served = json.loads(vllm.stdout)
        assert served["model"] == tiny_model_in_s3.rstrip("/") and "--enable-lora" in served["args"]
        modules = [json.loads(x) for x in served["args"][served["args"].index("--lora-modules") + 1 :]]
        assert {m["name"] for m in modules} == {"sql-a", "sql-b"}
        _load_with_peft(s3, tmp_path, [m["path"] for m in modules])
        kserve = yaml.safe_load(
            adapters_cli(
                dev_cluster, fresh, "export", "--base", tiny_model_in_s3, "--format", "kserve"
            ).stdout
        )
        assert kserve["kind"] == "LLMInferenceService"
        assert {x["name"]: x["uri"] for x in kserve["spec"]["model"]["lora"]["adapters"]} == {
            "sql-a": a["spec"]["adapter"]["uri"],
            "sql-b": b["spec"]["adapter"]["uri"],
        }
        kaito = yaml.safe_load(
            adapters_cli(
                dev_cluster,
                fresh,
                "export",
                "--base",
                tiny_model_in_s3,
                "--format",
                "kaito",
                "--image-repo",
                "registry.example/adapters",
            ).stdout
        )
        images = {x["source"]["name"]: x["source"]["image"] for x in kaito["inference"]["adapters"]}
        assert images["sql-a"] == f"registry.example/adapters/sql-a:{a['spec']['adapter']['sha256'][:12]}"

        # A's weights change in S3: verify says so, marks it, and export refuses to hand it out
        key = f"{ns}/sql-a/out/adapter_model.safetensors"
        body = bytearray(s3.get_object(Bucket="e2e-runs", Key=key)["Body"].read())
        body[-1] ^= 0xFF
        s3.put_object(Bucket="e2e-runs", Key=key, Body=bytes(body))
        checked = adapters_cli(dev_cluster, fresh, "verify")
        assert (
            checked.returncode == 1
            and "CHANGED sql-a" in checked.stdout
            and "ok      sql-b" in checked.stdout
        ), checked
        shown = kubectl(dev_cluster, fresh, "get", "ad", "sql-a").stdout
        assert shown.splitlines()[1].split()[5] == "False", shown
        refused_export = adapters_cli(
            dev_cluster, fresh, "export", "--base", tiny_model_in_s3, "--format", "kserve"
        )
        assert (
            refused_export.returncode == 1 and "sql-a" in refused_export.stderr and not refused_export.stdout
        )
        # and a warm start from it is refused, naming why
        tampered = small_job("sql-c", fresh, tiny_model_in_s3, ep)
        tampered["spec"]["lora"]["initFrom"] = {"adapter": "sql-a"}
        custom.create_namespaced_custom_object(GROUP, VERSION, fresh, PLURAL, tampered)
        failed = succeeded(custom, fresh, "sql-c")
        assert failed["phase"] == "Failed" and "failed verification" in failed["message"], failed


def _load_with_peft(s3, tmp_path, folders: list[str]) -> None:
    """The exported folders load with plain PeftModel.from_pretrained on the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    for obj in s3.list_objects_v2(Bucket="e2e-models", Prefix="tiny/")["Contents"]:
        dest = base_dir / obj["Key"].removeprefix("tiny/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("e2e-models", obj["Key"], str(dest))
    for folder in folders:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
        assert any("lora_A" in n for n, _ in model.named_parameters())
