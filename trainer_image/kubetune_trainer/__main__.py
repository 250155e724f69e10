"""Entry point of the trainer image and of `python -m kubetune_dev train`:

    python -m kubetune_trainer [CONFIG]     (or the config as JSON in $KUBETUNE_CONFIG)

Exit codes and the termination message follow kubetune_trainer.signals."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from kubetune_trainer.contract import (
    CONTROL_TOKEN_ENV,
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_FAILED,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_PREEMPTED,
    STANDBY_ENV,
)
from kubetune_trainer.signals import (
    CheckpointRequest,
    RedactingFilter,
    StartSignal,
    StopFlag,
    redact,
    termination_message,
    write_termination_message,
)

log = logging.getLogger("kubetune.trainer")


def setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    formatter = logging.Formatter(
        f"%(asctime)s.%(msecs)03d %(levelname)s rank{rank} %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime  # UTC, like every Kubernetes timestamp
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


PROCESS_START = time.time()  # the goodput ledger's start of this attempt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="YAML/JSON file: a FineTuneJob or its training part")
    ap.add_argument("--workdir", type=Path, help="local scratch (default: a temporary folder)")
    ap.add_argument("--progress-port", type=int, default=None, help="serve /progress and /metrics here")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank)

    from pydantic import ValidationError

    from kubetune_trainer.checkpoints import Fenced, RunMismatch
    from kubetune_trainer.config import load_config
    from kubetune_trainer.data import DataError

    stop = StopFlag()
    stop.install()
    try:
        cfg = load_config(args.config)
    except (ValidationError, ValueError, OSError) as e:
        return finish(EXIT_CONFIG, "config-error", error=f"invalid configuration: {e}")

    requested = CheckpointRequest()
    start = StartSignal() if os.environ.get(STANDBY_ENV) == "1" else None
    progress = start_progress(args.progress_port, rank, os.environ, requested, start)
    t0 = time.monotonic()
    try:
        from kubetune_trainer.export import evaluation_summary, export
        from kubetune_trainer.model import model_dir
        from kubetune_trainer.train import Preempted, Trainer

        trainer = Trainer(
            cfg,
            stop=stop,
            progress=progress,
            workdir=args.workdir,
            checkpoint_request=requested,
            process_start=PROCESS_START,
            start_signal=start,
        )
        try:
            result = trainer.run()
        except Preempted as p:
            trainer.ckpts.close()
            trainer.close()
            ledger = getattr(trainer, "ledger", None)  # (none: a standby stopped before its go)
            goodput = ledger.report(time.time()) if ledger is not None and trainer.dist.main else None
            return finish(EXIT_PREEMPTED, "preempted", step=p.step, checkpoint=p.checkpoint, goodput=goodput)
        result.metrics["tokens"] = trainer.tokens_seen
        adapter = evaluation = goodput = None
        if trainer.dist.main:
            progress.update(phase="uploading")
            evaluation = evaluation_summary(cfg, result.metrics)
            goodput = trainer.ledger.report(time.time())
            adapter = export(
                cfg,
                trainer.model,
                trainer.tokenizer,
                result,
                trainer.workdir,
                model_dir(cfg.model, trainer.cache),
                trainer.final_weights,  # None unless the model is sharded
                trainer.backend,
                record={
                    "lineage": trainer.lineage,
                    "evaluation": evaluation,
                    "goodput": goodput,
                    "source": source_job(os.environ),
                },
            )
        trainer.ckpts.close()
        trainer.close()
        progress.update(phase="done")
        log.info("done: %d steps in %.0f s", result.step, time.monotonic() - t0)
        return finish(
            EXIT_OK,
            "completed",
            step=result.step,
            checkpoint=result.checkpoint,
            adapter=adapter,
            evaluation=evaluation,
            goodput=goodput,
            # the adapter record's fingerprints: the operator's Adapter object names them too
            lineage=trainer.lineage if trainer.dist.main else None,
        )
    except DataError as e:
        return finish(EXIT_DATA, "data-error", error=str(e))
    except RunMismatch as e:
        return finish(EXIT_CONFIG, "config-error", error=str(e))
    except Fenced as e:  # a leftover attempt: its successor carries the job on
        log.warning("%s", e)
        return finish(EXIT_FAILED, "fenced", error=str(e))
    except FileNotFoundError as e:
        return finish(EXIT_NO_INPUT, "no-input", error=str(e))
    except Exception as e:
        log.error("training failed:\n%s", redact(traceback.format_exc()))
        return finish(EXIT_FAILED, "failed", error=f"{type(e).__name__}: {e}")
    finally:
        progress.close()


def start_progress(port: int | None, rank: int, environ=os.environ, requested=None, start=None):
    """This process's /progress server: every rank's pod answers on the progress port (see
    progress_port_for), on the pod's own IP when known (the downward API gives it), else on
    every address. Only rank 0's answer is the job's status; another rank that cannot bind
    trains on without one. POST /checkpoint takes the pod's control token (set by the
    operator; without one, nobody may ask)."""
    from kubetune_trainer.progress import ProgressServer, progress_port_for

    if port is None and "KUBETUNE_PROGRESS_PORT" in environ:
        port = int(environ["KUBETUNE_PROGRESS_PORT"])
    port = progress_port_for(port, int(environ.get("LOCAL_RANK", 0)))
    host = environ.get("POD_IP") or "0.0.0.0"
    try:
        token = environ.get(CONTROL_TOKEN_ENV) or None
        return ProgressServer(
            port, host, rank=rank, control_token=token, checkpoint_request=requested, start_signal=start
        )
    except OSError as e:
        if rank == 0:
            raise
        log.warning("rank %d serves no /progress: %s:%s: %s", rank, host, port, e)
        return ProgressServer(None, rank=rank)


def source_job(environ) -> dict:
    """The FineTuneJob this trainer runs for (set by the operator; none in a local run)."""
    fields = {"name": "KUBETUNE_JOB", "namespace": "KUBETUNE_NAMESPACE", "uid": "KUBETUNE_JOB_UID"}
    return {k: environ[v] for k, v in fields.items() if environ.get(v)}


def finish(code: int, outcome: str, **fields) -> int:
    text = termination_message(outcome, **fields)
    write_termination_message(text)
    (log.info if code in (EXIT_OK, EXIT_PREEMPTED) else log.error)("exit %d: %s", code, text)
    return code


if __name__ == "__main__":
    sys.exit(main())
