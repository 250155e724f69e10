"""The `kubetune` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_USAGE = 64


def _run(args: argparse.Namespace) -> int:
    import kopf

    from kubetune import handlers, leader, metrics
    from kubetune.runtime import Allocator

    Allocator().limit_arenas()  # before any thread starts (the metrics server's first)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )
    for noisy in ("kopf", "kubernetes", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)
    timings = leader.Timings(args.lease_duration, args.renew_deadline, args.retry_period)
    if args.leader_elect and (problems := leader.timing_problems(timings)):
        for problem in problems:
            print(f"kubetune run: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    elector = None
    if args.leader_elect:
        elector = _lead(args, timings)
    else:
        metrics.set_leader(True)
    handlers.register(
        workers=args.workers, namespaces=args.namespace, progress_interval_s=args.progress_interval
    )
    # standalone: kopf's own peering is off; replicas coordinate through the Lease
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    if elector is not None:
        elector.release()  # stopped gracefully: a standby takes over at once
    return 0


def _lead(args: argparse.Namespace, timings):
    """Block until this replica holds the Lease (a standby watches and writes nothing),
    answering the liveness probe meanwhile; then every API write checks the Lease first."""
    from kubernetes import client

    from kubetune import kube, leader, metrics

    elector = leader.LeaderElector(
        # no hidden retries: a renewal gets one request at a time, within the renew deadline
        client.CoordinationV1Api(kube.Kube.from_environment(pool_size=2, retries=False).api),
        leader.default_namespace(args.leader_election_namespace),
        args.leader_election_id,
        leader.default_identity(),
        timings,
        on_change=metrics.set_leader,
    )
    metrics.set_leader(False)
    health = leader.serve_standby_health(args.health_port) if args.health_port else None
    try:
        elector.acquire()
    finally:
        if health is not None:  # kopf serves /healthz on this port from here on
            health.shutdown()
            health.server_close()
    kube.before_acting = elector.ensure_leading
    return elector


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
    run.add_argument(
        "--leader-elect",
        action="store_true",
        help="act only while holding a Lease (for replicas > 1): the others stand by",
    )
    run.add_argument(
        "--leader-election-namespace",
        default=None,
        help="the Lease's namespace (default: the pod's, else default)",
    )
    run.add_argument("--leader-election-id", default="kubetune", help="the Lease's name")
    run.add_argument(
        "--lease-duration",
        type=int,  # the Lease's leaseDurationSeconds is whole seconds
        default=15,
        help="seconds a standby waits, after the Lease last changed, before it takes over",
    )
    run.add_argument(
        "--renew-deadline",
        type=float,
        default=10.0,
        help="seconds the leader goes on without renewing before it stops (< --lease-duration)",
    )
    run.add_argument(
        "--retry-period", type=float, default=2.0, help="seconds between tries to acquire or renew"
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
