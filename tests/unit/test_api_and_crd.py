"""One source of truth: the generated CRD matches api.py, is structural, and every
example validates through the same pydantic model the operator uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec
from kubetune_dev import crd
from kubetune_trainer.config import TrainingConfig, load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_generated_crd_files_are_up_to_date():
    assert crd.main(["--check"]) == 0, "run `python -m kubetune_dev.crd` and commit the result"


def walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def test_crd_schema_is_structural():
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        for banned in ("$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "_optional", "const"):
            assert banned not in node, f"{path} has {banned}"
        if path.endswith(".properties"):
            continue  # the mapping of field names, not a schema
        if any(k in node for k in ("properties", "items", "enum", "pattern", "minimum")):
            assert "type" in node, f"{path} lacks a type"


def test_crd_defaults_and_descriptions_come_from_the_model():
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    lora = spec["properties"]["lora"]
    assert lora["default"] == {}
    assert lora["properties"]["r"]["default"] == 16
    assert lora["properties"]["r"]["minimum"] == 1
    assert spec["properties"]["training"]["properties"]["learningRate"]["exclusiveMinimum"] is True
    assert "Secret" in spec["properties"]["storage"]["properties"]["secretRef"]["description"]
    assert "default" not in spec["properties"]["storage"]["properties"]["secretRef"]
    assert set(spec["required"]) == {"model", "dataset", "checkpoint", "output"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "FineTuneJob":
            FineTuneJobSpec.model_validate(doc["spec"])
            assert load_config(path).model.name or load_config(path).model.uri


def test_trainer_config_is_the_training_part_of_the_spec():
    assert set(TrainingConfig.model_fields) < set(FineTuneJobSpec.model_fields)


def test_validation_errors_name_the_field_by_its_wire_name():
    with pytest.raises(ValidationError) as e:
        FineTuneJobSpec.model_validate(
            {
                "model": {"name": "a/b"},
                "dataset": {"uri": "s3://bkt/x/"},
                "checkpoint": {"uri": "s3://bkt/c/"},
                "output": {"uri": "s3://bkt/o/"},
                "resources": {"minGpuMemoryMiB": -1},
                "lora": {"r": 0},
            }
        )
    locs = {".".join(map(str, err["loc"])) for err in e.value.errors()}
    assert locs == {"resources.minGpuMemoryMiB", "lora.r"}


def test_the_demo_and_the_local_default_share_one_recipe():
    """`make demo` (quickstart.yaml) and `python -m kubetune_dev train` (local-text-to-sql.yaml) train
    the same way; the recipe chosen by benchmarks/recipe_sweep.py is written in both."""
    from kubetune_trainer.config import Lora, Quantization, Training

    root = Path(__file__).resolve().parents[2] / "examples"
    demo = yaml.safe_load((root / "quickstart.yaml").read_text())["spec"]
    local = yaml.safe_load((root / "local-text-to-sql.yaml").read_text())
    for key, model in (("lora", Lora), ("quantization", Quantization)):
        assert model.model_validate(demo.get(key, {})) == model.model_validate(local.get(key, {})), key
    assert demo.get("method", "qlora") == local.get("method", "qlora")
    for key in ("template", "maxSeqLength", "packing"):
        assert demo["dataset"].get(key) == local["dataset"].get(key), key
    assert demo["dataset"]["validation"]["generate"] == local["dataset"]["validation"]["generate"]
    demo_training = Training.model_validate(demo["training"]).model_copy(update={"logging_steps": 1})
    local_training = Training.model_validate(local["training"]).model_copy(update={"logging_steps": 1})
    assert demo_training == local_training
