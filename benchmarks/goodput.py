"""Goodput under a spot market: the same job (a tiny random Llama, real trainer processes,
data and checkpoints in a real MinIO) under the same seeded reclaim schedule (Poisson, as
kubetune_dev.devcluster.spot draws it), at several rates, under three policies:

  kubetune   as shipped: at the notice, POST /checkpoint and the next attempt started as a
             standby (it loads, then waits); at the reclaim, SIGTERM (the trainer saves
             the step it is at and exits 75), then POST /start to the standby, which
             resumes. The standby shares this machine's 2 cores with the running attempt
             during the notice (on a cluster it has a node of its own): it runs at nice 19
             until its start, which still slows the last steps before a reclaim
  periodic   periodic checkpoints only, no notice handling: at the reclaim the process is
             lost (SIGKILL), the next attempt resumes from the last periodic checkpoint
  scratch    restart from scratch after each loss (no resume: Kubeflow Trainer's and
             KAITO's default)

An uninterrupted run of the same job, in the same run, is the baseline: its wall time less
its useful step time is what any run spends anyway (start, final checkpoint, upload).
goodput = useful / (wall - that), useful being the steps the final adapter is made of at
the run's own step time (its ledger's useful seconds per step kept: a run's steps are 10-20 %
faster or slower than another's on a shared 2-vCPU machine, which is not goodput); the
trainer's own ledger ratio, kubetune_trainer.goodput, is printed beside it. A short
warm-up run comes first, so the baseline's start is not a cold page cache's. A run that has not finished by --cap x
the baseline's wall time is stopped; its useful steps are the ones it would keep. The next attempt starts as soon as the last one is gone (capacity
elsewhere): what a reclaim costs here is the trainer's own restart, not a scheduler's.

Rates are per hour of job time; --scale compresses time (market and notice alike), and is
printed. Prints a table, saves goodput.png (goodput against rate per policy) and ends with
goodput=<kubetune at the lowest rate> ratio=<kubetune / scratch at the lowest rate>.
Targets (issue 16): kubetune >= 0.95 at 6/h and >= 0.85 at 60/h, >= 3x scratch at 6/h,
0 steps lost to a notified reclaim.

    python benchmarks/goodput.py [--steps 2000 --scale 8 --rates 6,30,60 --cap 1.5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image", "devtools", ""):
    sys.path.insert(0, str(ROOT / p))

from kubetune.trainer_client import control_request, request_checkpoint  # noqa: E402
from kubetune_dev.devcluster.minio import MinioServer  # noqa: E402
from kubetune_dev.devcluster.spot import reclaim_times  # noqa: E402
from tests.helpers import tiny_sql_llama  # noqa: E402
from tests.trainer.conftest import start_trainer, tiny_config, upload_sql_data  # noqa: E402

POLICIES = ("kubetune", "periodic", "scratch")
NOTICE_S, GRACE_S = 30.0, 30.0  # GKE's notice and shutdown window, in job time
TOKEN = "bench-control-token"


def job_config(model: Path, run: str, steps: int, every: int) -> dict:
    cfg = tiny_config(model, run, maxSteps=steps, loggingSteps=50)
    cfg["dataset"].pop("validation")  # no evaluation: the job is its steps
    cfg["checkpoint"]["everySteps"] = every
    return cfg


def wipe(s3, prefix: str) -> None:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix=prefix).get("Contents", [])]
    for key in keys:
        s3.delete_object(Bucket="runs", Key=key)


def newest_checkpoint(s3, prefix: str) -> int:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix=prefix).get("Contents", [])]
    steps = [int(k.split("/")[-2].removeprefix("step-")) for k in keys if k.endswith("/manifest.json")]
    return max(steps or [0])


def run_policy(policy: str, rate: float, args, minio, model: Path, work: Path, cap_s: float) -> dict:
    run = f"{policy}-{rate:g}"
    cfg = job_config(model, run, args.steps, args.every)
    notices = reclaim_times(args.seed, rate, cap_s, args.scale)
    notice_s, grace_s = NOTICE_S / args.scale, GRACE_S / args.scale
    s3 = minio.client()
    env = {"KUBETUNE_CONTROL_TOKEN": TOKEN, "OMP_NUM_THREADS": str(args.threads)}
    attempts, reclaims, last_seen = [], 0, 0
    t0 = time.monotonic()

    def start(n: int, standby: bool = False):
        extra = {**env, "KUBETUNE_ATTEMPT": str(n)}
        if last_seen and policy != "scratch":
            extra["KUBETUNE_LAST_SEEN_STEP"] = str(last_seen)
        if standby:
            extra["KUBETUNE_STANDBY"] = "1"
        started = start_trainer(cfg, work / run, minio, f"a{n}", extra_env=extra)
        if standby:
            os.setpriority(os.PRIO_PROCESS, started.proc.pid, 19)
        return started

    def promote(standby):
        """What the operator does once the attempt before has stopped: POST /start to the
        standby (loaded or still loading: it starts as soon as it has loaded)."""
        port = int(standby.env["KUBETUNE_PROGRESS_PORT"])
        os.setpriority(os.PRIO_PROCESS, standby.proc.pid, 0)
        while control_request("127.0.0.1", TOKEN, "/start", {}, port=port) is None:
            if standby.proc.poll() is not None:  # (its server is not up yet: again)
                raise RuntimeError(f"{run}: the standby exited {standby.proc.returncode}")
            time.sleep(0.05)

    proc = start(1)
    attempts.append(proc)
    pending = list(notices)
    noticed = False
    capped = False
    standby = None
    while True:
        now = time.monotonic() - t0
        code = proc.proc.poll()
        if code == 0:
            break
        if code is not None and not pending:
            raise RuntimeError(f"{run}: attempt {len(attempts)} exited {code}:\n{proc.log_text()[-2000:]}")
        if now >= cap_s:
            for p in (proc, standby):
                if p is not None:
                    p.signal(signal.SIGKILL)
                    p.wait(30)
            capped = True
            break
        if pending and now >= pending[0] and not noticed:
            noticed = True
            if policy == "kubetune":
                # what the operator sends (None while the trainer is still starting)
                request_checkpoint(
                    "127.0.0.1", TOKEN, "spot market notice", port=int(proc.env["KUBETUNE_PROGRESS_PORT"])
                )
                if standby is None:
                    standby = start(len(attempts) + 1, standby=True)
        if pending and now >= pending[0] + notice_s:
            pending.pop(0)
            noticed = False
            if code is None:
                if policy == "kubetune":
                    proc.signal(signal.SIGTERM)
                    try:
                        proc.wait(grace_s)
                    except Exception:
                        proc.signal(signal.SIGKILL)
                        proc.wait(30)
                else:
                    proc.signal(signal.SIGKILL)
                    proc.wait(30)
                reclaims += 1
                last_seen = max([last_seen, *(s["step"] for s in proc.steps())])
                if policy == "scratch":
                    wipe(s3, f"{run}/ckpt/")
                if standby is not None:
                    promote(standby)
                    proc, standby = standby, None
                else:
                    proc = start(len(attempts) + 1)
                attempts.append(proc)
        time.sleep(0.05)
    wall = time.monotonic() - t0
    if standby is not None and standby.proc.poll() is None:  # the job ended during a notice
        standby.signal(signal.SIGKILL)
        standby.wait(30)
    executed = sum(len(a.steps()) for a in attempts)
    final = attempts[-1]
    kept = args.steps
    if capped:
        # the steps the run would keep if it went on: what its next attempt would resume
        # from (the newest committed checkpoint), or, from scratch, its last attempt's
        last = max([s["step"] for a in attempts for s in a.steps()] or [0])
        kept = final.last_step() if policy == "scratch" else min(newest_checkpoint(s3, f"{run}/ckpt/"), last)
        ledger = {"usefulSeconds": round(kept * args.step_s, 1)}
    else:
        ledger = final.termination_message().get("goodput") or {}
    out = {
        "policy": policy,
        "rate": rate,
        "reclaims": reclaims,
        "attempts": len(attempts),
        "wall_s": round(wall, 1),
        "useful_s": ledger.get("usefulSeconds", 0.0),
        "recomputed_s": ledger.get("recomputedSeconds"),
        "restart_s": ledger.get("restartSeconds"),
        "waiting_s": ledger.get("waitingSeconds"),
        "steps_kept": kept,
        "steps_recomputed": executed - kept,
        "steps_by_attempt": [
            [a.steps()[0]["step"], a.steps()[-1]["step"]] if a.steps() else [] for a in attempts
        ],
        "finished": not capped,
    }
    if not args.keep:
        shutil.rmtree(work / run, ignore_errors=True)
    return out


def chart(rows: list[dict], rates: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, style in zip(POLICIES, ("o-", "s--", "^:"), strict=True):
        ys = [
            next(r["goodput"] for r in rows if r["policy"] == policy and r["rate"] == rate) for rate in rates
        ]
        ax.plot(
            rates,
            ys,
            style,
            label={
                "kubetune": "kubetune (notice + exact resume)",
                "periodic": "periodic checkpoints only",
                "scratch": "restart from scratch",
            }[policy],
        )
    ax.set_xlabel("reclaims per hour of job time")
    ax.set_ylabel("goodput")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Goodput under a spot market (tiny Llama, 2 vCPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="periodic checkpoints (every policy)")
    ap.add_argument("--scale", type=float, default=8.0, help="job time per real second")
    ap.add_argument("--rates", default="6,30,60")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--cap", type=float, default=1.5, help="x the baseline's wall time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--keep", action="store_true", help="keep each run's logs (under --workdir)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--chart", type=Path, default=ROOT / "benchmarks" / "goodput.png")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as d, MinioServer(Path(d) / "minio") as minio:
        work = Path(d)
        model = tiny_sql_llama(work / "model")
        upload_sql_data(minio)
        warm = start_trainer(
            job_config(model, "warmup", 20, args.every),
            work / "warmup",
            minio,
            "a1",
            extra_env={"OMP_NUM_THREADS": str(args.threads)},
        )
        assert warm.wait(600) == 0, warm.log_text()[-2000:]
        base = start_trainer(
            job_config(model, "baseline", args.steps, args.every),
            work / "baseline",
            minio,
            "a1",
            extra_env={"OMP_NUM_THREADS": str(args.threads)},
        )
        t0 = time.monotonic()
        while not base.steps() and base.proc.poll() is None:
            time.sleep(0.02)
        # a trainer's cold start (imports, model load) to its first step: what a reclaim costs
        # at least, less what a standby can load during the notice
        cold_start = time.monotonic() - t0
        assert base.wait(3600) == 0, base.log_text()[-2000:]
        base_wall = time.monotonic() - t0
        base_useful = base.termination_message()["goodput"]["usefulSeconds"]
        fixed = base_wall - base_useful
        args.step_s = base_useful / args.steps
        hours = base_useful * args.scale / 3600
        print(
            f"baseline (no reclaims): {base_wall:.1f} s wall, {base_useful:.1f} s of steps "
            f"({args.step_s * 1000:.0f} ms a step), {fixed:.1f} s start/checkpoint/upload; "
            f"time scale {args.scale:g}: the job is {hours * 60:.1f} min of job time, "
            f"notice {NOTICE_S / args.scale:.1f} s real; cold start to the first step {cold_start:.1f} s real "
            f"({cold_start * args.scale:.0f} s of job time); expected reclaims: "
            + ", ".join(f"{r:g}/h → {r * hours:.1f}" for r in rates),
            flush=True,
        )
        rows = []
        for rate in rates:
            for policy in args.policies.split(","):
                r = run_policy(policy, rate, args, minio, model, work, args.cap * base_wall)
                spent = max(r["wall_s"] - fixed, 1e-9)
                # this run's own step time where its ledger counts every step it kept
                own_step = (
                    r["useful_s"] / r["steps_kept"] if r["finished"] and r["steps_kept"] else args.step_s
                )
                r["goodput"] = round(min(r["steps_kept"] * own_step / spent, 1.0), 3)
                lost = [r[k] for k in ("recomputed_s", "restart_s", "waiting_s")]
                r["ledger_ratio"] = (
                    round(r["useful_s"] / (r["useful_s"] + sum(lost)), 3)
                    if r["finished"] and None not in lost
                    else None
                )
                rows.append(r)
                print(json.dumps(r), flush=True)
    print()
    print(
        f"{'policy':9} {'rate/h':>6} {'reclaims':>8} {'goodput':>7} {'wall s':>7} {'useful s':>8} "
        f"{'recomp s':>8} {'restart s':>9} {'wait s':>6} {'steps redone':>12} {'finished':>8} {'ledger':>6}"
    )
    for r in rows:

        def f(v):
            return "-" if v is None else f"{v:.1f}"

        print(
            f"{r['policy']:9} {r['rate']:>6g} {r['reclaims']:>8} {r['goodput']:>7.3f} {r['wall_s']:>7.1f} "
            f"{r['useful_s']:>8.1f} {f(r['recomputed_s']):>8} {f(r['restart_s']):>9} {f(r['waiting_s']):>6} "
            f"{r['steps_recomputed']:>12} {r['finished']!s:>8} {f(r['ledger_ratio']) if r['ledger_ratio'] is None else format(r['ledger_ratio'], '.3f'):>6}"
        )
    # The floor no policy passes on this machine: a standby has at most the notice to load
    # (here less: it shares the 2 cores with the attempt it replaces, at nice 19), so each
    # reclaim costs at least the cold start less the notice; with the reclaims each run drew
    notice_real = NOTICE_S / args.scale
    per_reclaim = max(cold_start - notice_real, 0.0)
    bounds = []
    for rate in rates:
        n = next(r["reclaims"] for r in rows if r["policy"] == "kubetune" and r["rate"] == rate)
        bound = args.steps * args.step_s / (args.steps * args.step_s + n * per_reclaim)
        bounds.append(f"{rate:g}/h: {n} reclaims x {per_reclaim:.1f} s -> goodput <= {bound:.3f}")
    print(
        f"upper bound from the cold start ({cold_start:.1f} s) less the notice ({notice_real:.1f} s): "
        + "; ".join(bounds)
    )
    chart(rows, rates, args.chart)
    print(f"chart: {args.chart}")
    low = min(rates)
    ours = next(r["goodput"] for r in rows if r["policy"] == "kubetune" and r["rate"] == low)
    scratch = next(r["goodput"] for r in rows if r["policy"] == "scratch" and r["rate"] == low)
    ratio = ours / scratch if scratch > 0 else math.inf
    print(f"goodput={ours:.3f} ratio={ratio:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
