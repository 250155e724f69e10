"""Data streaming throughput from a real MinIO: records/s read, parsed and tokenized by
kubetune's resumable stream (windowed deterministic shuffle, byte-offset state, malformed
record accounting) against the plain way in the same run — boto3 get_object of each
whole shard, split lines, json.loads — both feeding the same tokenizing encoder.

Last line: ratio=<kubetune records/s ÷ raw records/s>. Target >= 0.8.

    python benchmarks/data_stream.py [--shards 8 --records 5000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image", "devtools", ""):
    sys.path.insert(0, str(ROOT / p))

from kubetune_dev.devcluster.minio import MinioServer  # noqa: E402
from kubetune_trainer.config import Dataset  # noqa: E402
from kubetune_trainer.data import Record, RecordStream  # noqa: E402
from kubetune_trainer.sequences import make_encoder  # noqa: E402
from kubetune_trainer.storage import S3Store, s3_client  # noqa: E402
from tests.helpers import sql_records, tiny_sql_llama  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--records", type=int, default=5000, help="per shard")
    args = ap.parse_args()
    base = sql_records()
    with tempfile.TemporaryDirectory() as d, MinioServer(Path(d) / "minio") as minio:
        s3 = minio.client()
        s3.create_bucket(Bucket="bench")
        total_bytes = 0
        for shard in range(args.shards):
            lines = []
            for i in range(args.records):
                r = dict(base[(shard * args.records + i) % len(base)])
                r["id"] = f"s{shard}-{i}"
                lines.append(json.dumps(r))
            body = ("\n".join(lines) + "\n").encode()
            total_bytes += len(body)
            s3.put_object(Bucket="bench", Key=f"sql/part-{shard:04d}.jsonl", Body=body)
        tok_dir = tiny_sql_llama(Path(d) / "tok", vocab_size=2048)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        encode = make_encoder(tok, Dataset(uri="s3://bench/sql/", template="text-to-sql"))
        n = args.shards * args.records
        for k, v in minio.env().items():
            import os

            os.environ[k] = v

        def raw() -> float:
            t0 = time.monotonic()
            count = 0
            client = s3_client()
            keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="bench", Prefix="sql/")["Contents"])
            for key in keys:
                body = client.get_object(Bucket="bench", Key=key)["Body"].read()
                for line in body.splitlines():
                    data = json.loads(line)
                    encode(Record(data["id"], data))
                    count += 1
            assert count == n
            return n / (time.monotonic() - t0)

        def ours() -> float:
            t0 = time.monotonic()
            count = 0
            for record in RecordStream(S3Store("bench", "sql", s3_client()), seed=1, epochs=1):
                encode(record)
                count += 1
            assert count == n
            return n / (time.monotonic() - t0)

        raw(), ours()  # warm: connections, tokenizer caches
        raws, streams = [], []
        for _ in range(3):  # interleaved, so drift on this shared machine hits both
            raws.append(raw())
            streams.append(ours())
    r, s = max(raws), max(streams)
    print(f"{n} records in {args.shards} shards, {total_bytes / 1e6:.1f} MB, MinIO on localhost")
    print(
        f"raw boto3 download + parse + tokenize: {r:,.0f} records/s (runs: {', '.join(f'{x:,.0f}' for x in raws)})"
    )
    print(
        f"kubetune stream + tokenize:            {s:,.0f} records/s (runs: {', '.join(f'{x:,.0f}' for x in streams)})"
    )
    print(f"target >= 0.8: {'met' if s / r >= 0.8 else 'MISSED'}")
    print(f"ratio={s / r:.2f}")


if __name__ == "__main__":
    main()
