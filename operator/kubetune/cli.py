"""The `kubetune` command."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

EXIT_USAGE = 64


def _run(args: argparse.Namespace) -> int:
    import kopf

    from kubetune import handlers, metrics

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )
    for noisy in ("kopf", "kubernetes", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    handlers.register(
        workers=args.workers, namespaces=args.namespace, progress_interval_s=args.progress_interval
    )
    priority = args.priority
    if priority is None:
        # kopf pauses every peer that ties with another: replicas must never tie
        priority = random.randint(1, 2**31 - 1) if args.peering else 0
    kopf.run(
        priority=priority,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        peering_name=args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


def _render(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from kubetune.api import FineTuneJobSpec
    from kubetune.decision.decide import validation_messages
    from kubetune.manifests import build_attempt
    from kubetune.placement import gpu_memory_note

    docs = [
        d
        for d in yaml.safe_load_all(Path(args.file).read_text() if args.file != "-" else sys.stdin.read())
        if d
    ]
    text = ""
    for doc in docs:
        if doc.get("kind") != "FineTuneJob":
            continue
        meta = doc.get("metadata") or {}
        name = meta.get("name", "job")
        try:
            spec = FineTuneJobSpec.model_validate(doc.get("spec") or {})
        except ValidationError as e:
            print(f"{args.file}: FineTuneJob {name} is invalid:", file=sys.stderr)
            for msg in validation_messages(e):
                print(f"  {msg}", file=sys.stderr)
            return EXIT_USAGE
        uid = "<uid of the FineTuneJob>"
        objects = build_attempt(name, uid, spec, attempt=1, preemptions=0).objects()
        for obj in objects:
            obj["metadata"]["namespace"] = meta.get("namespace", "default")
        # as YAML comments: the output stays something `kubectl apply -f -` takes
        text += "".join(f"# FineTuneJob {name}: {line}\n" for line in gpu_memory_note(spec))
        text += yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True)
    if not text:
        print(f"{args.file}: no FineTuneJob found", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kubetune", description="Fine-tune LLMs on Kubernetes.")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
    run.add_argument("-n", "--namespace", action="append", help="watch only this namespace (repeatable)")
    run.add_argument("--workers", type=int, default=8, help="concurrent reconciles")
    run.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off)")
    run.add_argument("--metrics-address", default="0.0.0.0")
    run.add_argument("--health-port", type=int, default=0, help="liveness /healthz port (0: off)")
    run.add_argument("--standalone", action="store_true", help="no peering between operator replicas")
    run.add_argument("--peering", default=None, help="kopf peering object name (for replicas > 1)")
    run.add_argument(
        "--priority",
        type=int,
        default=None,
        help="kopf peering priority: the highest works, the rest stand by (default: random with --peering)",
    )
    run.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        help="seconds between polls of running trainers' /progress",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)

    render = sub.add_parser("render", help="print the objects the operator would create (no cluster needed)")
    render.add_argument("file", help="a FineTuneJob YAML file, or - for stdin")
    render.set_defaults(func=_render)

    from kubetune import adapters

    adapters.add_parser(sub)

    args = ap.parse_args(argv)
    sys.exit(args.func(args))
