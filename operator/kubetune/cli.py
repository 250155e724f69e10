"""The `kubetune` command."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

EXIT_USAGE = 64


def _dev(args: argparse.Namespace) -> int:
    from kubetune.devcluster import supervisor

    if args.action == "down":
        return supervisor.down(args.workdir)
    return {"up": supervisor.up, "serve": supervisor.serve}[args.action](args.workdir, kueue=args.kueue)


def _spot_market(args: argparse.Namespace) -> int:
    """Reclaim the dev cluster's spot nodes at random until the duration is over or ^C."""
    import json
    import signal
    import threading

    from kubernetes import client, config

    from kubetune.devcluster.cluster import DevCluster, Endpoints
    from kubetune.devcluster.spot import SpotMarket, spot_nodes

    workdir = args.workdir.resolve()
    kubeconfig = workdir / "kubeconfig"
    if not kubeconfig.exists():
        print(f"no dev cluster in {workdir}: start one with `kubetune dev up`", file=sys.stderr)
        return EXIT_USAGE
    cluster = DevCluster(workdir, endpoints=Endpoints("", "", "", "", kubeconfig))
    core = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
    nodes = args.nodes.split(",") if args.nodes else spot_nodes(core)
    market = SpotMarket(
        core,
        nodes,
        args.rate,
        seed=args.seed,
        cloud=args.cloud,
        notice_s=args.notice,
        return_s=args.return_after,
        time_scale=args.time_scale,
        duration_s=args.duration,
        hard_loss=cluster.lose_pod,
    )
    print(market.describe(), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    market.start()
    done.wait(args.duration / args.time_scale)
    market.stop()
    print(json.dumps({"reclaims": market.summary()}, indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kubetune import demo

    return demo.run(args.workdir)


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
    from kubetune.manifests import build_pods, build_service
    from kubetune.placement import gpu_memory_note
    from kubetune.status import validation_messages

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
        objects = build_pods(name, uid, spec, attempt=1, preemptions=0)
        if spec.workers > 1:
            objects.insert(0, build_service(name, uid))
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


def _train(args) -> int:
    """The trainer, locally. Local example configs name ${KUBETUNE_MODELS} (models
    converted once into the cache, SmolLM2 from its wheel) and ${KUBETUNE_EXAMPLES}."""
    import os

    from kubetune.devcluster.cluster import REPO_ROOT
    from kubetune_trainer.local_models import SMOLLM2, cached_smollm2, models_dir

    models = Path(os.environ.setdefault("KUBETUNE_MODELS", str(models_dir())))
    os.environ.setdefault("KUBETUNE_EXAMPLES", str(REPO_ROOT / "examples"))
    os.environ.setdefault("KUBETUNE_CACHE", str(models_dir().parent))
    if SMOLLM2 in Path(args.config).read_text():
        cached_smollm2(models)
    from kubetune_trainer.__main__ import main as train_main

    extra = ["--workdir", str(args.workdir)] if args.workdir else []
    if args.progress_port is not None:
        extra += ["--progress-port", str(args.progress_port)]
    return train_main([args.config, *extra])


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

    dev = sub.add_parser("dev", help="a local dev cluster: real control plane, fake GPU nodes, MinIO")
    dev_sub = dev.add_subparsers(dest="action", required=True)
    for action in ("up", "down", "serve"):
        p = dev_sub.add_parser(action)
        p.add_argument("--workdir", type=Path, default=Path(".dev"))
        if action != "down":
            p.add_argument(
                "--kueue",
                action="store_true",
                help="also Kueue (built from its Go module), a ClusterQueue and LocalQueue named kubetune",
            )
        p.set_defaults(func=_dev)
    market = dev_sub.add_parser(
        "spot-market",
        help="reclaim the dev cluster's spot nodes at random, each announced the way a cloud does",
    )
    market.add_argument("--workdir", type=Path, default=Path(".dev"))
    market.add_argument("--rate", type=float, default=6.0, help="reclaims per hour (Poisson)")
    market.add_argument("--seed", type=int, default=0)
    market.add_argument("--cloud", choices=["gke", "aws", "karpenter", "azure"], default="gke")
    market.add_argument("--notice", type=float, default=None, help="seconds of notice (default: the cloud's)")
    market.add_argument("--return-after", type=float, default=120.0, help="seconds until capacity comes back")
    market.add_argument("--time-scale", type=float, default=1.0, help="10: an hour of market in 6 minutes")
    market.add_argument("--duration", type=float, default=3600.0, help="seconds of market time")
    market.add_argument("--nodes", default=None, help="comma-separated (default: every spot node)")
    market.set_defaults(func=_spot_market)

    train = sub.add_parser(
        "train", help="run the trainer here, on a config file (e.g. examples/local-text-to-sql.yaml)"
    )
    train.add_argument("config", help="YAML/JSON: a FineTuneJob or its training part")
    train.add_argument(
        "--workdir", type=Path, default=None, help="local scratch (default: a temporary folder)"
    )
    train.add_argument("--progress-port", type=int, default=None, help="serve /progress and /metrics here")
    train.set_defaults(func=_train)

    from kubetune import adapters

    adapters.add_parser(sub)

    demo = sub.add_parser("demo", help="the quick-start demo on a throwaway dev cluster")
    demo.add_argument("--workdir", type=Path, default=None)
    demo.set_defaults(func=_demo)

    args = ap.parse_args(argv)
    sys.exit(args.func(args))
