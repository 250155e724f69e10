"""Leader election over a coordination.k8s.io/v1 Lease, after client-go's leaderelection:
one replica acts, the others stand by. Pure decisions first; LeaderElector does the I/O."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
EXIT_LOST_LEASE = 3  # the Deployment restarts the replica, as a standby

CREATE, ACQUIRE, RENEW, WAIT = "create", "acquire", "renew", "wait"


@dataclass(frozen=True)
class Timings:
    """client-go's three durations, in seconds."""

    # how long a standby waits after the record last changed (whole seconds, as in the Lease)
    lease_duration_s: int = 15
    renew_deadline_s: float = 10.0  # how long the leader keeps acting without a renewal
    retry_period_s: float = 2.0  # between attempts, to acquire or renew


def timing_problems(t: Timings) -> list[str]:
    """What is wrong with these timings (nothing: []). The leader must stop (renew
    deadline) before a standby may start (lease duration), and retry within the deadline."""
    problems = [
        f"{name} must be > 0, not {value:g}"
        for name, value in (
            ("--lease-duration", t.lease_duration_s),
            ("--renew-deadline", t.renew_deadline_s),
            ("--retry-period", t.retry_period_s),
        )
        if value <= 0
    ]
    if problems:
        return problems
    if t.renew_deadline_s >= t.lease_duration_s:
        problems.append(
            f"--renew-deadline ({t.renew_deadline_s:g} s) must be shorter than --lease-duration "
            f"({t.lease_duration_s:g} s): a leader that cannot renew must stop before a standby may take over"
        )
    if t.retry_period_s >= t.renew_deadline_s:
        problems.append(
            f"--retry-period ({t.retry_period_s:g} s) must be shorter than --renew-deadline "
            f"({t.renew_deadline_s:g} s): the leader must get more than one try to renew"
        )
    return problems


def holder_identity(pod_name: str | None, hostname: str, suffix: str) -> str:
    """The pod's name (or the host's) and a random suffix: a restarted replica in the same
    pod is a new holder, never one that believes it still holds the Lease."""
    return f"{pod_name or hostname}_{suffix}"


def election_namespace(
    flag: str | None, env_namespace: str | None, service_account_namespace: str | None
) -> str:
    """Where the Lease lives: the flag, else the pod's namespace (env, then the service
    account's file), else "default"."""
    for candidate in (flag, env_namespace, service_account_namespace):
        if candidate and candidate.strip():
            return candidate.strip()
    return "default"


def micro_time(now: dt.datetime) -> str:
    """A MicroTime as the API server writes it."""
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def observed_change_at(previous: dict | None, current: dict | None, previous_at: float, now: float) -> float:
    """The local time the record was last seen to change. Expiry is judged by it, never by
    the renewTime another replica's clock wrote (clocks of two nodes need not agree)."""
    return previous_at if previous == current else now


def lease_valid(record: dict | None, observed_at: float, now: float) -> bool:
    """Whether the holder named in the record may still be acting, by our own clock."""
    if not record or not record.get("holderIdentity"):
        return False
    return observed_at + float(record.get("leaseDurationSeconds") or 0) > now


@dataclass(frozen=True)
class Decision:
    action: str  # CREATE, ACQUIRE, RENEW or WAIT
    record: dict | None = None  # the Lease spec to write (None: WAIT)


def decide(
    record: dict | None,
    observed_at: float,
    identity: str,
    now: float,
    stamp: str,
    lease_duration_s: int,
    exists: bool = True,
) -> Decision:
    """One round of client-go's tryAcquireOrRenew. `record` is the Lease's spec as last
    read, `observed_at` the local time it last changed, `stamp` now as a MicroTime."""
    fresh = {
        "holderIdentity": identity,
        "leaseDurationSeconds": int(lease_duration_s),
        "acquireTime": stamp,
        "renewTime": stamp,
        "leaseTransitions": 0,
    }
    if not exists:
        return Decision(CREATE, fresh)
    record = record or {}
    mine = record.get("holderIdentity") == identity
    if not mine and lease_valid(record, observed_at, now):
        return Decision(WAIT)
    transitions = int(record.get("leaseTransitions") or 0)
    if mine:
        return Decision(
            RENEW,
            {**fresh, "acquireTime": record.get("acquireTime") or stamp, "leaseTransitions": transitions},
        )
    return Decision(ACQUIRE, {**fresh, "leaseTransitions": transitions + 1})


