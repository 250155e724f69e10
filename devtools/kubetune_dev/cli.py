"""`python -m kubetune_dev`: the dev cluster, its spot market, the demo, the trainer run
locally, and the generators (CRDs, the chart's copy, the README's reference)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kubetune_dev import REPO_ROOT

EXIT_USAGE = 64


def _dev(args: argparse.Namespace) -> int:
    from kubetune_dev.devcluster import supervisor

    if args.action == "down":
        return supervisor.down(args.workdir)
    return {"up": supervisor.up, "serve": supervisor.serve}[args.action](args.workdir, kueue=args.kueue)


def _spot_market(args: argparse.Namespace) -> int:
    """Reclaim the dev cluster's spot nodes at random until the duration is over or ^C."""
    import json
    import signal
    import threading

    from kubernetes import client, config

    from kubetune_dev.devcluster.cluster import DevCluster, Endpoints
    from kubetune_dev.devcluster.spot import SpotMarket, spot_nodes

    workdir = args.workdir.resolve()
    kubeconfig = workdir / "kubeconfig"
    if not kubeconfig.exists():
        print(f"no dev cluster in {workdir}: start one with `make dev-up`", file=sys.stderr)
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
    from kubetune_dev import demo

    return demo.run(args.workdir)


def _train(args) -> int:
    """The trainer, locally. Local example configs name ${KUBETUNE_MODELS} (models
    converted once into the cache, SmolLM2 from its wheel) and ${KUBETUNE_EXAMPLES}."""
    from kubetune_dev.local_models import SMOLLM2, cached_smollm2, models_dir

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


def _generate(args: argparse.Namespace) -> int:
    from kubetune_dev import crd

    return crd.main(["--check"] if args.check else [])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kubetune_dev", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

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

    demo = sub.add_parser("demo", help="the quick-start demo on a throwaway dev cluster")
    demo.add_argument("--workdir", type=Path, default=None)
    demo.set_defaults(func=_demo)

    generate = sub.add_parser("generate", help="write crds/, the chart's CRD copy and the README reference")
    generate.add_argument("--check", action="store_true", help="fail if they differ from api.py's")
    generate.set_defaults(func=_generate)

    args = ap.parse_args(argv)
    sys.exit(args.func(args))
