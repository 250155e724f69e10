"""The data stream: every format reads the same records; order is deterministic per
(seed, epoch); a stream restored from any saved state continues exactly; malformed
records are counted and fatal only past the threshold; the validation split is stable."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import zstandard

from kubetune_trainer.data import DataError, RecordStream, StreamState, in_validation, list_shards
from kubetune_trainer.storage import LocalStore


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i:04d}", "text": f"record {i} " + "x" * (i % 7)} for i in range(start, start + n)]


def write_shards(root, fmt: str, shards: list[list[dict]]):
    root.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        text = "".join(json.dumps(r) + "\n" for r in shard).encode()
        if fmt == "jsonl":
            (root / f"part-{i}.jsonl").write_bytes(text)
        elif fmt == "gz":
            (root / f"part-{i}.jsonl.gz").write_bytes(gzip.compress(text))
        elif fmt == "zst":
            (root / f"part-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(shard), root / f"part-{i}.parquet", row_group_size=7)
    return LocalStore(root)


SHARDS = [rows(23), rows(17, 23), rows(31, 40)]


def take(stream: RecordStream, n: int) -> list[str]:
    it = iter(stream)
    return [next(it).sample_id for _ in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "zst", "parquet"])
def test_every_format_yields_every_record_once_per_epoch(tmp_path, fmt):
    store = write_shards(tmp_path / fmt, fmt, SHARDS)
    ids = take(RecordStream(store, seed=1, window=8), 71 * 2)
    all_ids = sorted(r["id"] for shard in SHARDS for r in shard)
    assert sorted(ids[:71]) == all_ids and sorted(ids[71:]) == all_ids
    assert ids[:71] != ids[71:], "the second epoch must be shuffled differently"
    assert ids[:71] != [r["id"] for shard in SHARDS for r in shard], "records must be shuffled"


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "zst", "parquet"])
def test_formats_read_the_same_records_in_file_order(tmp_path, fmt):
    # (shuffled orders differ between formats on purpose: they are drawn from the shard names)
    store = write_shards(tmp_path / fmt, fmt, SHARDS)
    stream = RecordStream(store, seed=5, window=8, shuffle=False, epochs=1)
    assert [(r.sample_id, r.data["text"]) for r in stream] == [
        (r["id"], r["text"]) for s in SHARDS for r in s
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "parquet"])
def test_restored_stream_continues_exactly_from_any_point(tmp_path, fmt):
    store = write_shards(tmp_path, fmt, SHARDS)
    full = take(RecordStream(store, seed=3, window=5), 160)
    for cut in [0, 1, 4, 5, 6, 22, 23, 40, 70, 71, 72, 100]:
        stream = RecordStream(store, seed=3, window=5)
        it = iter(stream)
        head = [next(it).sample_id for _ in range(cut)]
        saved = json.loads(json.dumps(stream.state.to_json()))  # as a checkpoint stores it
        resumed = RecordStream(store, seed=3, window=5, state=StreamState.from_json(saved))
        assert head + take(resumed, 160 - cut) == full, f"diverged after a resume at {cut}"


def test_plain_jsonl_resumes_at_a_byte_offset(tmp_path):
    store = write_shards(tmp_path, "jsonl", [rows(40)])
    stream = RecordStream(store, seed=0, window=10, shuffle=False)
    it = iter(stream)
    for _ in range(25):
        next(it)
    text = (tmp_path / "part-0.jsonl").read_bytes()
    # the window holding record 25 starts at record 20: its byte offset is where line 20 starts
    assert stream.state.window_record == 20
    assert stream.state.window_byte == len(b"".join(text.splitlines(keepends=True)[:20]))


def test_shard_order_depends_on_seed_and_epoch_only(tmp_path):
    store = write_shards(tmp_path, "jsonl", [rows(3, i * 3) for i in range(12)])
    assert take(RecordStream(store, seed=9, window=2), 72) == take(RecordStream(store, seed=9, window=2), 72)
    assert take(RecordStream(store, seed=9, window=2), 36) != take(RecordStream(store, seed=10, window=2), 36)


def test_malformed_records_are_counted_then_fatal_past_the_threshold(tmp_path):
    good = [json.dumps(r) for r in rows(300)]
    lines = good[:]
    for i in (10, 50, 90):  # 1 %
        lines[i] = "{not json"
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jsonl").write_text("\n".join(lines) + "\n")
    stream = RecordStream(LocalStore(tmp_path / "ok"), seed=0, max_bad_fraction=0.02, epochs=1)
    assert len(list(stream)) == 297 and stream.bad.bad == 3
    assert "a.jsonl:11" in stream.bad.examples[0]

    bad = good[:]
    for i in range(0, 300, 10):  # 10 %
        bad[i] = "[1, 2]"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataError, match=r"malformed \(more than 2.0%\)"):
        list(RecordStream(LocalStore(tmp_path / "bad"), seed=0, max_bad_fraction=0.02, epochs=1))


def test_a_pass_with_no_training_record_is_an_error_not_an_endless_loop(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.jsonl").write_text("\n\n   \n")
    with pytest.raises(DataError, match="no training record in a whole pass over file://"):
        next(iter(RecordStream(LocalStore(tmp_path / "blank"), seed=0)))
    # every record held out for validation: the same
    store = write_shards(tmp_path / "held", "jsonl", [rows(20)])
    with pytest.raises(DataError, match="holds every record out"):
        next(iter(RecordStream(store, seed=0, keep=lambda r: False)))
    # a stream resumed at the very end of an epoch is not mistaken for an empty one
    state = StreamState(epoch=0, shard_pos=1)
    assert next(iter(RecordStream(store, seed=0, state=state))).sample_id.startswith("r")


def test_no_shards_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no \.jsonl, \.jsonl\.gz, \.jsonl\.zst, \.parquet shards under"):
        list_shards(LocalStore(tmp_path))


def test_validation_split_is_stable_and_about_the_fraction():
    ids = [f"sample-{i}" for i in range(5000)]
    held = [i for i in ids if in_validation(i, 0.1)]
    assert 400 < len(held) < 600
    assert held == [i for i in ids if in_validation(i, 0.1)]
    assert not any(in_validation(i, None) for i in ids[:100])


def test_window_shuffle_never_drops_records_with_random_windows(tmp_path):
    rng = random.Random(0)
    shards = [rows(rng.randint(1, 30), i * 100) for i in range(6)]
    store = write_shards(tmp_path, "jsonl", shards)
    n = sum(map(len, shards))
    for window in (1, 2, 7, 64):
        assert sorted(take(RecordStream(store, seed=rng.randint(0, 99), window=window), n)) == sorted(
            r["id"] for s in shards for r in s
        )
