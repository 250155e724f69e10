"""Checkpoints under <checkpoint.uri>/step-NNNNNNNN/: adapter, optimizer, scheduler, RNG
and data-stream state, then `manifest.json` with every file's sha256 — written last, so
a checkpoint without a manifest (an upload cut short by the end of a grace period) never
looks complete. Resume takes the newest checkpoint whose files all match their manifest;
anything else is skipped with a warning and pruned later.

Uploads run on one background thread, at most one in flight: a new checkpoint waits for
the previous upload, then training goes on while it uploads."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.storage import Store, inside, join, missing

log = logging.getLogger("kubetune.checkpoints")

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 2  # 2: RNG and scheduler state as JSON, no pickle but the weights-only optimizer


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_manifest(folder: Path, step: int, attempt: int = 0) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "attempt": attempt,
        "files": {
            p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in files
        },
    }


def steps_in(keys: list[str]) -> dict[int, set[str]]:
    """step -> relative file names, from a listing of the checkpoint prefix."""
    found: dict[int, set[str]] = {}
    for key in keys:
        head, _, rest = key.partition("/")
        m = STEP_DIR.match(head)
        if m and rest:
            found.setdefault(int(m.group(1)), set()).add(rest)
    return found


def to_prune(verified: list[int], all_steps: list[int], keep: int) -> list[int]:
    """Keep the newest `keep` verified checkpoints; drop everything older than the oldest
    of them, and anything else older than the newest of them. A checkpoint newer than every
    verified one stays, whatever it is: it may still be uploading, and one that is corrupt
    must not be what pushes the good ones out."""
    kept = sorted(verified, reverse=True)[:keep]
    if not kept:
        return []
    newest = max(kept)
    return sorted(s for s in all_steps if s not in kept and s < newest)


def checked_manifest(doc, step: int) -> dict:
    """`doc` (parsed from the bucket, so anything JSON can be) if it has a manifest's
    shape for checkpoint `step`: an object of this format and step whose "files" maps
    each name to an object with a sha256 string. ValueError otherwise: the checkpoint is
    skipped like one whose hashes do not match."""
    if not isinstance(doc, dict):
        raise ValueError(f"manifest is a JSON {type(doc).__name__}, not an object")
    fmt, named = doc.get("format"), doc.get("step")
    if fmt != FORMAT_VERSION or type(named) is not int or named != step:
        raise ValueError(f"manifest of another format or step: {fmt!r}, {named!r}")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ValueError(f'manifest "files" is a JSON {type(files).__name__}, not an object')
    for name, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise ValueError(f"manifest entry {name!r} has no sha256")
    return doc


def attempt_named(doc) -> int:
    """The attempt a fence or a manifest names (0: none, or not a whole number)."""
    value = doc.get("attempt") if isinstance(doc, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class RunMismatch(Exception):
    """The checkpoint prefix holds another run's checkpoints."""


class Fenced(Exception):
    """A newer attempt of the job has taken over the checkpoint prefix: this one is a
    leftover (force-deleted, partitioned) and must neither write nor prune there."""


FENCE = "attempt.json"  # {"attempt": N}: the newest attempt that has claimed the prefix


@dataclass
class Restored:
    step: int
    folder: Path  # local copy, verified
    uri: str
    contents: dict | None = None  # what `read` made of the folder


# what makes a checkpoint unusable (and skipped) rather than the resume fail: bad or missing
# files, a name outside its folder, a payload the weights-only reader refuses
UNUSABLE = (ValueError, KeyError, TypeError, OSError, pickle.UnpicklingError, RuntimeError)


