"""Pure pieces of the trainer: templates, checkpoint retention, the termination message
(size, secrets), compute-dtype choice, ETA, config variables."""

from __future__ import annotations

import json

import pytest

from kubetune.decision.reports import evaluation_from_message, lineage_from_message
from kubetune_trainer import contract
from kubetune_trainer.checkpoints import steps_in, to_prune
from kubetune_trainer.config import expand_vars
from kubetune_trainer.evaluate import exact_match_rate
from kubetune_trainer.launch import combined_exit_code
from kubetune_trainer.model import compute_dtype_name, cpu_has_bf16, lora_targets
from kubetune_trainer.progress import Progress, eta_seconds
from kubetune_trainer.signals import MAX_MESSAGE, redact, termination_message
from kubetune_trainer.templates import RecordError, render

SQL = {
    "question": "How many heads are older than 56?",
    "context": "CREATE TABLE head (age INTEGER)",
    "answer": "SELECT COUNT(*) FROM head WHERE age > 56",
}


def test_text_to_sql_template_is_the_seed_prompt():
    prompt, response = render(SQL, "text-to-sql", {}, None)
    assert prompt == (
        "### Input:\nHow many heads are older than 56?\n\n### Context:\nCREATE TABLE head (age INTEGER)\n\n### Response:\n"
    )
    assert response == SQL["answer"]


def test_field_mapping_and_missing_fields():
    rec = {"q": "a?", "ctx": "CREATE TABLE t (x INT)", "sql": "SELECT x FROM t"}
    fields = {"input": "q", "context": "ctx", "output": "sql"}
    assert render(rec, "text-to-sql", fields, None)[1] == "SELECT x FROM t"
    with pytest.raises(RecordError, match="missing field 'answer'"):
        render({"question": "a", "context": "b"}, "text-to-sql", {}, None)


