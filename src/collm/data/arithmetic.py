"""Arithmetic problems from DeepMind's `mathematics_dataset`, as prompt/completion JSONL.

Train rows come from the package's training difficulty, validation and test rows from its "interpolate"
difficulty (the held-out setting of the paper that made the data set); a question never appears in two
splits. Deterministic by seed: the package draws from Python's and numpy's global generators, so we seed
both per module and split, and put their states back afterwards.
"""

from __future__ import annotations

import contextlib
import random
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from collm.atomic import write_json
from collm.data.answer import normalize_number
from collm.data.gsm import write_jsonl
from collm.errors import CollmError

DEFAULT_MODULES = ("add_or_sub", "mul", "div", "mixed")
# The package's own limits (generate_settings.MAX_*_LENGTH): longer samples are dropped, as it does.
MAX_QUESTION_CHARS = 160
MAX_ANSWER_CHARS = 30


@dataclass
class ArithmeticConfig:
    """What `write_dataset` makes; saved in the output's manifest.json."""

    seed: int = 0
    """Seeds every draw; the same seed gives byte-identical files."""
    modules: tuple[str, ...] = field(default=DEFAULT_MODULES, metadata={"parse": "names"})
    """Arithmetic modules: add_or_sub, add_sub_multiple, mul, div, mul_div_multiple, mixed, ..."""
    train_per_module: int = field(default=1000, metadata={"flag": "--train"})
    """Training rows per module."""
    validation_per_module: int = field(default=100, metadata={"flag": "--validation"})
    """Validation rows per module."""
    test_per_module: int = field(default=200, metadata={"flag": "--test"})
    """Test rows per module."""

    def __post_init__(self):
        self.modules = tuple(self.modules)
        if not self.modules:
            raise CollmError("give at least one arithmetic module")
        counts = (self.train_per_module, self.validation_per_module, self.test_per_module)
        if any(not isinstance(c, int) or c < 0 for c in counts):
            raise CollmError("rows per module must be non-negative integers")


def arithmetic_modules(difficulty: str) -> dict[str, Callable]:
    """The package's arithmetic generators for "train" or "interpolate" difficulty, by name."""
    _patch_sympy()
    try:
        from mathematics_dataset import generate
        from mathematics_dataset.modules import arithmetic
    except ImportError as error:
        raise CollmError(f"mathematics-dataset cannot be imported ({error}): pip install mathematics-dataset "
                         "absl-py sympy six numpy") from None
    if difficulty == "train":
        return arithmetic.train(generate._make_entropy_fn(0, 1))
    return arithmetic.test()


def _patch_sympy() -> None:
    # mathematics_dataset imports base_solution_linear from sympy.solvers.diophantine, which newer sympy
    # keeps one module deeper; point the old name at it rather than pin an old sympy.
    import importlib

    try:
        package = importlib.import_module("sympy.solvers.diophantine")
        from sympy.solvers.diophantine.diophantine import base_solution_linear
    except ImportError:
        return
    if not hasattr(package, "base_solution_linear"):
        sys.modules["sympy.solvers.diophantine"].base_solution_linear = base_solution_linear


@contextlib.contextmanager
def _seeded(key: str) -> Iterator[None]:
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(key)
    np.random.seed(zlib.crc32(key.encode()))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def sample_rows(module: str, generator: Callable, count: int, key: str, exclude: set[str]) -> list[dict]:
    """`count` rows from one generator, skipping over-long samples and questions in `exclude` (updated)."""
    rows: list[dict] = []
    with _seeded(key):
        for _ in range(max(100, 50 * count)):
            if len(rows) == count:
                break
            problem = generator()
            question, answer = str(problem.question), str(problem.answer)
            if len(question) > MAX_QUESTION_CHARS or len(answer) > MAX_ANSWER_CHARS or question in exclude:
                continue
            exclude.add(question)
            rows.append({"prompt": question, "completion": f"#### {answer}",
                         "answer": normalize_number(answer) or answer, "template": f"arithmetic__{module}"})
    return rows


def build_dataset(config: ArithmeticConfig) -> dict[str, list[dict]]:
    """Rows per split; test is drawn first so that no test question can reach validation or train."""
    by_difficulty = {"train": arithmetic_modules("train"), "interpolate": arithmetic_modules("interpolate")}
    unknown = [m for m in config.modules if m not in by_difficulty["train"]]
    if unknown:
        raise CollmError(f"unknown arithmetic module(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(by_difficulty['train']))}")
    plan = (("test", "interpolate", config.test_per_module),
            ("validation", "interpolate", config.validation_per_module),
            ("train", "train", config.train_per_module))
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for split, difficulty, count in plan:
        for module in config.modules:
            key = f"{config.seed}:{split}:{module}"
            splits[split] += sample_rows(module, by_difficulty[difficulty][module], count, key, seen)
    return splits


def write_dataset(out_dir: str | Path, config: ArithmeticConfig) -> dict:
    """Write train/validation/test JSONL and manifest.json under `out_dir`; returns the manifest."""
    out = Path(out_dir)
    splits = build_dataset(config)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    manifest = {"config": asdict(config), "rows": {name: len(rows) for name, rows in splits.items()}}
    write_json(out / "manifest.json", manifest)
    return manifest
