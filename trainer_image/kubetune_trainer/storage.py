"""One small interface over s3:// prefixes and local folders (file:// or a plain path):
list, streamed reads that survive a dropped connection, uploads, downloads, deletes.

Retries of whole calls are botocore's (standard mode, generous attempts, so an S3 server
that is away for tens of seconds is waited out). What botocore cannot do is resume a
*body* that breaks mid-stream: `S3Reader` reopens the object with a Range request at the
byte it had reached, so a long shard is never re-read from the start."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

log = logging.getLogger("kubetune.storage")

# botocore standard retry mode: exponential backoff with jitter, capped at 20 s per wait.
S3_MAX_ATTEMPTS = int(os.environ.get("KUBETUNE_S3_MAX_ATTEMPTS", "12"))
# a body that breaks is reopened at its offset this many times in a row before giving up
STREAM_REOPENS = 8


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root, '/'-separated
    size: int
    etag: str | None = None  # S3's ETag; a local file's size and mtime (what changes when it does)


class Store(Protocol):
    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def open(self, key: str, offset: int = 0) -> BinaryIO: ...
    def read_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, path: Path, key: str) -> None: ...
    def download(self, key: str, path: Path) -> None: ...
    def delete(self, keys: list[str]) -> None: ...
    def copy(self, src: str, dest: str) -> None: ...


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class UnsafePath(ValueError):
    """An object key or manifest name that would land outside its folder."""


def inside(root: Path, name: str) -> Path:
    """root/name, refused unless it stays inside root (the zip-slip rule). Keys and
    manifest names come from a bucket others may write to: an absolute name, a `..`
    component, a backslash or an empty component is never made into a path."""
    parts = name.split("/")
    odd = "\\" in name or "\0" in name
    if odd or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing {name!r}: not a plain relative path")
    path = root.joinpath(*parts)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):  # a symlink already in root pointing out
        raise UnsafePath(f"refusing {name!r}: resolves outside {root}")
    return path


def missing(error: Exception) -> bool:
    """An S3 error that says the object or bucket is not there (gone since a listing)."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    return str((response.get("Error") or {}).get("Code")) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _file_etag(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def open_store(uri: str) -> Store:
    """s3://bucket/prefix, file:///abs/path or a plain local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "":
        return LocalStore(Path(uri))
    raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r}: use s3://, file:// or a path")


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"file://{root.resolve()}"

    def _path(self, key: str) -> Path:
        return inside(self.root, key) if key else self.root

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size, _file_etag(base))]
        if not base.is_dir():
            return []
        found = [
            ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size, _file_etag(p))
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".partial")
        ]
        return sorted(found, key=lambda o: o.key)

    def open(self, key: str, offset: int = 0) -> BinaryIO:
        f = open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it
        f.seek(offset)
        return f

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dest)  # readers never see half a file

    def put_file(self, path: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), path)

    def copy(self, src: str, dest: str) -> None:
        self.put_file(self._path(src), dest)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # drop folders left empty (a pruned checkpoint), deepest first
        for key in sorted({k.rpartition("/")[0] for k in keys}, key=len, reverse=True):
            d = self._path(key)
            while d != self.root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent


def s3_client():
    """Credentials, region and endpoint come from the standard AWS environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL), which the
    operator fills from the job's Secret. Nothing here ever logs them."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        config=Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=5,
            read_timeout=30,
            s3={"addressing_style": "path"} if os.environ.get("AWS_ENDPOINT_URL") else None,
        ),
    )


class S3Store:
    def __init__(self, bucket: str, prefix: str, client=None) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self.client = client or s3_client()

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix)
        # "data/" must not match "data-old/": list under the folder, unless it names one object
        folder = full + "/" if full else ""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue  # a "folder" marker (S3 consoles create them), not a file
                if key == full or key.startswith(folder):
                    rel = key[len(self.prefix) :].lstrip("/") if self.prefix else key
                    out.append(ObjectInfo(rel, obj["Size"], obj.get("ETag", "").strip('"') or None))
        return sorted(out, key=lambda o: o.key)

    def open(self, key: str, offset: int = 0) -> BinaryIO:
        return io.BufferedReader(S3Reader(self.client, self.bucket, self._key(key), offset), 1 << 20)

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, path: Path, key: str) -> None:
        # boto3's managed transfer: multipart for large files, parts retried
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        self.client.download_file(self.bucket, self._key(key), str(tmp))
        os.replace(tmp, path)

    def copy(self, src: str, dest: str) -> None:
        # server-side, boto3's managed copy (multipart past 5 GB: a merged model)
        self.client.copy({"Bucket": self.bucket, "Key": self._key(src)}, self.bucket, self._key(dest))

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})


class S3Reader(io.RawIOBase):
    """A sequential read of one object that, when the connection drops mid-body,
    reopens it with `Range: bytes=<offset>-` and carries on. Opening is retried by
    botocore; a reopen that keeps failing raises after STREAM_REOPENS tries."""

    def __init__(self, client, bucket: str, key: str, offset: int = 0) -> None:
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        self.offset = offset
        self.size: int | None = None
        self.body = None
        self.reopens = 0  # total, for tests and logs

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        kwargs = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self.client.get_object(Bucket=self.bucket, Key=self.key, **kwargs)
        self.body = resp["Body"]
        if self.size is None:
            length = resp["ContentLength"]
            self.size = self.offset + length

    def readinto(self, buf) -> int:
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        if self.size is not None and self.offset >= self.size:
            return 0
        failures = 0
        while True:
            try:
                if self.body is None:
                    self._open()
                    if self.offset >= (self.size or 0):
                        return 0
                data = self.body.read(len(buf))
                if not data and self.offset < (self.size or 0):
                    raise OSError(f"connection closed at byte {self.offset} of {self.size}")
                break
            except (OSError, BotoCoreError, HTTPError, ClientError) as e:
                if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in (
                    "NoSuchKey",
                    "NoSuchBucket",
                    "AccessDenied",
                    "InvalidRange",
                ):
                    raise
                failures += 1
                self.reopens += 1
                self._close_body()
                if failures > STREAM_REOPENS:
                    raise
                log.warning(
                    "s3://%s/%s: read broke at byte %d (%s); reopening there",
                    self.bucket,
                    self.key,
                    self.offset,
                    type(e).__name__,
                )
                time.sleep(min(2**failures * 0.25, 10))
        n = len(data)
        buf[:n] = data
        self.offset += n
        return n

    def _close_body(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
            self.body = None

    def close(self) -> None:
        self._close_body()
        super().close()
