"""Two real operator replicas elect a leader through a Lease: a killed leader's standby
takes over within the lease duration with no duplicate pods and every job ends as it
should; a paused leader that lost the Lease exits on resuming without writing anything."""

from __future__ import annotations

import datetime as dt
import signal
import time
import urllib.request

import pytest
from kubernetes import client

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.leader import EXIT_LOST_LEASE
from kubetune_dev.devcluster.procs import free_port, tail
from tests.helpers import SESSION_OPERATOR, OperatorProcess, wait_for
from tests.integration.helpers import create, minimal_job, report_trainer_exit

pytestmark = pytest.mark.cluster
SMALL_CPU = {"accelerator": "cpu", "cpu": "100m", "memory": "128Mi"}  # 50 of them fit the CPU node
# Short timings, so that a takeover takes seconds (the defaults are 15 / 10 / 2 s); a renew
# deadline of 6 s rides out the API server's slow moments on this shared 2-core machine.
LEASE_S, RENEW_S, RETRY_S = 8, 6, 1
LEASE = "kubetune-leader"
JOBS = 50


class Replica(OperatorProcess):
    """One operator replica under leader election, named like a pod of the Deployment."""

    def __init__(self, dev_cluster, namespace: str, pod_name: str, log_dir) -> None:
        self.pod_name = pod_name
        self.health_port = free_port()
        super().__init__(
            dev_cluster.endpoints.kubeconfig,
            log_dir / f"{pod_name}.log",
            free_port(),
            {**dev_cluster.operator_env(), "POD_NAME": pod_name},
            args=(
                f"--namespace={namespace}",  # namespace-scoped: the Lease and jobs of this test only
                "--leader-elect",
                f"--leader-election-namespace={namespace}",
                f"--leader-election-id={LEASE}",
                f"--lease-duration={LEASE_S}",
                f"--renew-deadline={RENEW_S}",
                f"--retry-period={RETRY_S}",
                f"--health-port={self.health_port}",
            ),
        )

    def owns(self, holder: str | None) -> bool:
        return bool(holder) and holder.startswith(f"{self.pod_name}_")

    def get(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.read().decode()

    def leader_gauge(self) -> float:
        metrics = self.get(self.metrics_port, "/metrics")
        (line,) = [line for line in metrics.splitlines() if line.startswith("kubetune_leader ")]
        return float(line.split()[1])

    def log(self) -> str:
        return self.log_path.read_text()

    def watched(self) -> tuple:
        """For wait_for: fail at once, with the log, if this replica dies unexpectedly."""
        return (self.pod_name, self.proc, self.log_path)


@pytest.fixture
def session_operator_paused():
    """The session's operator (when a test before this one started it) watches every
    namespace and would act on these jobs as a third replica outside the election: it is
    stopped meanwhile and restarted after, as the chart tests do. Not started for this."""
    running = [p for p in SESSION_OPERATOR if p.alive()]
    for proc in running:
        proc.stop()
    try:
        yield
    finally:
        for proc in running:
            proc.start()


@pytest.fixture
def coordination(api_client):
    return client.CoordinationV1Api(api_client)


def lease_spec(coordination, namespace: str):
    try:
        return coordination.read_namespaced_lease(LEASE, namespace).spec
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


@pytest.fixture
def replicas(dev_cluster, crd_installed, namespace, session_operator_paused, coordination, tmp_path):
    """(leader, standby): replica-a started first and leading, replica-b standing by."""
    a, b = (Replica(dev_cluster, namespace, name, tmp_path) for name in ("replica-a", "replica-b"))
    try:
        a.start()
        wait_for(
            lambda: (s := lease_spec(coordination, namespace)) and a.owns(s.holder_identity),
            60,
            "replica-a to hold the Lease",
            procs=[a.watched()],
        )
        b.start()
        wait_for(lambda: "standing by" in b.log() and "is held by replica-a_" in b.log(), 60, "b to stand by")
        # a standby answers its liveness probe and says it is one; the leader serves both too
        wait_for(lambda: "standing by" in b.get(b.health_port, "/healthz"), 30, "b's /healthz")
        assert b.leader_gauge() == 0
        wait_for(lambda: a.get(a.health_port, "/healthz") is not None, 30, "a's /healthz (kopf's)")
        assert a.leader_gauge() == 1
        yield a, b
    finally:
        for replica in (a, b):
            replica.stop()


def jobs_of(custom, namespace) -> list[dict]:
    return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]