def test_alpaca_with_and_without_input():
    p, r = render({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca", {}, None)
    assert "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n" in p and r == "3"
    p, _ = render({"instruction": "Say hi", "output": "hi"}, "alpaca", {}, None)
    assert "### Input" not in p


def test_completion_classification_and_custom():
    assert render({"text": "<s>[INST] hi [/INST] yo"}, "completion", {}, None) == (
        "",
        "<s>[INST] hi [/INST] yo",
    )
    p, r = render({"text": "you idiot", "label": ["toxic", "insult"]}, "classification", {}, None)
    assert p.endswith("### Label:\n") and r == "toxic, insult"
    fmt = "### Wikipedia comment: {comment}\n### Classifications:\n{labels}"
    p, r = render({"comment": "nice", "labels": "N/A"}, "custom", {"output": "labels"}, fmt)
    assert (p, r) == ("### Wikipedia comment: nice\n### Classifications:\n", "N/A")


def test_chat_uses_the_tokenizers_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
            return text + ("<assistant>" if add_generation_prompt else "")

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p, r = render({"messages": msgs}, "chat", {}, None, Tok())
    assert (p, r) == ("<user>hi</user><assistant>", "hello</assistant>")
    with pytest.raises(RecordError, match="last message"):
        render({"messages": msgs[:1]}, "chat", {}, None, Tok())


def test_retention_keeps_newest_verified_and_a_newer_upload_in_progress():
    assert to_prune(verified=[10, 20, 30, 40], all_steps=[10, 20, 30, 40], keep=2) == [10, 20]
    # 35 is not verified and is older than the newest verified: a dead upload, pruned
    assert to_prune(verified=[10, 20, 40], all_steps=[10, 20, 35, 40], keep=3) == [35]
    # 50 is newer than every verified one: maybe still uploading, kept
    assert to_prune(verified=[10, 20, 40], all_steps=[10, 20, 40, 50], keep=2) == [10]
    assert to_prune(verified=[], all_steps=[5], keep=2) == []
    # keep=1 and a newest checkpoint that is complete but corrupt (20): the good one stays
    assert to_prune(verified=[10], all_steps=[10, 20], keep=1) == []
    assert steps_in(["step-00000010/a", "step-00000010/manifest.json", "junk/x", "step-12/a"]) == {
        10: {"a", "manifest.json"}
    }


def test_termination_message_is_json_small_and_free_of_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    text = termination_message("failed", step=3, error="boom with s3cr3t-value-123 inside " + "x" * 10000)
    assert len(text) <= MAX_MESSAGE
    body = json.loads(text)
    assert body["outcome"] == "failed" and body["step"] == 3
    assert "s3cr3t-value-123" not in text
    assert redact("key=s3cr3t-value-123") == "key=***"


@pytest.mark.parametrize("cut", range(0, 41, 5))
def test_a_secret_at_the_cut_is_scrubbed_before_the_message_is_cut(monkeypatch, cut):
    secret = "AKIAsecretsecretsecretsecretsecret123456"[:40]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # an error whose JSON form crosses 4096 bytes `cut` characters into the secret
    pad = "x" * (MAX_MESSAGE - len('{"outcome":"failed","error":""}') - cut)
    text = termination_message("failed", error=pad + secret + " and more text after it" * 20)
    assert len(text.encode()) <= MAX_MESSAGE
    body = json.loads(text)
    assert not any(secret[i : i + 8] in text for i in range(len(secret) - 7)), "part of the secret leaked"
    assert body["outcome"] == "failed"


def test_the_message_stays_valid_json_under_4_kib_whatever_it_carries(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", 'quote"and\\slash')
    text = termination_message(
        "failed",
        error='é\n"' * 3000 + 'quote"and\\slash',
        evaluation={"evalLoss": float("nan"), "note": 'quote"and\\slash'},
    )
    assert len(text.encode()) <= MAX_MESSAGE
    body = json.loads(text)
    assert body["evaluation"] == {"evalLoss": None, "note": "***"}
    assert 'quote"and' not in json.dumps(body)


def test_the_message_carries_only_the_contracts_keys_and_the_operator_reads_them():
    """One contract for both sides: a key the trainer writes outside it is refused where it
    is written, and what the trainer writes is what the operator's readers take."""
    with pytest.raises(ValueError, match="not termination-message keys"):
        termination_message("completed", adaptr={"uri": "s3://b/a/"})
    text = termination_message(
        "completed",
        step=12,
        checkpoint={"step": 12, "uri": "s3://b/c/step-12/"},
        adapter={"uri": "s3://b/a/", "sha256": "ab" * 32, "sizeBytes": 10},
        evaluation={"split": "eval", "examples": 4, "exactMatch": 0.5},
        lineage={"base": "cd" * 32, "data": "ef" * 32, "shards": 2},
    )
    body = json.loads(text)
    assert set(body) <= set(contract.MESSAGE_KEYS)
    assert evaluation_from_message(body) == {"split": "eval", "examples": 4, "exactMatch": 0.5}
    assert lineage_from_message(body) == {"base": "cd" * 32, "data": "ef" * 32, "shards": 2}


@pytest.mark.parametrize(
    "code, permanent",
    [
        (0, False),
        (1, False),
        (contract.EXIT_PREEMPTED, False),
        (65, True),
        (66, True),
        (78, True),
        (137, False),
    ],
)
def test_permanent_exit_codes_are_the_sysexits_range_but_the_preemption_stop(code, permanent):
    assert contract.is_permanent(code) is permanent
    assert combined_exit_code([0, code]) == code  # the pod says what its worst process said


def test_compute_dtype_auto():
    assert compute_dtype_name("auto", "cpu") == "float32"
    assert compute_dtype_name("auto", "cuda-bnb", (7, 5)) == "float16"  # T4
    assert compute_dtype_name("auto", "cuda-bnb", (8, 0)) == "bfloat16"  # A100
    assert compute_dtype_name("auto", "xpu-bnb") == "bfloat16"
    assert compute_dtype_name("float16", "cpu") == "float16"
    # CPUs with native bf16 matmuls that measured them faster (AMX: ~3.5x a fp32 matmul)
    assert compute_dtype_name("auto", "cpu", cpu_bf16_faster=True) == "bfloat16"
    assert compute_dtype_name("float32", "cpu", cpu_bf16_faster=True) == "float32"
    assert compute_dtype_name("auto", "cuda-bnb", (7, 5), cpu_bf16_faster=True) == "float16"


def test_cpu_bf16_flags():
    amx = "processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n"
    avx512 = "flags\t\t: fpu avx512f avx512_bf16\n"
    epyc = "flags\t\t: fpu sse avx2 avx512f\n"
    assert cpu_has_bf16(amx) and cpu_has_bf16(avx512)
    assert not cpu_has_bf16(epyc) and not cpu_has_bf16("")
    assert lora_targets(["all-linear"]) == "all-linear" and lora_targets(["q_proj"]) == ["q_proj"]


def test_eta_and_progress_json():
    assert eta_seconds(step=60, total=100, start_step=40, elapsed_s=10) == 20
    assert eta_seconds(step=40, total=100, start_step=40, elapsed_s=10) is None
    assert set(Progress().to_json()) >= {"step", "totalSteps", "loss", "evalLoss", "etaSeconds", "updatedAt"}


def test_exact_match_ignores_whitespace_and_a_trailing_semicolon():
    assert (
        exact_match_rate(["SELECT  a FROM t;", "SELECT b FROM t"], ["SELECT a FROM t", "SELECT c FROM t"])
        == 0.5
    )


def test_config_variables():
    assert expand_vars("file://${HOME}/x", {"HOME": "/h"}) == "file:///h/x"
    with pytest.raises(ValueError, match=r"\$\{NOPE\}"):
        expand_vars("${NOPE}", {})


def test_a_resumed_run_keeps_the_compute_dtype_of_the_run_it_resumes():
    """auto's CPU probe could choose otherwise on a busier machine; a resumed run must
    compute like the run it resumes, or it does not resume exactly."""
    from types import SimpleNamespace

    import torch

    from kubetune_trainer.model import resolve_compute_dtype

    auto = SimpleNamespace(quantization=SimpleNamespace(compute_dtype="auto"))
    assert resolve_compute_dtype(auto, "cpu", resumed="bfloat16") == torch.bfloat16
    assert resolve_compute_dtype(auto, "cpu", resumed="float32") == torch.float32
    assert resolve_compute_dtype(auto, "cpu", agree=lambda _: False) == torch.float32  # ranks disagree
    chosen = SimpleNamespace(quantization=SimpleNamespace(compute_dtype="float32"))
    assert resolve_compute_dtype(chosen, "cpu", resumed="bfloat16") == torch.float32  # spec wins


def test_a_custom_format_without_the_output_field_is_a_config_error():
    from pydantic import ValidationError

    from kubetune_trainer.config import Dataset

    with pytest.raises(ValidationError, match=r"dataset.format must contain \{output\}"):
        Dataset(uri="s3://data/x/", template="custom", format="Q: {q} A:")
    with pytest.raises(ValidationError, match=r"must contain \{label\}"):
        Dataset(uri="s3://data/x/", template="custom", format="{q} {output}", fields={"output": "label"})
    assert Dataset(uri="s3://data/x/", template="custom", format="{q} => {label}", fields={"output": "label"})


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_model_card_says_which_base_the_adapter_expects(method):
    """A plain-LoRA adapter is served on the full-precision base it was trained on; a QLoRA
    one reproduces its scores on the 4-bit base (or merged/), and the card says so."""
    from kubetune_trainer.config import TrainingConfig
    from kubetune_trainer.export import model_card

    cfg = TrainingConfig.model_validate(
        {
            "model": {"uri": "file:///models/smol"},
            "dataset": {
                "uri": "s3://data/sql/",
                "template": "text-to-sql",
                "validation": {"uri": "s3://data/eval/"},
            },
            "method": method,
            "checkpoint": {"uri": "s3://runs/ckpt/"},
            "output": {"uri": "s3://runs/out/"},
        }
    )
    scores = {"before": {"exact_match": 0.0}, "after": {"exact_match": 0.9, "examples": 80}}
    metrics = {
        "steps": 160,
        "tokens": 1,
        "final_loss": 0.01,
        "compute_dtype": "float32",
        "exact_match": scores,
    }
    card = model_card(cfg, metrics)
    assert "0.00 (base model) → 0.90" in card
    snippet = card.split("```python")[1].split("```")[0]
    assert 'from_pretrained("/models/smol")' in snippet and "file://" not in snippet
    if method == "lora":
        assert "full-precision base (float32)" in card and "4-bit base it was trained on" not in card
    else:
        assert "on the 4-bit base it was trained on" in card and "load_in_4bit=True" in card


def test_a_success_message_at_its_largest_keeps_everything_under_4_kib():
    """The biggest completed message the trainer writes: the adapter, a whole evaluation
    with samples of arbitrary model output (escaped as JSON), goodput, the checkpoint and
    the library's fingerprints must all fit, or the operator would lose the adapter."""
    from kubetune_trainer.library import clip_samples

    worst = '"\\\u0001é' * 500
    samples = [{"reference": worst, "prediction": worst} for _ in range(10)]
    evaluation = {
        "split": "s3://" + "b" * 63 + "/" + "p" * 180,
        "examples": 1000,
        "exactMatchBefore": 0.123456,
        "exactMatch": 0.987654,
        "exactMatchUnquantizedBase": 0.876543,
        "evalLoss": 1.234567,
        "samples": clip_samples(samples),
    }
    from kubetune.decision.reports import GOODPUT_SECONDS

    goodput = {k: 123456.789 for k in ("ratio", *GOODPUT_SECONDS)}
    goodput.update(stepsRecomputed=1_000_000, attempts=100)
    text = termination_message(
        "completed",
        step=10_000_000,
        checkpoint={"step": 10_000_000, "uri": "s3://" + "c" * 63 + "/" + "k" * 300 + "/step-10000000/"},
        adapter={"uri": "s3://" + "o" * 63 + "/" + "a" * 300 + "/", "sha256": "f" * 64, "sizeBytes": 10**12},
        evaluation=evaluation,
        goodput=goodput,
        lineage={"base": "b" * 64, "data": "d" * 64, "shards": 100_000},
    )
    body = json.loads(text)
    assert len(text.encode()) <= MAX_MESSAGE and body["adapter"]["sha256"] == "f" * 64, len(text.encode())
    assert len(body["evaluation"]["samples"]) == 3


def test_the_run_fingerprint_of_a_spec_without_a_warm_start_is_the_one_earlier_versions_wrote():
    """Checkpoints written before lora.initFrom existed must resume under this trainer:
    their run fingerprint (computed by the trainer of cd03d6f) is frozen here."""
    from kubetune_trainer.config import TrainingConfig
    from kubetune_trainer.train import run_fingerprint

    cfg = TrainingConfig.model_validate(
        {
            "model": {"name": "org/m"},
            "dataset": {"uri": "s3://data-x/d/"},
            "checkpoint": {"uri": "s3://ck-x/c/"},
            "output": {"uri": "s3://out-x/o/"},
        }
    )
    assert run_fingerprint(cfg) == "3c7603088555349a"
    warm = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"init_from": {"uri": "s3://a-b/x/"}})})
    assert run_fingerprint(warm) != "3c7603088555349a"


