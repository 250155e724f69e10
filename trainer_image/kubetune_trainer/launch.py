"""A worker pod's entry point when it runs several trainer processes (one per GPU):

    python -m kubetune_trainer.launch [trainer args...]

It is torchrun's static rendezvous without torchrun's agent. Each process gets the
environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR, MASTER_PORT, for init_method env://), with this pod's index
as the node rank. What torchrun would change, and the operator relies on, stays ours:
torchrun reports any failed child as exit 1 and gives its children a fixed 30 s after
SIGTERM — a clean preemption (exit 75 after the checkpoint) would read as a failure
and a slow final checkpoint would be killed inside the pod's grace period.

Input (set by the operator): KUBETUNE_RANK (pod index), KUBETUNE_WORKERS (pods),
KUBETUNE_PROCS_PER_WORKER, MASTER_ADDR, MASTER_PORT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kubetune_trainer.contract import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, is_permanent

POLL_S = 0.2
AFTER_FAILURE_S = 30.0  # the rest of the pod's processes, once one failed


def process_env(environ: dict, local_rank: int) -> dict:
    """The environment of local process `local_rank` of this pod."""
    node_rank = int(environ.get("KUBETUNE_RANK", 0))
    nodes = int(environ.get("KUBETUNE_WORKERS", 1))
    per_node = int(environ.get("KUBETUNE_PROCS_PER_WORKER", 1))
    threads = {}
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        # the pod's cores (the operator's OMP_NUM_THREADS) shared by its processes
        threads = {"OMP_NUM_THREADS": str(max(1, int(environ["OMP_NUM_THREADS"]) // per_node))}
    return {
        **environ,
        **threads,
        "RANK": str(node_rank * per_node + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(nodes * per_node),
        "LOCAL_WORLD_SIZE": str(per_node),
        "GROUP_RANK": str(node_rank),
        "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT", "29500"),
    }


def combined_exit_code(codes: list[int]) -> int:
    """One exit code for the pod from its processes' codes (the operator's contract):
    a configuration/data error (64-78 but 75) wins, then any other failure, then 75
    (every process that stopped, stopped after the checkpoint), else 0."""
    codes = [EXIT_FAILED if c < 0 else c for c in codes]  # killed by a signal
    permanent = [c for c in codes if is_permanent(c)]
    if permanent:
        return permanent[0]
    failed = [c for c in codes if c not in (EXIT_OK, EXIT_PREEMPTED)]
    if failed:
        return failed[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    per_node = int(os.environ.get("KUBETUNE_PROCS_PER_WORKER", 1))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", *args], env=process_env(dict(os.environ), local)
        )
        for local in range(per_node)
    ]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # the pod's grace period is theirs: each process checkpoints (rank 0) and exits 75
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, EXIT_OK, EXIT_PREEMPTED) for p in procs):
            # a process failed: the others would wait for it in a collective forever
            failed_at = time.monotonic()
            forward(signal.SIGTERM, None)
        elif failed_at is not None and time.monotonic() - failed_at > AFTER_FAILURE_S:
            forward(signal.SIGKILL, None)
        time.sleep(POLL_S)
    return combined_exit_code([p.returncode for p in procs])


if __name__ == "__main__":
    sys.exit(main())
