"""Helpers shared by the unit tests: the reconcile World of tests/unit/test_status.py (a
job, its pods and a clock, patched like the API server does) and a committed checkpoint."""

from __future__ import annotations

import copy
import datetime as dt

from kubetune.decision.conditions import merge_patch
from kubetune.decision.decide import decide
from kubetune.gang import Fit
from tests.helpers import finetune_job

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def job(**spec):
    """Job "j" in namespace "ns", as the handlers hand it to decide: no apiVersion or kind,
    an empty status; `spec` replaces top-level fields of the minimal spec."""
    return finetune_job(
        "j", metadata={"namespace": "ns", "uid": "u1", "generation": 1}, status={}, typed=False, **spec
    )


def apply_merge(target: dict, patch: dict) -> dict:
    out = copy.deepcopy(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = apply_merge(out[k], v)
        else:
            out[k] = v
    return out


class World:
    """A job, its pods, and a clock; reconcile() runs decide and applies the plan."""

    def __init__(self, j):
        self.job = j
        self.pods: dict[str, dict] = {}
        self.now = T0
        self.plans = []
        self.gang = Fit(True, "room for all")  # what the handler found on the nodes
        self.noticed: tuple[str, ...] = ()  # nodes under a termination notice

    def reconcile(self, times=1, progress=None):
        for _ in range(times):
            gated = any(p["spec"].get("schedulingGates") for p in self.pods.values())
            plan = decide(
                self.job,
                list(self.pods.values()),
                self.now,
                progress=progress,
                gang=self.gang if gated else None,
                noticed=self.noticed,
            )
            self.plans.append(plan)
            for pod in plan.create:
                self.pods.setdefault(pod["metadata"]["name"], copy.deepcopy(pod))
            for name in plan.ungate:
                self.pods[name]["spec"].pop("schedulingGates")
            for name in plan.delete:
                self.pods[name]["metadata"]["deletionTimestamp"] = "x"
            self.job["status"] = apply_merge(self.job["status"], merge_patch(self.job["status"], plan.status))
        return self.job["status"]

    def set_pod(self, name, phase, exit_code=None, node="n1", **extra):
        pod = self.pods[name]
        pod["spec"]["nodeName"] = node
        pod["status"] = {"phase": phase, **extra}
        if exit_code is not None:
            pod["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": exit_code}}}]

    def remove(self, name):
        self.pods.pop(name)


def commit(store, step: int) -> None:
    """Commit checkpoint `step` (a one-line state.json) to a CheckpointStore and wait for it."""
    folder = store.local_dir(step)
    (folder / "state.json").write_text(f'{{"step": {step}}}')
    store.commit(step, folder, wait=True)
