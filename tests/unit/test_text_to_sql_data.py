"""The synthetic text-to-SQL dataset in examples/data/text-to-sql/ is reproducible from its
generator, well-formed, and its eval split uses held-out schemas and held-out phrasings."""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
SCRIPT = DATA / "make_text_to_sql.py"
OUT = DATA / "text-to-sql"
FILES = ["eval/eval.jsonl", "train/train-00000.jsonl", "train/train-00001.jsonl"]


def load_generator():
    name = "make_text_to_sql"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {
        "train": read(OUT / "train/train-00000.jsonl") + read(OUT / "train/train-00001.jsonl"),
        "eval": read(OUT / "eval/eval.jsonl"),
    }


def all_rows(splits):
    return splits["train"] + splits["eval"]


def tables(context: str) -> list[str]:
    return re.findall(r"CREATE TABLE (\w+) \(", context)


def test_generator_is_deterministic_and_matches_checked_in_files(tmp_path):
    gen = load_generator()
    gen.write_dataset(tmp_path / "a")
    gen.write_dataset(tmp_path / "b")
    assert (
        sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.jsonl")) == FILES
    )
    assert sorted(p.relative_to(OUT).as_posix() for p in OUT.rglob("*.jsonl")) == FILES
    for name in FILES:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), f"{name} differs between two runs"
        assert first == (OUT / name).read_bytes(), (
            f"{name} is stale: run `python examples/data/make_text_to_sql.py`"
        )


def test_row_counts_fields_and_size(splits):
    shards = [read(OUT / f"train/train-0000{i}.jsonl") for i in range(2)]
    assert all(900 <= len(s) <= 1100 for s in shards), [len(s) for s in shards]
    assert 100 <= len(splits["eval"]) <= 150
    for row in all_rows(splits):
        assert list(row) == ["id", "question", "context", "answer"]
        assert all(isinstance(v, str) and v.strip() == v and v for v in row.values()), row
    assert sum((OUT / name).stat().st_size for name in FILES) < 600_000


def test_ids_are_unique(splits):
    ids = [row["id"] for row in all_rows(splits)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"t-\d{6}", i) for i in (row["id"] for row in splits["train"]))
    assert all(re.fullmatch(r"e-\d{5}", i) for i in (row["id"] for row in splits["eval"]))


def test_eval_schemas_are_held_out(splits):
    train_tables = {t for row in splits["train"] for t in tables(row["context"])}
    eval_tables = {t for row in splits["eval"] for t in tables(row["context"])}
    assert len(train_tables) >= 30 and len(eval_tables) >= 5
    assert not train_tables & eval_tables
    train_contexts = " ".join(row["context"] for row in splits["train"])
    for t in eval_tables:
        assert not re.search(rf"\b{t}\b", train_contexts), t


def test_every_answer_compiles_against_its_context(splits):
    for row in all_rows(splits):
        statements = row["context"].split("; ")
        assert all(s.startswith("CREATE TABLE ") for s in statements), row
        assert 1 <= len(statements) <= 2
        db = sqlite3.connect(":memory:")
        try:
            for s in statements:
                db.execute(s)
            columns = {
                col[1].lower()
                for t in tables(row["context"])
                for col in db.execute(f"PRAGMA table_info({t})")
            }
            # Double-quoted literals fall back to strings only when no such column exists.
            for literal in re.findall(r'"([^"]*)"', row["answer"]):
                assert literal.lower() not in columns, row
            db.execute(f"EXPLAIN {row['answer']}")
        except sqlite3.Error as e:
            pytest.fail(f"{row['id']}: {e}: {row}")
        finally:
            db.close()


def test_answers_are_inferable_from_question_and_context(splits):
    """Literals in a WHERE clause appear verbatim in the question; joins are a few percent."""
    for row in all_rows(splits):
        answer = row["answer"]
        assert answer.startswith("SELECT ") and 4 <= len(answer.split()) <= 25, row
        for literal in re.findall(r'"([^"]*)"', answer):
            assert literal in row["question"], row
        where = answer.partition(" WHERE ")[2]
        numbers = re.findall(r"[<>=] (\d+(?:\.\d+)?)\b", where)
        numbers += [n for pair in re.findall(r"BETWEEN (\S+) AND (\S+)", where) for n in pair]
        for number in numbers:
            assert re.search(rf"(?<![\d.]){re.escape(number)}(?!\.?\d)", row["question"]), row
    for split in splits.values():
        joins = sum(" JOIN " in row["answer"] for row in split)
        assert 0.01 <= joins / len(split) <= 0.1
    questions = [row["question"] for row in all_rows(splits)]
    assert len(questions) == len(set(questions))


def test_eval_phrasings_are_held_out():
    """Every choice of words (question template, comparison, aggregate and superlative
    words) of an eval question comes from a held-out set that no train question uses, and
    the eval split exercises most of them."""
    made = load_generator().splits()
    train_rows, train_used = made["train"]
    eval_rows, eval_used = made["eval"]
    assert train_used and eval_used
    assert all(not held for _, held, _ in train_used)
    assert all(held for _, held, _ in eval_used)
    # same choices, disjoint wordings: the eval asks the same things differently
    choices = {key for key, _, _ in train_used}
    assert {key for key, _, _ in eval_used} <= choices
    assert len({key for key, _, _ in eval_used}) >= 0.7 * len(choices)
    # and no eval question could have been asked by the train wording
    train_questions = {row["question"] for row in train_rows}
    assert not train_questions & {row["question"] for row in eval_rows}


def test_sql_shapes_cover_the_common_clauses(splits):
    answers = [row["answer"] for row in all_rows(splits)]
    for clause in (
        " WHERE ", " AND ", " OR ", " BETWEEN ", " >= ", " <= ", " != ", " GROUP BY ", " HAVING ",
        " ORDER BY ", " DESC", " LIMIT ", "COUNT(DISTINCT", " JOIN ", "AVG(", "SUM(", "MAX(", "MIN(",
    ):  # fmt: skip
        assert any(clause in a for a in answers), clause