def renew_overdue(last_renewed_at: float | None, now: float, renew_deadline_s: float) -> bool:
    """Whether the leader went the renew deadline without a renewal (counted from when the
    last successful renewal was sent: the holder's term can only have begun later)."""
    return last_renewed_at is None or now - last_renewed_at >= renew_deadline_s


def release_record(record: dict | None, stamp: str) -> dict:
    """client-go's ReleaseOnCancel: no holder, a 1 s lease, the transitions kept."""
    return {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": stamp,
        "renewTime": stamp,
        "leaseTransitions": int((record or {}).get("leaseTransitions") or 0),
    }


# -- I/O ---------------------------------------------------------------------------------


def default_identity() -> str:
    return holder_identity(os.environ.get("POD_NAME"), socket.gethostname(), uuid.uuid4().hex[:8])


def default_namespace(flag: str | None) -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            from_file = f.read()
    except OSError:
        from_file = None
    return election_namespace(flag, os.environ.get("POD_NAMESPACE"), from_file)


def _spec_of(lease: dict) -> dict:
    """The election record of a Lease: the fields client-go writes, None dropped."""
    spec = lease.get("spec") or {}
    keys = ("holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime", "leaseTransitions")
    return {k: spec[k] for k in keys if spec.get(k) is not None}