def pod_names(core, namespace) -> list[str]:
    return sorted(p.metadata.name for p in core.list_namespaced_pod(namespace).items)


def all_in(custom, namespace, phase: str, count: int):
    items = jobs_of(custom, namespace)
    ok = len(items) == count and all((j.get("status") or {}).get("phase") == phase for j in items)
    return ok and items


def finish(core, namespace, pod: str) -> None:
    """What the kubelet reports when the trainer exits 0."""
    report_trainer_exit(core, namespace, pod, "Succeeded", {"exitCode": 0, "reason": "Completed"})


def micro_time_s(stamp) -> float:
    """A Lease time (the client gives a datetime) as epoch seconds."""
    return stamp.replace(tzinfo=stamp.tzinfo or dt.UTC).timestamp()


def test_standby_takes_over_a_leader_killed_during_a_burst(replicas, core, custom, coordination, namespace):
    leader, standby = replicas
    names = [f"burst-{i:02d}" for i in range(JOBS)]
    killed_at = None
    for i, name in enumerate(names):
        create(custom, namespace, minimal_job(name, resources=SMALL_CPU))
        # SIGKILL once the leader has made pods for a few jobs: mid-burst, most jobs still
        # to come (created below, while no replica leads)
        if killed_at is None and len(pod_names(core, namespace)) >= 3:
            renewed_at = micro_time_s(lease_spec(coordination, namespace).renew_time)
            leader.kill()
            killed_at = time.time()
            killed_after = i + 1
    if killed_at is None:  # a slow leader: kill it once it made some pods, not all
        wait_for(lambda: 0 < len(pod_names(core, namespace)) < JOBS, 60, "the leader's first pods")
        renewed_at = micro_time_s(lease_spec(coordination, namespace).renew_time)
        leader.kill()
        killed_at, killed_after = time.time(), JOBS
    assert not leader.alive()
    made_by_leader = pod_names(core, namespace)
    assert 0 < len(made_by_leader) < JOBS, made_by_leader

    spec = wait_for(
        lambda: (s := lease_spec(coordination, namespace)) and standby.owns(s.holder_identity) and s,
        LEASE_S + 2 * RETRY_S + 30,
        "the standby to hold the Lease",
        procs=[standby.watched()],
    )
    # Its acquireTime is the standby's clock, the host's as here. Safety: never sooner than
    # the lease duration after the leader's last renewal (read before the kill; a later one
    # only makes the margin larger). Liveness: the last renewal was at most a retry period
    # before the kill; the standby sees it at its next retry, waits the lease duration and
    # acquires at the retry after, give or take the requests' time on this busy machine.
    acquired_at = micro_time_s(spec.acquire_time)
    takeover_s = acquired_at - killed_at
    print(f"killed after {killed_after} jobs, {len(made_by_leader)} pods; taken over in {takeover_s:.2f} s")
    assert acquired_at - renewed_at >= LEASE_S - 0.5, (acquired_at - renewed_at, killed_after)
    assert takeover_s <= LEASE_S + 2 * RETRY_S + 2, (takeover_s, killed_after)
    assert spec.lease_transitions == 1 and spec.lease_duration_seconds == LEASE_S
    assert f"leader election: {spec.holder_identity} acquired" in standby.log()
    assert standby.leader_gauge() == 1
    # its standby /healthz made way for kopf's on the same port (a moment between the two:
    # the chart's liveness probe allows 3 failures 20 s apart)
    wait_for(lambda: "standing by" not in standby.get(standby.health_port, "/healthz"), 30, "kopf's /healthz")

    try:
        items = wait_for(lambda: all_in(custom, namespace, "Running", JOBS), 120, "all jobs Running")
    except TimeoutError as e:
        raise AssertionError(f"{e}; standby log:\n{tail(standby.log_path, 40)}") from None
    for job in items:
        st = job["status"]
        assert (st["attempt"], st["preemptions"], st["failures"]) == (1, 0, 0), job["metadata"]["name"]
    expected = sorted(f"{name}-a1-w0" for name in names)
    assert pod_names(core, namespace) == expected, "duplicate or missing pods"

    # the trainers finish: the new leader takes every job to Succeeded, making nothing more
    for pod in expected:
        finish(core, namespace, pod)
    items = wait_for(lambda: all_in(custom, namespace, "Succeeded", JOBS), 120, "all jobs Succeeded")
    assert all(j["status"]["attempt"] == 1 for j in items)
    assert pod_names(core, namespace) == expected


