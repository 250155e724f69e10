"""One kubetune training run in this interpreter, for benchmarks/trainer_throughput.py's
backend rows: the ipex-llm backend runs in its own venv (hack/ensure-env.sh --stack
ipex-llm), so each row is a process of its own, which also keeps the peak RSS its own.

    python benchmarks/backend_row.py CONFIG.json BACKEND WARMUP

prints one JSON line: tokens_per_s (after WARMUP untimed steps), s_per_step, peak_rss_mib,
compute_dtype, versions."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image"):
    sys.path.insert(0, str(ROOT / p))


def step_rate(step_log: list[tuple[float, int]], warmup: int) -> tuple[float, float]:
    """(tokens/s, s a step) of a Trainer's step_log after `warmup` untimed steps."""
    tokens = sum(n for _, n in step_log[warmup:])
    elapsed = step_log[-1][0] - step_log[warmup - 1][0]
    return tokens / elapsed, elapsed / (len(step_log) - warmup)


def main(config_path: str, backend: str, warmup: str) -> None:
    import torch
    import transformers

    from kubetune_trainer.config import TrainingConfig
    from kubetune_trainer.train import Trainer

    skip = int(warmup)
    cfg = TrainingConfig.model_validate(json.loads(Path(config_path).read_text()))
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, workdir=Path(d) / "work", environ={**os.environ, "KUBETUNE_BACKEND": backend})
        result = trainer.run()
        trainer.ckpts.close()
        log = trainer.step_log
    if len(log) <= skip:
        raise SystemExit(f"{backend}: {len(log)} steps logged ({result})")
    tokens_per_s, s_per_step = step_rate(log, skip)
    print(
        json.dumps(
            {
                "backend": backend,
                "tokens_per_s": tokens_per_s,
                "s_per_step": s_per_step,
                # ru_maxrss: KiB on Linux
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "compute_dtype": str(trainer.compute_dtype).removeprefix("torch."),
                "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
