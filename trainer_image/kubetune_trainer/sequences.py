"""Records → tokenized examples → training sequences (packed or one example each) →
this rank's micro-batches, with a resume point after every sequence.

Packing puts whole examples one after another into a sequence of at most max_seq_length
tokens; position ids restart at every example, so attention never crosses examples
(transformers builds a block-diagonal causal mask from them). The resume point after
a sequence is the record stream's state *before* the example left waiting for the next
sequence, so nothing read ahead is lost.

Every rank builds the same global sequence stream and keeps sequence i when
i % world_size == rank: no overlap, no gap, and a step sees the same samples however
many ranks share it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kubetune_trainer.data import Record, RecordStream, StreamState
from kubetune_trainer.templates import RecordError, render

IGNORE = -100


@dataclass
class Example:
    sample_id: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class Sequence:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)

    def add(self, ex: Example) -> None:
        self.input_ids += ex.input_ids
        self.labels += ex.labels
        self.position_ids += range(len(ex.input_ids))
        self.sample_ids.append(ex.sample_id)


def make_encoder(tokenizer, dataset_cfg) -> Callable[[Record], Example]:
    """Template + tokenizer: prompt tokens masked out of the loss unless train_on_inputs;
    an EOS closes every example; examples longer than max_seq_length are cut."""
    eos = tokenizer.eos_token_id
    max_len = dataset_cfg.max_seq_length

    def encode(record: Record) -> Example:
        prompt, response = render(
            record.data, dataset_cfg.template, dataset_cfg.fields, dataset_cfg.format, tokenizer
        )
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if not r:
            raise RecordError("empty response")
        ids = (p + r)[:max_len]
        labels = (p if dataset_cfg.train_on_inputs else [IGNORE] * len(p)) + r
        return Example(record.sample_id, ids, labels[:max_len])

    return encode


class SequenceStream:
    """Global training sequences with a resume point (`state()`) after each one."""

    def __init__(
        self, records: RecordStream, encode: Callable[[Record], Example], max_len: int, packing: bool
    ) -> None:
        self.records, self.encode, self.max_len, self.packing = records, encode, max_len, packing
        self.index = 0  # global sequence counter
        self._resume = dataclasses.replace(records.state)
        self._it = iter(records)
        self._pending: tuple[StreamState, Example] | None = None

    def state(self) -> dict:
        return {"records": self._resume.to_json(), "sequences": self.index}

    @classmethod
    def restore(cls, records: RecordStream, encode, max_len: int, packing: bool, state: dict):
        records.state = StreamState.from_json(state["records"])
        stream = cls(records, encode, max_len, packing)
        stream.index = state["sequences"]
        return stream

    def _next_example(self) -> tuple[StreamState, Example]:
        while True:
            before = dataclasses.replace(self.records.state)
            record = next(self._it)  # endless: epochs follow each other
            try:
                return before, self.encode(record)
            except RecordError as e:
                self.records.bad.add(record.sample_id, str(e))

    def __iter__(self) -> Iterator[tuple[int, Sequence]]:
        while True:
            seq = Sequence()
            if self._pending:
                seq.add(self._pending[1])
                self._pending = None
            else:
                seq.add(self._next_example()[1])
            while self.packing:
                before, ex = self._next_example()
                if len(seq.input_ids) + len(ex.input_ids) > self.max_len:
                    self._pending = (before, ex)
                    break
                seq.add(ex)
            self._resume = self._pending[0] if self._pending else dataclasses.replace(self.records.state)
            index, self.index = self.index, self.index + 1
            yield index, seq


def collate(seqs: list[Sequence], pad_id: int, packing: bool) -> dict:
    """Right-padded tensors. Packed: no attention mask, position ids per example (the pad
    tail is its own segment, so it never mixes with real tokens). Unpacked: the usual
    attention mask."""
    import torch

    width = max(len(s.input_ids) for s in seqs)
    ids, labels, pos, mask = [], [], [], []
    for s in seqs:
        pad = width - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE] * pad)
        pos.append(s.position_ids + list(range(pad)))
        mask.append([1] * len(s.input_ids) + [0] * pad)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if packing:
        batch["position_ids"] = torch.tensor(pos)
    else:
        batch["attention_mask"] = torch.tensor(mask)
    return batch


def label_tokens(batch: dict) -> int:
    """Tokens that carry a loss (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
