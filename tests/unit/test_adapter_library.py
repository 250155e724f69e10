"""The adapter library's pure parts: one record for the trainer's adapter.json and the
operator's Adapter object, selection labels, warm-start resolution and pinning, and the
serving exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as hs

from kubetune.adapters import candidate_names, dns_name, imported_spec
from kubetune.api import LABEL_VALUE, FineTuneJobSpec
from kubetune.decision.decide import decide, needs_init_from
from kubetune.library import (
    adapter_names,
    adapter_object,
    compare_rows,
    kaito_export,
    kserve_export,
    matches,
    resolve_init_from,
    same_registration,
    selector,
    table_rows,
    vllm_export,
)
from kubetune_dev import crd
from kubetune_trainer.library import BASE_LABEL, TASK_LABEL, adapter_record, label_value, lora_shape
from tests.unit.helpers import World, job

SHA = "a" * 64
LINEAGE = {"base": "b" * 64, "data": "c" * 64, "shards": 3}


def succeed(w: World, message: dict) -> dict:
    w.set_pod("j-a1-w0", "Succeeded", exit_code=0)
    w.pods["j-a1-w0"]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(
        message
    )
    return w.reconcile()


def test_the_operators_adapter_record_is_the_one_the_trainer_wrote_beside_the_adapter():
    spec = {
        "dataset": {"uri": "s3://data-x/d/", "template": "text-to-sql"},
        "storage": {"secretRef": {"name": "s3"}},
    }
    w = World(job(**spec))
    w.reconcile()
    evaluation = {"split": "s3://d/eval/", "examples": 4, "exactMatch": 0.5, "evalLoss": 1.25}
    goodput = {"ratio": 1.0, "usefulSeconds": 10.0, "lostSeconds": 0.0}
    adapter = {"uri": "s3://out-x/o/", "sha256": SHA, "sizeBytes": 5}
    message = {
        "outcome": "completed",
        "step": 300,
        "adapter": adapter,
        "evaluation": evaluation,
        "goodput": goodput,
        "lineage": LINEAGE,
    }
    st = succeed(w, message)
    record = w.plans[-1].register
    assert record is not None and st["phase"] == "Succeeded"
    cfg = FineTuneJobSpec.model_validate(w.job["spec"])
    trainers = adapter_record(
        cfg,
        adapter,
        lineage=LINEAGE,
        evaluation=evaluation,
        goodput=goodput,
        steps=300,
        source={"name": "j", "namespace": "ns", "uid": "u1"},
        created=record["created"],
    )
    assert {k: v for k, v in record.items() if k not in ("storage", "goodput")} == {
        k: v for k, v in trainers.items() if k != "goodput"
    }
    assert record["storage"] == {"region": "us-east-1", "secretName": "s3"}
    assert record["base"] == {
        "model": "org/m",
        "method": "qlora",
        "quantization": "nf4",
        "fingerprint": "b" * 64,
    }
    obj = adapter_object("j", "ns", record)
    assert "ownerReferences" not in obj["metadata"]
    assert (
        obj["metadata"]["labels"][BASE_LABEL] == "org.m"
        and obj["metadata"]["labels"][TASK_LABEL] == "text-to-sql"
    )


def test_no_record_without_a_whole_adapter_and_a_garbled_lineage_is_left_out():
    w = World(job())
    w.reconcile()
    succeed(w, {"outcome": "completed", "step": 3, "adapter": {"uri": "s3://o/a/"}})
    assert w.plans[-1].register is None  # no sha256: nothing to pin, nothing to register
    w = World(job())
    w.reconcile()
    lineage = {"base": "not hex; rm -rf", "data": "c" * 64, "shards": -1}
    succeed(
        w,
        {
            "outcome": "completed",
            "adapter": {"uri": "s3://o/a/", "sha256": SHA, "sizeBytes": 1},
            "lineage": lineage,
        },
    )
    record = w.plans[-1].register
    assert "fingerprint" not in record["base"] and record["dataset"] == {
        "uri": "s3://data-x/d/",
        "fingerprint": "c" * 64,
    }


@given(hs.text(min_size=1, max_size=300))
def test_label_values_are_valid_and_name_what_they_label(text):
    value = label_value(text)
    assert len(value) <= 63 and re.match(LABEL_VALUE, value), value
    assert label_value(text.rstrip("/") + "/") == label_value(text.rstrip("/"))  # a folder either way


def test_label_values_of_hub_ids_and_folders():
    assert label_value("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB.SmolLM2-135M-Instruct"
    assert label_value("s3://models/tiny/") == label_value("s3://models/tiny")
    assert label_value("s3://models/tiny") != label_value("s3://other/tiny")  # same last folder
    long_a, long_b = "org/" + "x" * 80, "org/" + "x" * 79 + "y"
    assert label_value(long_a) != label_value(long_b)
    assert selector("org/m", "text-to-sql") == f"{BASE_LABEL}=org.m,{TASK_LABEL}=text-to-sql"
    assert adapter_names("sql", "1234abcd-0000") == ["sql", "sql-1234abcd"]


def source_adapter(name="src", verified=None, **spec):
    record = adapter_record(
        FineTuneJobSpec.model_validate(job(**spec)["spec"]),
        {"uri": "s3://out-x/src/", "sha256": SHA, "sizeBytes": 9},
        source={"name": name},
    )
    obj = adapter_object(name, "ns", record)
    if verified:
        obj["status"] = {"conditions": [{"type": "Verified", "status": verified, "message": "changed in S3"}]}
    return obj


@pytest.mark.parametrize(
    ("source", "lora", "model", "expected"),
    [
        ({"verified": "False"}, {}, None, "failed verification (changed in S3)"),
        ({}, {}, {"name": "org/other"}, "this job's base is 'org/other'"),
        ({}, {"r": 8}, None, "its LoRA rank is 16, this job's lora.r is 8"),
        ({}, {"targetModules": ["q_proj"]}, None, "it adapts ['all-linear']"),
    ],
)
def test_a_warm_start_that_cannot_be_is_refused_with_the_reason(source, lora, model, expected):
    spec = job(lora={**lora, "initFrom": {"adapter": "src"}}, **({"model": model} if model else {}))["spec"]
    found = None if source is None else source_adapter(**source)
    why = resolve_init_from(FineTuneJobSpec.model_validate(spec), found, "ns")
    assert isinstance(why, str) and expected in why, why


def config_of(pod: dict) -> dict:
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return json.loads(env["KUBETUNE_CONFIG"])


def test_a_warm_start_is_resolved_once_and_pinned_for_every_attempt():
    j = job(lora={"initFrom": {"adapter": "src"}}, spot={"enabled": True})
    assert needs_init_from(j) == "src"
    unresolved = decide(
        j, [], World(j).now, init_from="spec.lora.initFrom.adapter: Adapter src does not exist"
    )
    assert unresolved.status["phase"] == "Failed" and unresolved.status["reason"] == "InvalidSpec"
    assert not unresolved.create

    w = World(j)
    resolved = resolve_init_from(FineTuneJobSpec.model_validate(j["spec"]), source_adapter(), "ns")
    assert resolved == {"adapter": "src", "uri": "s3://out-x/src/", "sha256": SHA}
    plan = decide(w.job, [], w.now, init_from=resolved)
    w.job["status"] = plan.status
    for pod in plan.create:
        w.pods[pod["metadata"]["name"]] = pod
    assert w.job["status"]["initFrom"] == resolved and needs_init_from(w.job) is None
    assert config_of(w.pods["j-a1-w0"])["lora"]["initFrom"] == resolved
    # the next attempt (a preemption) gets the pinned adapter, with no lookup at all
    w.set_pod("j-a1-w0", "Failed", reason="Evicted")
    w.reconcile(3)
    assert config_of(w.pods["j-a2-w0"])["lora"]["initFrom"] == resolved


def adapters(*specs):
    out = []
    for name, base, r in specs:
        a = source_adapter(name, model={"name": base}, lora={"r": r})
        a["spec"]["adapter"]["uri"] = f"s3://lib/{name}/"
        out.append(a)
    return out


def test_exports_name_each_adapter_for_its_server():
    lib = adapters(("sql", "org/m", 8), ("chat", "org/m", 64))
    served = vllm_export(lib, {"sql": "/a/sql", "chat": "/a/chat"})
    assert served["model"] == "org/m"
    args = served["args"]
    assert args[args.index("--max-lora-rank") + 1] == "64" and args[args.index("--max-loras") + 1] == "2"
    modules = [json.loads(x) for x in args[args.index("--lora-modules") + 1 :]]
    assert modules == [
        {"name": "sql", "path": "/a/sql", "base_model_name": "org/m"},
        {"name": "chat", "path": "/a/chat", "base_model_name": "org/m"},
    ]
    kserve = yaml.safe_load(yaml.safe_dump(kserve_export(lib)))
    assert kserve["spec"]["model"]["uri"] == "hf://org/m"
    assert kserve["spec"]["model"]["lora"]["adapters"] == [
        {"name": "sql", "uri": "s3://lib/sql/"},
        {"name": "chat", "uri": "s3://lib/chat/"},
    ]
    kaito = kaito_export(lib, "reg.example/ad/", preset="m")
    assert kaito["inference"]["adapters"][0]["source"] == {
        "name": "sql",
        "image": f"reg.example/ad/sql:{SHA[:12]}",
    }
    with pytest.raises(ValueError, match="one base model"):
        vllm_export(adapters(("a", "org/m", 8), ("b", "org/n", 8)), {"a": "/a", "b": "/b"})


def test_listing_selection_tables_and_comparison():
    lib = adapters(("sql", "org/m", 8), ("chat", "org/n", 8))
    assert [a["metadata"]["name"] for a in lib if matches(a, base="org/m")] == ["sql"]
    assert [a["metadata"]["name"] for a in lib if matches(a, base="org.n")] == ["chat"]  # the label value
    rows = table_rows(lib, wide=True)
    assert rows[0][:6] == ["NAME", "BASE", "TASK", "METRIC", "SIZE", "VERIFIED"] and rows[1][4] == "9 B"
    compared = {r[0]: r for r in compare_rows(lib[0], lib[1])}
    assert compared["base"][1:] == ["org/m", "org/n", "*"] and compared["lora r"][3] == ""


def test_the_adapter_crd_is_structural_with_its_short_name_and_columns():
    doc = crd.adapter_crd()
    assert doc["spec"]["names"]["shortNames"] == ["ad"]
    columns = [
        c["name"] for c in doc["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert columns == ["Base", "Task", "Metric", "Size", "Verified", "Age"]
    text = json.dumps(doc)
    assert "$ref" not in text and "anyOf" not in text


def test_a_warm_start_waits_for_its_adapter_to_exist_then_pins_it():
    """A pipeline applies the warm-started job while the job that makes its source still
    runs: it waits (Pending/WaitingForAdapter, looked for every 10 s), it does not fail."""
    j = job(lora={"initFrom": {"adapter": "src"}})
    spec = FineTuneJobSpec.model_validate(j["spec"])
    w = World(j)
    missing = resolve_init_from(spec, None, "ns")
    plan = decide(w.job, [], w.now, init_from=missing)
    w.job["status"] = plan.status
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "WaitingForAdapter")
    assert "kubectl get ad -n ns" in plan.status["message"] and plan.requeue_after == 10.0 and not plan.create
    assert needs_init_from(w.job) == "src"
    resolved = resolve_init_from(spec, source_adapter(), "ns")
    plan = decide(w.job, [], w.now, init_from=resolved)
    assert plan.status["phase"] == "Pending" and plan.status["initFrom"] == resolved and plan.create


def test_a_job_refused_for_an_unverified_adapter_looks_again_when_its_spec_changes():
    j = job(lora={"initFrom": {"adapter": "src"}})
    spec = FineTuneJobSpec.model_validate(j["spec"])
    w = World(j)
    plan = decide(w.job, [], w.now, init_from=resolve_init_from(spec, source_adapter(verified="False"), "ns"))
    w.job["status"] = plan.status
    assert plan.status["reason"] == "InvalidSpec" and needs_init_from(w.job) == "src"
    w.job["metadata"]["generation"] = 2  # e.g. training.maxSteps changed, the adapter re-uploaded
    resolved = resolve_init_from(spec, source_adapter(verified="True"), "ns")
    plan = decide(w.job, [], w.now, init_from=resolved)
    assert plan.status["phase"] == "Pending" and plan.status["initFrom"] == resolved and plan.create


def test_an_adapter_made_by_hand_with_a_uri_the_trainer_cannot_read_is_refused_not_retried():
    spec = FineTuneJobSpec.model_validate(job(lora={"initFrom": {"adapter": "src"}})["spec"])
    odd = source_adapter()
    odd["spec"]["adapter"]["uri"] = "gs://elsewhere/src/"
    why = resolve_init_from(spec, odd, "ns")
    assert isinstance(why, str) and "cannot start this job" in why and "uri" in why, why


def test_an_existing_adapter_is_taken_as_this_jobs_only_if_it_records_the_same_files():
    record = source_adapter()["spec"]
    record["source"] = {"name": "j", "uid": "u1"}
    mine = adapter_object("j", "ns", record)
    assert same_registration(mine, record)
    squatter = adapter_object("j", "ns", {**record, "adapter": {**record["adapter"], "sha256": "e" * 64}})
    assert not same_registration(squatter, record)


@pytest.mark.parametrize(
    "config",
    [
        [],
        {"r": None, "target_modules": ["q"]},
        {"r": "8"},
        {"r": 8, "target_modules": [["q"]]},
        {"r": 8, "target_modules": 5},
    ],
)
def test_an_adapter_config_from_a_bucket_that_is_not_one_is_refused(config):
    with pytest.raises(ValueError):
        lora_shape(config)


def test_an_imported_record_never_brings_its_own_s3_access_or_location():
    planted = source_adapter()["spec"]
    planted["storage"] = {"endpoint": "http://attacker.example", "secretName": "admin-keys"}
    planted["adapter"]["uri"] = "s3://somewhere-else/x/"
    spec = imported_spec(json.dumps(planted).encode(), "s3://lib/x/", {"secretName": "s3"})
    assert spec["storage"] == {"secretName": "s3"} and spec["adapter"]["uri"] == "s3://lib/x/"
    assert "storage" not in imported_spec(json.dumps(planted).encode(), "s3://lib/x/", {})
    with pytest.raises(ValueError):
        imported_spec(b"[1, 2]", "s3://lib/x/", {})
    assert dns_name("Team/SQL_v2!") == "team-sql-v2" and dns_name("...") == "adapter"
    assert candidate_names("sql", "1234abcd-ffff", SHA) == ["sql", "sql-1234abcd", f"sql-{SHA[:8]}"]
    assert candidate_names("sql", "../../etc", SHA) == ["sql", f"sql-{SHA[:8]}"]