class CheckpointStore:
    def __init__(
        self, store: Store, keep: int, workdir: Path | None = None, attempt: int = 0, on_commit=None
    ) -> None:
        self.store, self.keep, self.attempt = store, keep, attempt
        # called with {"step", "uri", "time"} once a checkpoint exists for a reader (from the
        # upload thread): what the trainer reports as its last checkpoint, never one in flight
        self.on_commit = on_commit
        self.fenced = False  # set once a newer attempt is seen holding the prefix
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-ckpt-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-upload")
        self.in_flight: concurrent.futures.Future | None = None
        # steps known good: committed by this process or restored after every check. Pruning
        # counts only these, so a corrupt newest checkpoint never displaces the good ones.
        self.verified: set[int] = set()

    def uri(self, step: int) -> str:
        return f"{self.store.uri.rstrip('/')}/{step_dir(step)}/"

    def local_dir(self, step: int) -> Path:
        d = self.workdir / step_dir(step)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    # -- save ---------------------------------------------------------------------------
    def commit(self, step: int, folder: Path, wait: bool = False) -> None:
        """Upload `folder` (already filled by the caller) as checkpoint `step`."""
        self.wait(raise_errors=False)  # at most one upload in flight
        self.in_flight = self.uploader.submit(self._upload, step, folder)
        if wait:
            self.wait()

    def wait(self, raise_errors: bool = True) -> bool:
        """Until the upload in flight is done; whether it committed (True when none was in
        flight). A failed periodic upload is not fatal (the next one may succeed; botocore
        already retried it); a final one is."""
        if self.in_flight is None:
            return True
        t0 = time.monotonic()
        future, self.in_flight = self.in_flight, None
        try:
            future.result()
        except Exception as e:
            if raise_errors:
                raise
            log.warning("a checkpoint upload failed, training goes on: %s", e)
            return False
        finally:
            if time.monotonic() - t0 > 1:
                log.info("waited %.1f s for the previous checkpoint upload", time.monotonic() - t0)
        return True

    # -- fencing (attempts of a job on Kubernetes; a local run is attempt 0) --------------
    def holder(self) -> int:
        """The newest attempt that has claimed the prefix (0: none)."""
        try:
            fence = json.loads(self.store.read_bytes(FENCE))
        except Exception as e:
            if isinstance(e, (OSError, ValueError)) or missing(e):
                return 0
            raise
        return attempt_named(fence)

    def claim(self) -> None:
        """Take the prefix for this attempt, unless a newer one already has it."""
        if not self.attempt:
            return
        holder = self.holder()
        if holder > self.attempt:
            self.fenced = True
            raise Fenced(
                f"attempt {holder} of this job already writes {self.store.uri}; attempt {self.attempt} stops"
            )
        if holder < self.attempt:
            self.store.put_bytes(FENCE, json.dumps({"attempt": self.attempt}).encode())

    def _check_fence(self) -> None:
        if self.attempt and (self.fenced or self.holder() > self.attempt):
            self.fenced = True
            raise Fenced(f"a newer attempt of this job writes {self.store.uri}; attempt {self.attempt} stops")

    def _upload(self, step: int, folder: Path) -> None:
        t0 = time.monotonic()
        self._check_fence()  # a leftover attempt never writes over its successor's
        manifest = make_manifest(folder, step, self.attempt)
        prefix = step_dir(step)
        for name in manifest["files"]:
            self.store.put_file(folder / name, join(prefix, name))
        # last: only now does the checkpoint exist for a reader
        self.store.put_bytes(join(prefix, MANIFEST), json.dumps(manifest, indent=1).encode())
        size = sum(f["size"] for f in manifest["files"].values())
        log.info(
            "checkpoint step %d committed to %s (%.1f MB in %.1f s)",
            step,
            self.uri(step),
            size / 1e6,
            time.monotonic() - t0,
        )
        shutil.rmtree(folder, ignore_errors=True)
        self.verified.add(step)
        if self.on_commit is not None:
            self.on_commit({"step": step, "uri": self.uri(step), "time": utc_now()})
        self.prune()

    def prune(self) -> None:
        try:
            self._check_fence()  # never prune under a newer attempt
            listing = steps_in([o.key for o in self.store.list()])
            verified = [s for s in listing if s in self.verified]
            for s in to_prune(verified, list(listing), self.keep):
                self.store.delete([join(step_dir(s), f) for f in listing[s]])
                log.info("pruned checkpoint step %d", s)
        except Exception as e:  # pruning is housekeeping: never fail training over it
            log.warning("could not prune old checkpoints: %s", e)

    # -- resume -------------------------------------------------------------------------
    def latest(self, read: Callable[[Path], dict] | None = None) -> Restored | None:
        """The newest checkpoint whose files all match its manifest and that `read` (which
        parses them) accepts, copied locally. Anything else is skipped with a warning: an
        incomplete upload, a file gone since the listing, a hash or name that does not
        hold, a payload that is not plain data."""
        listing = steps_in([o.key for o in self.store.list()])
        for step in sorted(listing):
            if MANIFEST not in listing[step]:
                log.warning("skipping checkpoint step %d: no manifest (incomplete upload)", step)
        # each manifest read once: the order needs the attempts, the check the hashes
        manifests = {s: self._read_manifest(s) for s in listing if MANIFEST in listing[s]}
        # the newest attempt's checkpoints first, then the newest step: a leftover older
        # attempt that wrote on (a higher step) does not win over its successor
        order = sorted(manifests, key=lambda s: (attempt_named(manifests[s]), s), reverse=True)
        for step in order:
            folder = None
            try:
                folder = self._fetch_verified(step, manifests[step])
                contents = read(folder) if read else None
            except Exception as e:
                if not (isinstance(e, UNUSABLE) or missing(e)):
                    raise  # S3 unreachable, say: fail the attempt, never resume older work
                log.warning("skipping checkpoint step %d: %s: %s", step, type(e).__name__, e)
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            self.verified.add(step)
            return Restored(step, folder, self.uri(step), contents)
        return None

    def _read_manifest(self, step: int) -> dict | Exception:
        """The manifest, checked for its shape, or why it could not be read or is not a
        manifest (raised in order, by _fetch_verified)."""
        try:
            return checked_manifest(json.loads(self.store.read_bytes(join(step_dir(step), MANIFEST))), step)
        except Exception as e:
            return e

    def _fetch_verified(self, step: int, manifest: dict | Exception) -> Path:
        if isinstance(manifest, Exception):
            raise manifest
        prefix = step_dir(step)
        folder = self.workdir / f"restore-{prefix}"
        shutil.rmtree(folder, ignore_errors=True)
        for name, meta in manifest["files"].items():
            dest = inside(folder, name)
            self.store.download(join(prefix, name), dest)
            digest = sha256_file(dest)
            if digest != meta["sha256"]:
                raise ValueError(
                    f"{name}: sha256 {digest[:12]}… does not match the manifest's {meta['sha256'][:12]}…"
                )
        return folder

    def close(self) -> None:
        self.wait()
        self.uploader.shutdown(wait=True)