def test_a_paused_leader_that_lost_the_lease_exits_without_writing(
    replicas, core, custom, coordination, namespace
):
    leader, standby = replicas
    create(custom, namespace, minimal_job("before", resources=SMALL_CPU))
    wait_for(lambda: pod_names(core, namespace) == ["before-a1-w0"], 60, "the leader to act")

    leader.proc.send_signal(signal.SIGSTOP)  # alive, holding its connections, unable to renew
    try:
        wait_for(
            lambda: standby.owns(lease_spec(coordination, namespace).holder_identity),
            LEASE_S + 2 * RETRY_S + 30,
            "the standby to take over",
            procs=[standby.watched()],
        )
        # the new leader acts: on a job the old one has in its cache, and on a new one
        create(custom, namespace, minimal_job("after", resources=SMALL_CPU))
        wait_for(
            lambda: (
                pod_names(core, namespace) == ["after-a1-w0", "before-a1-w0"]
                and all_in(custom, namespace, "Running", 2)
            ),
            60,
            "the new leader to start the new job",
        )
        resumed_from = leader.log_path.stat().st_size  # what it logs from here, it did after resuming
    finally:
        leader.proc.send_signal(signal.SIGCONT)

    code = wait_for(lambda: leader.proc.poll(), RENEW_S + RETRY_S + 30, "the old leader to exit")
    assert code == EXIT_LOST_LEASE, tail(leader.log_path, 40)
    resumed = leader.log_path.read_bytes()[resumed_from:].decode()
    assert "lost Lease" in resumed and leader.pod_name in resumed, resumed
    # it wrote nothing: a write is logged as a reconcile or a create, and the API server
    # shows no pod or attempt of its making
    acting = [line for line in resumed.splitlines() if "reconciled" in line or "creat" in line.lower()]
    assert not acting, resumed
    assert pod_names(core, namespace) == ["after-a1-w0", "before-a1-w0"]
    assert all(j["status"]["attempt"] == 1 for j in jobs_of(custom, namespace))
    assert standby.alive() and standby.owns(lease_spec(coordination, namespace).holder_identity)


def test_a_leader_stopped_gracefully_hands_the_lease_over_at_once(replicas, coordination, namespace):
    leader, standby = replicas
    leader.stop()  # SIGTERM: kopf stops, then the Lease is released
    stopped_at = time.time()
    assert leader.proc.returncode == 0, tail(leader.log_path, 40)
    assert "released Lease" in leader.log()
    spec = wait_for(
        lambda: (s := lease_spec(coordination, namespace)) and standby.owns(s.holder_identity) and s,
        LEASE_S,
        "the standby to take the released Lease",
        procs=[standby.watched()],
    )
    # at its next retry, not after a lease duration
    assert micro_time_s(spec.acquire_time) - stopped_at <= RETRY_S + 1
