"""Where the project's Go-built binaries and cache are (hack/build-tools.sh, hack/*.sh), and
an HTTP health probe: what the cluster and MinIO both need, kept apart from either."""

from __future__ import annotations

import functools
import ssl
import subprocess
import urllib.request
from pathlib import Path

from kubetune_dev import REPO_ROOT

__all__ = ["REPO_ROOT", "cache_dir", "http_ok", "tool_binary", "tool_dirs"]


@functools.cache
def _tool_dir_names() -> tuple[tuple[str, Path], ...]:
    """hack/build-tools.sh's cache directory per piece: fixed for a checkout, so asked once
    per process (the tests call kubectl and helm hundreds of times)."""
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "build-tools.sh"), "--print"], check=True, capture_output=True, text=True
    ).stdout
    return tuple((k, Path(v)) for k, v in (line.split("=", 1) for line in out.split()))


def tool_dirs() -> dict[str, Path]:
    """Cache directories of the Go-built binaries, as hack/build-tools.sh names them."""
    dirs = dict(_tool_dir_names())
    missing = [k for k, d in dirs.items() if not (d / ".complete").exists()]
    if missing:
        raise RuntimeError(
            f"dev-cluster binaries not built: {', '.join(missing)}; "
            "run hack/build-tools.sh (make tools) first"
        )
    return dirs


def cache_dir() -> Path:
    """The project's cache (hack/*.sh): binaries, venv, images, registry storage."""
    from kubetune_dev.local_models import project_cache

    return project_cache()


def tool_binary(piece: str) -> Path:
    """The binary of a one-binary piece (kubectl, helm, minio), named after it."""
    return tool_dirs()[piece] / piece


def http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
        return r.status == 200
