"""Packing is lossless and invisible to the model: a packed sequence's loss equals the
loss of its examples run one by one (attention never crosses examples), and a sequence
stream restored from any saved state yields exactly the sequences that followed."""

from __future__ import annotations

import itertools
import json

import pytest

from kubetune_trainer.config import Dataset, TrainingConfig
from kubetune_trainer.data import RecordStream
from kubetune_trainer.sequences import Sequence, SequenceStream, collate, label_tokens, make_encoder
from kubetune_trainer.storage import LocalStore
from tests.trainer.conftest import SQL_DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok_and_model(tiny_model):
    from kubetune_trainer.model import load_model, load_tokenizer

    cfg = TrainingConfig.model_validate(
        {
            "model": {"uri": f"file://{tiny_model}"},
            "dataset": {"uri": "file:///x/", "template": "text-to-sql"},
            "lora": {"r": 4, "dropout": 0.0},
            "checkpoint": {"uri": "file:///x/"},
            "output": {"uri": "file:///x/"},
        }
    )
    tok = load_tokenizer(str(tiny_model), cfg.model)
    model = load_model(cfg, "cpu", str(tiny_model))
    model.eval()
    return tok, model, cfg


def sql_stream(tok, max_len=160, packing=True, state=None):
    ds = Dataset(uri="file:///x/", template="text-to-sql", maxSeqLength=max_len, packing=packing)
    records = RecordStream(LocalStore(SQL_DATA / "train"), seed=7, window=64)
    enc = make_encoder(tok, ds)
    if state:
        return SequenceStream.restore(records, enc, max_len, packing, state)
    return SequenceStream(records, enc, max_len, packing)


def test_packed_loss_equals_the_examples_run_alone(tok_and_model):
    import torch

    from kubetune_trainer.train import lm_loss

    tok, model, _ = tok_and_model
    _, packed = next(iter(sql_stream(tok, max_len=400)))
    assert len(packed.sample_ids) >= 3, "want several examples in one sequence"
    batch = collate([packed], tok.pad_token_id, packing=True)
    with torch.no_grad():
        total = lm_loss(model, batch, 1, sparse_logits=True).item()
        # the same examples, one sequence each (no packing, no padding)
        alone, start = 0.0, 0
        for length in _lengths(packed):
            s = Sequence(
                packed.input_ids[start : start + length],
                packed.labels[start : start + length],
                list(range(length)),
                [],
            )
            alone += lm_loss(
                model, collate([s], tok.pad_token_id, packing=False), 1, sparse_logits=True
            ).item()
            start += length
    assert abs(total - alone) < 1e-3 * max(1.0, abs(alone)), (total, alone)
    assert label_tokens(batch) > 0


def _lengths(seq: Sequence) -> list[int]:
    starts = [i for i, p in enumerate(seq.position_ids) if p == 0] + [len(seq.position_ids)]
    return [b - a for a, b in itertools.pairwise(starts)]


def test_every_example_is_whole_and_sequences_fit(tok_and_model):
    tok, _, _ = tok_and_model
    it = iter(sql_stream(tok, max_len=200))
    seen = []
    for _ in range(40):
        _, seq = next(it)
        assert len(seq.input_ids) <= 200
        assert seq.labels.count(tok.eos_token_id) == len(seq.sample_ids)  # one EOS closes each example
        seen += seq.sample_ids
    assert len(seen) == len(set(seen)), "an example appeared twice within the first epoch"


@pytest.mark.parametrize("packing", [True, False])
def test_restored_sequence_stream_continues_exactly(tok_and_model, packing):
    tok, _, _ = tok_and_model
    reference = [s.sample_ids for _, (_, s) in zip(range(60), sql_stream(tok, packing=packing), strict=False)]
    for cut in (1, 7, 33):
        stream = sql_stream(tok, packing=packing)
        it = iter(stream)
        head = [next(it)[1].sample_ids for _ in range(cut)]
        state = json.loads(json.dumps(stream.state()))
        resumed = sql_stream(tok, packing=packing, state=state)
        tail = [s.sample_ids for _, (_, s) in zip(range(60 - cut), resumed, strict=False)]
        assert head + tail == reference, f"diverged after a resume at sequence {cut}"
