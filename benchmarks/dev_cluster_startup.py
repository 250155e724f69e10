"""Warm-cache start-to-ready time of the dev cluster (target: under 20 s).

Baseline, in the same run: the bare control plane (etcd + kube-apiserver answering
/readyz), the floor any Kubernetes test environment pays. The rest is the
controller-manager, scheduler, kwok, pod runner, MinIO and node registration.
Last line: ratio=<full start ÷ bare control plane>.

    make bench-startup      (or: python benchmarks/dev_cluster_startup.py --runs 3)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from kubetune_dev.devcluster.cluster import DevCluster

BARE = "kube-apiserver /readyz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    full, bare = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as d:
            cluster = DevCluster(Path(d), log=lambda *_: None)
            with cluster:
                full.append(cluster.startup_s)
                bare.append(cluster.timings[BARE])
                steps = ", ".join(f"{k} {v:.1f}" for k, v in cluster.timings.items())
                print(f"run {i + 1}: ready in {cluster.startup_s:.2f} s ({steps})")
    f, b = statistics.median(full), statistics.median(bare)
    print(
        f"median start to ready: full dev cluster {f:.2f} s (target < 20 s: {'met' if f < 20 else 'MISSED'}); "
        f"bare control plane {b:.2f} s"
    )
    print(f"ratio={f / b:.2f}")


if __name__ == "__main__":
    main()
