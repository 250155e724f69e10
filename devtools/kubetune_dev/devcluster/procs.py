"""Child processes that die with their parent and stop as a whole process group."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    args: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start args in its own session (so a stop reaches its whole group), with output
    to log_path, SIGKILLed by the kernel if the spawning thread dies first: no orphan
    survives a crashed or SIGKILLed test run."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def in_private_mount_namespace(script: str, name: str, *args: str) -> list[str]:
    """The command that runs a shell script ($0 = name, then args) in a private mount
    namespace: binds it makes onto fixed paths stay its own and vanish with it."""
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, name, *args]


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed process nobody reaps keeps its /proc entry; some
    containers never reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> int | None:
    """SIGTERM the process group, SIGKILL it after grace_s; returns the exit status."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    _signal_group(proc.pid, signal.SIGKILL)  # also reaps grandchildren left in the group
    return proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1, procs=()):
    """Poll predicate until it returns a truthy value; fail early if a watched
    process died (its log names why) and with `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for name, proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; log {log}:\n{tail(log)}"
                )
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # not ready yet: connection refused, 503, ...
            last_error = e
        time.sleep(interval_s)
    raise TimeoutError(
        f"timed out after {timeout_s:.0f} s waiting for {what}"
        + (f" (last error: {last_error})" if last_error else "")
    )


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
