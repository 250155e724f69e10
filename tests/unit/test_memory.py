"""The GPU-memory estimate (kubetune.memory) against published figures, its response to
each setting, and what minGpuMemoryMiB: auto makes of it when placing a job."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from kubetune import cli, memory
from kubetune.api import FineTuneJobSpec
from kubetune.gang import why_not
from kubetune.manifests import build_pod
from kubetune.placement import NVIDIA_MEMORY_LABEL, place
from kubetune_dev.devcluster.nodes import default_nodes, node_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GB = 1e9
T4_MIB = 15360  # GPU Feature Discovery's nvidia.com/gpu.memory on a T4 (as on the dev cluster's)
GPU_48GB_MIB = 46068  # an A40's or L40S's label; an RTX A6000 reports 49140


def job(model="meta-llama/Llama-2-7b-hf", **spec) -> FineTuneJobSpec:
    base = {
        "model": {"name": model},
        "dataset": {"uri": "s3://bkt/d/", "maxSeqLength": spec.pop("seq", 512)},
        "checkpoint": {"uri": "s3://bkt/c/"},
        "output": {"uri": "s3://bkt/o/"},
    }
    return FineTuneJobSpec.model_validate({**base, **spec})


def gb(spec: FineTuneJobSpec) -> float:
    return memory.estimate(spec).total_mib * memory.MIB / GB


def within(value: float, low: float, high: float, tolerance: float = 0.25) -> bool:
    """value agrees with a published figure (or range) within the tolerance."""
    return low * (1 - tolerance) <= value <= high * (1 + tolerance)


# -- the model table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("meta-llama/Llama-2-7b-hf", 6.74e9),
        ("meta-llama/Llama-2-13b-hf", 13.0e9),
        ("meta-llama/Llama-2-70b-hf", 69.0e9),
        ("huggyllama/llama-65b", 65.2e9),
        ("mistralai/Mistral-7B-v0.1", 7.24e9),
        ("meta-llama/Meta-Llama-3-8B", 8.03e9),
        ("tiiuae/falcon-7b", 6.92e9),
        ("microsoft/phi-2", 2.78e9),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1.1e9),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 134.5e6),
    ],
)
def test_the_table_gives_the_published_parameter_counts(name, published):
    assert memory.lookup(name).parameters() == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize(
    ("name", "uri", "arch"),
    [
        ("codellama/CodeLlama-7b-hf", None, memory.CODELLAMA_7B),
        ("meta-llama/Llama-2-7b-chat-hf", None, memory.LLAMA2_7B),
        ("meta-llama/Llama-2-70b-hf", None, memory.LLAMA2_70B),  # 70b is not 7b
        ("meta-llama/Llama-3.1-8B-Instruct", None, memory.LLAMA3_8B),
        ("tiiuae/falcon-7b-instruct", None, memory.FALCON_7B),
        (None, "s3://models/SmolLM2-135M-Instruct/", memory.SMOLLM2_135M),
        (None, "file:///models/phi-2", memory.PHI_2),
        ("org/tiny", None, None),
        ("microsoft/phi-3-mini-4k-instruct", None, None),
        (None, "s3://models/m/", None),
    ],
)
def test_models_are_matched_by_name_or_by_the_uris_last_folder(name, uri, arch):
    assert memory.lookup(name, uri) is arch


def test_an_unknown_model_gets_no_estimate_and_auto_then_constrains_nothing():
    spec = job("org/tiny")
    assert memory.estimate(spec) is None
    assert "memory" not in str(place(spec).affinity())


# -- the published figures ---------------------------------------------------------------------

# The seeds call peft's prepare_model_for_kbit_training with its defaults, which turn
# gradient checkpointing on: their figures are with it.
FALCON_SEED = {
    "quantization": {"type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["query_key_value"]},
}


def test_falcon_7b_qlora_needs_under_15_gb():
    """Published: the seed fine-tuned Falcon-7B with QLoRA on a 15 GB T4, and a 7B QLoRA
    takes ~5-6 GB of weights plus activations at batch 1 x 512 (the QLoRA paper)."""
    seed = {"model": "tiiuae/falcon-7b", "seq": 512, **FALCON_SEED}
    at_4 = job(
        **seed, training={"batchSize": 4, "optimizer": "paged_adamw_8bit", "gradientCheckpointing": True}
    )
    at_1 = job(
        **seed, training={"batchSize": 1, "optimizer": "paged_adamw_8bit", "gradientCheckpointing": True}
    )
    assert gb(at_4) < 15
    assert within(gb(at_1), 5, 6), gb(at_1)


def test_a_7b_qlora_fits_a_16_gb_t4():
    """Published: Llama-2-7b-chat QLoRA on a Colab T4 takes ~9-14 GB (seed recipe: NF4, fp16
    compute, LoRA r8, paged 32-bit AdamW, batch 4)."""
    seed = job(
        "meta-llama/Llama-2-7b-chat-hf",
        quantization={"computeDtype": "float16"},
        lora={"r": 8, "alpha": 16, "dropout": 0.1},
        training={"batchSize": 4, "optimizer": "paged_adamw_32bit", "gradientCheckpointing": True},
    )
    assert memory.estimate(seed).total_mib <= T4_MIB
    assert within(gb(seed), 9, 14), gb(seed)


@pytest.mark.parametrize("model", ["huggyllama/llama-65b", "meta-llama/Llama-2-70b-hf"])
def test_a_65b_or_70b_qlora_fits_one_48_gb_gpu(model):
    """Published: QLoRA fine-tunes a 65B model on a single 48 GB GPU, ~41-48 GB (the QLoRA
    paper: batch 1, gradient checkpointing, paged optimizer)."""
    spec = job(model, training={"batchSize": 1, "gradientCheckpointing": True})
    assert memory.estimate(spec).total_mib <= GPU_48GB_MIB
    assert within(gb(spec), 41, 48), gb(spec)


def test_the_papers_65b_at_rank_64_fits_with_8_bit_optimizer_states():
    """peft keeps adapters in float32 (the paper's were bfloat16): at rank 64 on every linear
    layer, 8-bit optimizer states keep LLaMA-65B within 48 GB, 32-bit ones do not."""
    r64 = {"lora": {"r": 64, "alpha": 16}}
    small = job(
        "huggyllama/llama-65b",
        **r64,
        training={"batchSize": 1, "gradientCheckpointing": True, "optimizer": "paged_adamw_8bit"},
    )
    large = job(
        "huggyllama/llama-65b",
        **r64,
        training={"batchSize": 1, "gradientCheckpointing": True, "optimizer": "paged_adamw_32bit"},
    )
    assert memory.estimate(small).total_mib <= GPU_48GB_MIB < memory.estimate(large).total_mib


# -- how it responds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("small", "large"),
    [
        ({"training": {"batchSize": 1}}, {"training": {"batchSize": 8}}),
        ({"seq": 256}, {"seq": 2048}),
        ({"lora": {"r": 8}}, {"lora": {"r": 128}}),
        ({"lora": {"targetModules": ["q_proj", "v_proj"]}}, {"lora": {"targetModules": ["all-linear"]}}),
        ({"lora": {"dropout": 0}}, {"lora": {"dropout": 0.1}}),
        ({"training": {"gradientCheckpointing": True}}, {"training": {"gradientCheckpointing": False}}),
        ({"quantization": {"doubleQuant": True}}, {"quantization": {"doubleQuant": False}}),
        ({"training": {"optimizer": "paged_adamw_8bit"}}, {"training": {"optimizer": "adamw"}}),
        ({"method": "qlora"}, {"method": "lora"}),
        ({"quantization": {"computeDtype": "bfloat16"}}, {"quantization": {"computeDtype": "float32"}}),
        ({"resources": {"gpusPerWorker": 1}}, {"resources": {"gpusPerWorker": 2}}),  # DDP buckets
    ],
)
def test_the_estimate_grows_with_each_setting(small, large):
    assert memory.estimate(job(**small)).total_mib < memory.estimate(job(**large)).total_mib


def test_it_grows_with_batch_and_sequence_and_rank_at_every_step():
    for key, values in (("batchSize", (1, 2, 4, 16)), ("seq", (128, 512, 4096))):
        totals = [
            memory.estimate(job(seq=v) if key == "seq" else job(training={key: v})).total_mib for v in values
        ]
        assert totals == sorted(set(totals)), (key, totals)
    ranks = [memory.estimate(job(lora={"r": r})).total_mib for r in (4, 8, 16, 64, 256)]
    assert ranks == sorted(set(ranks))


def test_gradient_checkpointing_keeps_only_block_inputs():
    plain, checkpointed = (
        memory.estimate(job(training={"batchSize": 8, "gradientCheckpointing": gc})) for gc in (False, True)
    )
    assert checkpointed.activations_mib < plain.activations_mib / 10
    assert checkpointed.weights_mib == plain.weights_mib


def test_fsdp_shards_the_weights_across_ranks():
    ddp = memory.estimate(job("meta-llama/Llama-2-70b-hf", resources={"gpusPerWorker": 4}))
    fsdp = memory.estimate(
        job("meta-llama/Llama-2-70b-hf", resources={"gpusPerWorker": 4}, training={"strategy": "fsdp"})
    )
    assert fsdp.weights_mib < ddp.weights_mib / 3 and fsdp.adapter_mib < ddp.adapter_mib / 3


# -- placement ---------------------------------------------------------------------------------


def eligible_dev_nodes(spec: FineTuneJobSpec) -> set[str]:
    """The dev cluster's nodes the worker pod may run on (taints, selectors, affinity)."""
    pod = build_pod("j", "uid", spec, attempt=1, rank=0, preemptions=0)
    found = set()
    for n in default_nodes():
        manifest = node_manifest(n)
        manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        if why_not(pod, manifest) is None:
            found.add(n.name)
    return found


SPOT_7B = {
    "quantization": {"computeDtype": "float16"},
    "training": {"batchSize": 4, "gradientCheckpointing": True},
    "spot": {"enabled": True},
}


def test_auto_places_a_7b_qlora_on_the_t4_and_a_70b_only_on_the_a100s():
    assert job().resources.min_gpu_memory_mib == "auto"  # the default
    small = eligible_dev_nodes(job("meta-llama/Llama-2-7b-chat-hf", **SPOT_7B))
    assert "gpu-t4-spot-0" in small and "gpu-a100-spot-0" in small
    big = eligible_dev_nodes(job("meta-llama/Llama-2-70b-chat-hf", **SPOT_7B))
    assert "gpu-t4-spot-0" not in big and {"gpu-a100-spot-0", "gpu-a100-spot-1"} <= big


def memory_terms(spec: FineTuneJobSpec) -> list[list[dict]]:
    affinity = place(spec).affinity() or {"nodeAffinity": {}}
    required = affinity["nodeAffinity"].get("requiredDuringSchedulingIgnoredDuringExecution", {})
    return [
        [e for e in t["matchExpressions"] if "memory" in e["key"]]
        for t in required.get("nodeSelectorTerms", [])
    ]


def test_auto_keeps_nodes_that_publish_no_gpu_memory_and_a_number_does_not():
    need = memory.estimate(job()).total_mib
    assert memory_terms(job()) == [
        [{"key": NVIDIA_MEMORY_LABEL, "operator": "Gt", "values": [str(need - 1)]}],
        [{"key": NVIDIA_MEMORY_LABEL, "operator": "DoesNotExist"}],
    ]
    explicit = job(resources={"minGpuMemoryMiB": 16384})
    assert memory_terms(explicit) == [[{"key": NVIDIA_MEMORY_LABEL, "operator": "Gt", "values": ["16383"]}]]
    assert memory_terms(job(resources={"minGpuMemoryMiB": 0})) in ([], [[]])


def test_on_intel_the_node_total_must_cover_every_gpu_of_the_worker():
    one, two = (
        job("codellama/CodeLlama-7b-hf", resources={"accelerator": "intel", "gpusPerWorker": g})
        for g in (1, 2)
    )
    need = memory.estimate(one).total_mib * memory.MIB
    assert memory_terms(one)[0] == [
        {"key": "gpu.intel.com/memory.max", "operator": "Gt", "values": [str(need - 1)]}
    ]
    need_each = memory.estimate(two).total_mib * memory.MIB  # DDP's buckets on top
    assert memory_terms(two)[0][0]["values"] == [str(2 * need_each - 1)]
    assert eligible_dev_nodes(one) == {"gpu-intel-max-0"}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_stays_placeable_on_the_dev_cluster(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "FineTuneJob":
            spec = FineTuneJobSpec.model_validate(doc["spec"])
            assert eligible_dev_nodes(spec), f"{path.name} fits no dev cluster node"


# -- kubetune render ---------------------------------------------------------------------------


def render(path: Path) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main(["render", str(path)])
    assert exit_.value.code == 0
    return out.getvalue()


def test_render_prints_the_estimate_as_yaml_comments():
    text = render(EXAMPLES / "falcon-7b-faq.yaml")
    est = memory.estimate(
        FineTuneJobSpec.model_validate(yaml.safe_load((EXAMPLES / "falcon-7b-faq.yaml").read_text())["spec"])
    )
    assert f"# FineTuneJob falcon-faq: GPU memory estimate: {est.total_mib / 1024:.1f} GiB" in text
    assert f"nvidia.com/gpu.memory is at least {est.total_mib} MiB" in text
    pods = [d for d in yaml.safe_load_all(text) if d]  # still what kubectl apply -f - takes
    assert [p["kind"] for p in pods] == ["Pod"]


def test_render_says_when_there_is_no_estimate(tmp_path):
    doc = yaml.safe_load((EXAMPLES / "falcon-7b-faq.yaml").read_text())
    doc["spec"]["model"] = {"uri": "s3://models/my-model/"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    text = render(tmp_path / "job.yaml")
    assert "GPU memory estimate: none, s3://models/my-model/ is not in kubetune.memory's table" in text
    assert "minGpuMemoryMiB auto: any GPU memory" in text