def test_ipex_llm_runs_on_the_intel_gpu_where_there_is_one_else_on_the_cpu():
    from kubetune_trainer.model import device_for

    assert device_for("ipex-llm", 1, xpu_available=True) == "xpu:1"
    assert device_for("ipex-llm", 1, xpu_available=False) == "cpu"
    # the bitsandbytes backends keep their devices whatever the flag
    assert device_for("xpu-bnb", 1, xpu_available=False) == "xpu:1"
    assert device_for("cuda-bnb", 0) == "cuda:0"
    assert device_for("cpu") == "cpu"


def test_ipex_llm_quantizes_to_sym_int4_on_cpu_where_it_has_no_nf4_kernels():
    from kubetune_trainer.model import ipex_llm_low_bit

    assert ipex_llm_low_bit("nf4", on_xpu=True) == "nf4"
    assert ipex_llm_low_bit("fp4", on_xpu=True) == "fp4"
    assert ipex_llm_low_bit("nf4", on_xpu=False) == "sym_int4"
    assert ipex_llm_low_bit("fp4", on_xpu=False) == "sym_int4"


def test_a_transformers_5_config_gives_transformers_4_its_rope_settings():
    from kubetune_trainer.model import transformers4_config_overrides

    v5 = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert transformers4_config_overrides(v5) == {"rope_theta": 100000.0}
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert transformers4_config_overrides(scaled) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
    }
    # a transformers 4 folder (rope_theta at the top) is read as it is
    assert transformers4_config_overrides({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e4}}) == {}
    assert transformers4_config_overrides({"hidden_size": 64}) == {}


def test_the_exported_adapter_config_drops_ipex_llms_own_key():
    from kubetune_trainer.export import portable_adapter_config

    config = {"peft_type": "LORA", "r": 8, "training_mode": "qlora", "target_modules": ["q_proj"]}
    assert portable_adapter_config(config) == {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
