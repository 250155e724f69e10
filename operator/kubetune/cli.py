"""The `kubetune` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _dev(args: argparse.Namespace) -> int:
    from kubetune.devcluster import supervisor

    return {"up": supervisor.up, "down": supervisor.down, "serve": supervisor.serve}[args.action](
        args.workdir
    )


def _demo(args: argparse.Namespace) -> int:
    from kubetune import demo

    return demo.run(args.workdir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kubetune", description="Fine-tune LLMs on Kubernetes.")
    sub = ap.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="a local dev cluster: real control plane, fake GPU nodes, MinIO")
    dev.add_argument("action", choices=["up", "down", "serve"])
    dev.add_argument("--workdir", type=Path, default=Path(".dev"))
    dev.set_defaults(func=_dev)
    demo = sub.add_parser("demo", help="the quick-start demo on a throwaway dev cluster")
    demo.add_argument("--workdir", type=Path, default=None)
    demo.set_defaults(func=_demo)
    args = ap.parse_args(argv)
    sys.exit(args.func(args))
