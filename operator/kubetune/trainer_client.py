"""The operator's side of a trainer's HTTP endpoint: GET /progress, and the POSTs of its
control paths (a checkpoint now, a standby's start) with the pod's bearer token."""

from __future__ import annotations

import http.client
import json
import socket
import time

from kubetune.manifests import PROGRESS_PORT


def fetch_progress(address: str, port: int = PROGRESS_PORT, deadline_s: float = 2.0) -> dict | None:
    """The trainer's /progress, or None (starting up, busy, gone, too slow, too big, not
    a JSON object): never an error. The deadline is for the whole exchange, not per read:
    a trainer that trickles a byte a second cannot hold a fetcher for longer."""
    end = time.monotonic() + deadline_s
    try:
        with socket.create_connection((address, port), timeout=deadline_s) as sock:
            sock.settimeout(max(end - time.monotonic(), 0.001))
            sock.sendall(f"GET /progress HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            while len(data) <= MAX_PROGRESS_RESPONSE:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                chunk = sock.recv(16384)
                if not chunk:
                    break
                data += chunk
            else:
                return None  # larger than any progress report
        head, sep, payload = bytes(data).partition(b"\r\n\r\n")
        if not sep or head.split(b" ", 2)[1:2] != [b"200"]:
            return None
        body = json.loads(payload)
        return body if isinstance(body, dict) else None
    except (OSError, ValueError, IndexError):
        return None


MAX_PROGRESS_RESPONSE = 64 * 1024


def request_checkpoint(
    address: str, token: str | None, reason: str, port: int = PROGRESS_PORT, timeout_s: float = 3.0
) -> dict | None:
    """POST /checkpoint to a trainer: its answer ({"accepted", "coalesced", "step"}), or
    None (no token on the pod, unreachable, refused, not JSON)."""
    return control_request(address, token, "/checkpoint", {"reason": reason}, port, timeout_s)


def control_request(
    address: str, token: str | None, path: str, body: dict, port: int = PROGRESS_PORT, timeout_s: float = 3.0
) -> dict | None:
    """POST to a trainer's control path with the pod's bearer token: its JSON answer, or
    None (no token on the pod, unreachable, refused, not JSON)."""
    if not token:
        return None
    conn = http.client.HTTPConnection(address, port, timeout=timeout_s)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        body = response.read(MAX_PROGRESS_RESPONSE)
        if response.status != 202:
            return None
        answer = json.loads(body)
        return answer if isinstance(answer, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()
