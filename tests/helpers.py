"""Helpers shared by the tests."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll until predicate returns something truthy (API errors count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}" + (f": {last}" if last else ""))
