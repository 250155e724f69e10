"""Training data, streamed: shards of JSONL (plain, .gz, .zst) or Parquet under an s3://
prefix or a local folder, read one record at a time — never the whole dataset in memory
or on disk.

Order is deterministic and resumable without a lossy shuffle buffer:
- each epoch visits the shards in an order drawn from (seed, epoch);
- inside a shard, records are read in windows of `window` records, and each window is
  permuted by (seed, epoch, shard, window index).
The stream's whole position is a small JSON-able `StreamState` (epoch, shard position,
window start as record index and byte offset, records taken from the window). Resuming
reopens the shard at the window's byte offset (plain JSONL; compressed shards and Parquet
skip records instead), re-reads that one window and skips what was taken — exactly the
same records follow.

Every rank reads the same global stream; ranks split it at the sequence level (see
`pack`), so there is no overlap and no gap by construction."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.storage import ObjectInfo, Store

log = logging.getLogger("kubetune.data")

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
DEFAULT_WINDOW = 1024


class DataError(Exception):
    """The dataset cannot be used (no shards, too many malformed records)."""


@dataclass
class StreamState:
    epoch: int = 0
    shard_pos: int = 0  # index into this epoch's shard order
    window_record: int = 0  # record index (within the shard) where the current window starts
    window_byte: int = 0  # byte offset of that record (plain JSONL only; else 0)
    taken: int = 0  # records of the current window already handed out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StreamState:
        return cls(**d)


@dataclass
class Record:
    sample_id: str
    data: dict[str, Any]


@dataclass
class BadRecords:
    """Malformed records: counted, reported, fatal only past a fraction."""

    max_fraction: float
    seen: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)

    def ok(self) -> None:
        self.seen += 1

    def add(self, where: str, why: str) -> None:
        self.seen += 1
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")
        log.warning("skipping malformed record %s: %s", where, why)
        # judge only once there is enough to judge by
        if self.seen >= 100 and self.bad / self.seen > self.max_fraction:
            raise DataError(
                f"{self.bad} of {self.seen} records malformed (more than {self.max_fraction:.1%}); "
                f"first: {'; '.join(self.examples)}"
            )


def list_shards(store: Store) -> list[ObjectInfo]:
    shards = [o for o in store.list() if o.key.endswith(SHARD_SUFFIXES) and o.size > 0]
    if not shards:
        raise DataError(f"no {', '.join(SHARD_SUFFIXES)} shards under {store.uri}")
    return shards


def shard_order(keys: list[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    order = sorted(keys)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def window_permutation(n: int, seed: int, epoch: int, key: str, window_index: int) -> list[int]:
    perm = list(range(n))
    random.Random(f"window:{seed}:{epoch}:{key}:{window_index}").shuffle(perm)
    return perm


def in_validation(sample_id: str, fraction: float | None) -> bool:
    """A record is held out by a hash of its id: stable across epochs, resumes and ranks."""
    if not fraction:
        return False
    h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


# -- reading one shard -----------------------------------------------------------------------


def _read_lines(
    store: Store, key: str, start_record: int, start_byte: int
) -> Iterator[tuple[int, int, bytes]]:
    """(record index, byte offset just past the line or 0, raw line) from `start_record` on."""
    if key.endswith(".jsonl"):
        # plain: jump straight to the byte offset (a Range request on S3)
        offset = start_byte
        with store.open(key, start_byte) as raw:
            index = start_record
            for line in raw:
                offset += len(line)
                yield index, offset, line
                index += 1
        return
    with store.open(key) as raw:
        if key.endswith(".gz"):
            stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw)
        else:
            import zstandard

            stream = io.BufferedReader(
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            )
        for index, line in enumerate(stream):
            if index >= start_record:  # compressed: no random access, skip what came before
                yield index, 0, line


def _read_parquet(store: Store, key: str, start_record: int) -> Iterator[tuple[int, int, dict]]:
    import pyarrow.parquet as pq

    with store.open(key) as raw:
        pf = pq.ParquetFile(_seekable(raw, store, key))
        index = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if index + rows <= start_record:  # whole row groups are skipped unread
                index += rows
                continue
            for row in pf.read_row_group(group).to_pylist():
                if index >= start_record:
                    yield index, 0, row
                index += 1


def _seekable(raw, store: Store, key: str):
    """Parquet needs random access (the footer first)."""
    if raw.seekable():
        return raw
    # S3: fetch the object into memory, one shard at a time (Parquet shards are the
    # unit of reading; keep them to a few hundred MB)
    raw.close()
    return io.BytesIO(store.read_bytes(key))


def read_shard(store: Store, key: str, start_record: int, start_byte: int, bad: BadRecords):
    """(record index, byte offset past it or 0, Record) from start_record on; malformed
    lines counted and skipped."""
    if key.endswith(".parquet"):
        for index, _, row in _read_parquet(store, key, start_record):
            bad.ok()
            yield index, 0, Record(str(row.get("id", f"{key}:{index}")), row)
        return
    for index, offset, line in _read_lines(store, key, start_record, start_byte):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except ValueError as e:
            bad.add(f"{key}:{index + 1}", str(e)[:200])
            continue
        bad.ok()
        yield index, offset, Record(str(data.get("id", f"{key}:{index}")), data)


# -- the stream -----------------------------------------------------------------------------


class RecordStream:
    """Endless (epoch after epoch) deterministic stream of training records."""

    def __init__(
        self,
        store: Store,
        seed: int,
        shuffle: bool = True,
        window: int = DEFAULT_WINDOW,
        state: StreamState | None = None,
        keep=lambda record: True,
        max_bad_fraction: float = 0.01,
        epochs: int | None = None,
    ) -> None:
        self.store, self.seed, self.shuffle, self.window = store, seed, shuffle, window
        self.keys = [s.key for s in list_shards(store)]
        self.state = dataclasses.replace(state) if state else StreamState()
        self.keep = keep
        self.bad = BadRecords(max_bad_fraction)
        self.epochs = epochs

    def __iter__(self) -> Iterator[Record]:
        st = self.state
        while self.epochs is None or st.epoch < self.epochs:
            whole = st.shard_pos == 0 and st.window_record == 0 and st.taken == 0  # not a resumed one
            kept = 0
            order = shard_order(self.keys, self.seed, st.epoch, self.shuffle)
            while st.shard_pos < len(order):
                key = order[st.shard_pos]
                for record in self._shard(key):
                    kept += 1
                    yield record
                st.shard_pos, st.window_record, st.window_byte, st.taken = st.shard_pos + 1, 0, 0, 0
            if whole and not kept and self.epochs is None:
                # an endless stream with nothing in it would read every shard for ever
                raise DataError(
                    f"no training record in a whole pass over {self.store.uri}: the shards are empty or "
                    "blank, or dataset.validation.fraction holds every record out"
                )
            st.epoch, st.shard_pos = st.epoch + 1, 0

    def _shard(self, key: str) -> Iterator[Record]:
        st = self.state
        rows = read_shard(self.store, key, st.window_record, st.window_byte, self.bad)
        while True:
            # a window: `window` raw rows (good ones kept), with the offset of the first
            window_rows: list[tuple[int, int, Record]] = []
            for item in rows:
                window_rows.append(item)
                if len(window_rows) == self.window:
                    break
            if not window_rows:
                return
            perm = (
                window_permutation(len(window_rows), self.seed, st.epoch, key, st.window_record)
                if self.shuffle
                else list(range(len(window_rows)))
            )
            while st.taken < len(perm):
                record = window_rows[perm[st.taken]][2]
                st.taken += 1
                if self.keep(record):
                    yield record
            # the next window starts right after this one's last row
            last_index, end_byte, _ = window_rows[-1]
            st.window_record, st.window_byte, st.taken = last_index + 1, end_byte, 0