class LeaderElector:
    """Holds (or waits for) one Lease. `acquire()` blocks until this replica leads; the
    renew thread then keeps the Lease and ends the process the moment it cannot;
    `ensure_leading()` is the same check before each reconcile and API write."""

    def __init__(
        self,
        coordination,  # kubernetes.client.CoordinationV1Api
        namespace: str,
        name: str,
        identity: str,
        timings: Timings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] = lambda leading: None,
    ) -> None:
        self.api = coordination
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timings = timings
        self.clock = clock
        self.on_change = on_change
        self.record: dict | None = None  # the Lease's spec as last read or written
        self.resource_version: str | None = None
        self.observed_at = 0.0
        self.renewed_at: float | None = None  # when the last successful write was sent
        self.leading = False
        self.released = False  # handed back after a graceful stop
        self.release_done = threading.Event()  # the hand-back's write finished (or failed)
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def _request_timeout(self) -> float:
        """What is left of the renew deadline (client-go bounds a renewal's requests by
        it): a slow API server gets all of it, a hung one no more."""
        if self.leading and self.renewed_at is not None:
            return max(0.1, self.renewed_at + self.timings.renew_deadline_s - self.clock())
        return self.timings.renew_deadline_s

    def _read(self) -> dict | None:
        try:
            resp = self.api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=self._request_timeout()
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease, decide, write with its resourceVersion (a 409 is
        another replica's write in between: this round is lost). True: we hold it."""
        sent_at = self.clock()
        lease = self._read()
        now = self.clock()
        record = _spec_of(lease) if lease is not None else None
        if lease is not None:
            self.observed_at = observed_change_at(self.record, record, self.observed_at, now)
            self.record = record
            self.resource_version = lease["metadata"].get("resourceVersion")
        decision = decide(
            record,
            self.observed_at,
            self.identity,
            now,
            micro_time(dt.datetime.now(dt.UTC)),
            self.timings.lease_duration_s,
            exists=lease is not None,
        )
        if decision.action == WAIT:
            return False
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": decision.record,
        }
        try:
            if decision.action == CREATE:
                resp = self.api.create_namespaced_lease(
                    self.namespace, body, _preload_content=False, _request_timeout=self._request_timeout()
                )
            else:
                body["metadata"]["resourceVersion"] = self.resource_version
                resp = self.api.replace_namespaced_lease(
                    self.name,
                    self.namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=self._request_timeout(),
                )
        except ApiException as e:
            if e.status == 409:  # another replica wrote first
                return False
            raise
        written = json.loads(resp.data)
        self.record = _spec_of(written)
        self.resource_version = written["metadata"].get("resourceVersion")
        self.observed_at = self.clock()
        self.renewed_at = sent_at
        if decision.action in (CREATE, ACQUIRE):
            log.info(
                "leader election: %s acquired %s (transition %s)",
                self.identity,
                self.where,
                self.record.get("leaseTransitions"),
            )
        return True

    def _round(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except Exception as e:  # the API server unreachable, a timeout: try again next round
            log.warning("leader election: %s: %s", self.where, e)
            return False

    def acquire(self) -> None:
        """Block until this replica holds the Lease; then keep it in a thread of its own."""
        log.info("leader election: %s standing by for %s", self.identity, self.where)
        last_holder = None
        while not self._round():
            holder = (self.record or {}).get("holderIdentity")
            if holder != last_holder:
                log.info("leader election: %s is held by %s", self.where, holder or "nobody")
                last_holder = holder
            time.sleep(self.timings.retry_period_s)
        self.leading = True
        self.on_change(True)
        log.info("leader election: %s leads from now on (%s)", self.identity, self.where)
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lease-renew")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self.stop.wait(self.timings.retry_period_s):
            # first, before any I/O: a pause (SIGSTOP, a frozen VM) that outlasted the
            # deadline ends the process the moment it runs again
            if renew_overdue(self.renewed_at, self.clock(), self.timings.renew_deadline_s):
                self.lost(f"not renewed for {self.timings.renew_deadline_s:g} s (the renew deadline)")
            if self._round():
                continue
            holder = (self.record or {}).get("holderIdentity")
            if holder and holder != self.identity:
                self.lost(f"{holder} holds it now")
            if renew_overdue(self.renewed_at, self.clock(), self.timings.renew_deadline_s):
                self.lost(f"not renewed for {self.timings.renew_deadline_s:g} s (the renew deadline)")

    def ensure_leading(self) -> None:
        """Before a reconcile or a write: a replica past its renew deadline stops at once,
        whatever it was doing (after a pause, say, before its renew thread could notice)."""
        if self.released:
            # the operator is stopping and a successor may be acting already: the write
            # (a reconcile still in flight) is not made, the stop completes here
            log.info("leader election: %s handed %s back; stopping before a write", self.identity, self.where)
            # not before the hand-back's own write is through: cut short, the standby would
            # wait out the whole lease duration
            self.release_done.wait(self.timings.renew_deadline_s)
            self._exit(0)
        if not self.leading:
            self.lost("not the leader")
        if renew_overdue(self.renewed_at, self.clock(), self.timings.renew_deadline_s):
            self.lost(f"not renewed for {self.timings.renew_deadline_s:g} s (the renew deadline)")

    def lost(self, why: str) -> None:
        """client-go's OnStoppedLeading -> fatal: stop acting now, no cleanup that could
        write; the Deployment starts the replica again, as a standby."""
        log.error("leader election: %s lost %s: %s; exiting", self.identity, self.where, why)
        self._exit(EXIT_LOST_LEASE)

    @staticmethod
    def _exit(code: int) -> None:
        """At once: no cleanup (atexit, thread joins) that could still write."""
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)

    def release(self) -> None:
        """After a graceful stop: hand the Lease back (no holder, 1 s), so that a standby
        takes over at its next retry instead of after the lease duration."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._request_timeout() + 1)
        if not self.leading:
            return
        self.released = True  # from here on, a write ends the process instead
        self.on_change(False)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": self.resource_version,
            },
            "spec": release_record(self.record, micro_time(dt.datetime.now(dt.UTC))),
        }
        try:
            self.api.replace_namespaced_lease(
                self.name,
                self.namespace,
                body,
                _preload_content=False,
                _request_timeout=self.timings.renew_deadline_s,
            )
        except Exception as e:  # a 409: someone else wrote it meanwhile, not ours to release
            log.warning("leader election: %s not released: %s", self.where, e)
            return
        finally:
            self.release_done.set()
        log.info("leader election: %s released %s", self.identity, self.where)


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # (the name http.server calls)
        ok = self.path.split("?")[0] == "/healthz"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"standing by\n" if ok else b"not found\n")

    def log_message(self, *args) -> None:  # a probe every few seconds is not news
        pass


def serve_standby_health(port: int, address: str = "0.0.0.0") -> http.server.HTTPServer:
    """/healthz while standing by (kopf, which serves it for the leader, is not started
    yet): the liveness probe must not restart a healthy standby. shutdown() before kopf."""
    server = http.server.ThreadingHTTPServer((address, port), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True, name="standby-healthz").start()
    return server
