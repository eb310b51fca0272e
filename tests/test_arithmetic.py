"""Arithmetic rows from mathematics_dataset: shape, determinism, and no question in two splits."""

import json

import pytest

pytest.importorskip("mathematics_dataset")
pytest.importorskip("absl")

from collm.data.answer import is_correct  # noqa: E402
from collm.data.arithmetic import ArithmeticConfig, write_dataset  # noqa: E402
from collm.errors import CollmError  # noqa: E402

SMALL = ArithmeticConfig(seed=3, train_per_module=20, validation_per_module=5, test_per_module=10)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_splits_and_determinism(tmp_path):
    manifest = write_dataset(tmp_path / "a", SMALL)
    assert manifest["rows"] == {"train": 80, "validation": 20, "test": 40}
    splits = {name: _rows(tmp_path / "a" / f"{name}.jsonl") for name in ("train", "validation", "test")}
    questions = [{row["prompt"] for row in rows} for rows in splits.values()]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"prompt", "completion", "answer", "template"}
            assert row["template"].startswith("arithmetic__")
            assert is_correct(row["completion"], row["answer"])
    write_dataset(tmp_path / "b", SMALL)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_unknown_module_is_a_clear_error(tmp_path):
    with pytest.raises(CollmError, match="unknown arithmetic module"):
        write_dataset(tmp_path, ArithmeticConfig(modules=("nope",)))
