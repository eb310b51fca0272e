"""The math expert's recipe: calculation-string training data, and a model folder from the expert's adapter.

The expert is SmolLM2-135M-Instruct plus a LoRA adapter that `collm train --objective sft` fits to rows of
calculations written the way GSM8K solutions write them (``48/2 = <<48/2=24>>24``), mixed with
mathematics_dataset arithmetic. It learns to compute, not to solve word problems: no row holds a word
problem or a worked solution, so alone it is poor at GSM8K's format. Half of the calculation lines are the
``<<a=b>>`` notes of the GSM *training* split (their numbers, not their text), half are drawn at random with
GSM-like operands; validation and test templates never reach it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from collm.data.gsm import NOTE_RE
from collm.errors import CollmError

_MERGED_MARKER = "collm_merged.json"  # in every folder merge_adapter writes: it may replace that folder
_PROMPTS = ("Calculate.", "Work out these calculations.", "Compute each line.", "Do the arithmetic.")


@dataclass
class CalcConfig:
    """What `write_calc_dataset` makes; saved in its manifest.json."""

    seed: int = 0
    """Seeds every draw; the same seed and inputs give byte-identical files."""
    rows: int = 30_000
    """Calculation rows (each a few lines)."""
    lines_per_row: tuple[int, int] = field(default=(2, 5), metadata={"parse": "ints"})
    """Fewest and most calculation lines in a row."""
    gsm_share: float = 0.5
    """Share of lines taken from the GSM training notes (the rest are drawn at random)."""
    gsm: str | None = None
    """GSM train JSONL (from `collm data gsm`) whose ``<<a=b>>`` notes are reused; None: random lines only."""
    arithmetic: str | None = None
    """mathematics_dataset train JSONL (from `collm data arithmetic`) to mix in unchanged; None: none."""

    def __post_init__(self):
        low, high = self.lines_per_row
        if self.rows < 1 or not 1 <= low <= high or not 0 <= self.gsm_share <= 1:
            raise CollmError("rows must be >= 1, lines_per_row a range (low >= 1), gsm_share in [0, 1]")


def gsm_notes(path: str | Path) -> list[tuple[str, str]]:
    """The (expression, result) of every ``<<a=b>>`` note in the completions of a GSM JSONL file."""
    notes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            notes += [(a.strip(), b.strip()) for a, b in NOTE_RE.findall(json.loads(line)["completion"])]
    return notes


def _operand(rng: random.Random) -> Fraction:
    kind = rng.random()
    if kind < 0.3:
        return Fraction(rng.randint(1, 20))
    if kind < 0.6:
        return Fraction(rng.randint(10, 99))
    if kind < 0.85:
        return Fraction(rng.randint(100, 999))
    if kind < 0.95:
        return Fraction(rng.randint(1000, 9999))
    return Fraction(rng.randint(1, 400), rng.choice((2, 4, 10, 100)))  # money and halves: 12.5, 0.25


def _text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def random_note(rng: random.Random) -> tuple[str, str]:
    """One calculation like GSM's notes: two or three operands, + - * /, an exact result of <= 2 decimals."""
    while True:
        terms = [_operand(rng) for _ in range(2 if rng.random() < 0.7 else 3)]
        ops = [rng.choice("+-*/") for _ in terms[1:]]
        for i, op in enumerate(ops):  # divisions that come out even, as in word problems
            if op == "/":
                divisor = Fraction(rng.choice((2, 3, 4, 5, 6, 8, 10, 12, 20, 25, 100)))
                terms[i] = terms[i] * divisor if terms[i].denominator == 1 else terms[i]
                terms[i + 1] = divisor
        expression = "".join(_text(t) + op for t, op in zip(terms, ops)) + _text(terms[-1])
        try:
            value = _evaluate(expression)
        except ZeroDivisionError:
            continue
        if value >= 0 and value < 10**7 and (value * 100).denominator == 1:
            return expression, _text(value)


def _evaluate(expression: str) -> Fraction:
    from collm.data.gsm import compile_expression, evaluate

    exact = re.sub(r"\d*\.?\d+", lambda m: f"F('{m.group(0)}')", expression)
    return Fraction(evaluate(compile_expression(exact), {"F": Fraction}))


def notes_correct(text: str) -> bool:
    """Whether every ``<<a=b>>`` note in `text` states the true value of its expression (False for a note
    that does not parse)."""
    for expression, result in NOTE_RE.findall(text):
        try:
            if _evaluate(expression) != Fraction(result.strip().replace(",", "")):
                return False
        except (ValueError, ZeroDivisionError, SyntaxError, NameError, TypeError, CollmError):
            return False
    return True


def calc_row(rng: random.Random, notes: list[tuple[str, str]], config: CalcConfig) -> dict:
    """A prompt/completion row of calculation lines ``a = <<a=b>>b``."""
    lines = []
    for _ in range(rng.randint(*config.lines_per_row)):
        expression, result = rng.choice(notes) if notes and rng.random() < config.gsm_share else random_note(rng)
        lines.append(f"{expression} = <<{expression}={result}>>{result}")
    listed = rng.random() < 0.5  # half the prompts list the sums, half leave the model to read them
    prompt = rng.choice(_PROMPTS) + ("\n" + "\n".join(line.partition(" = ")[0] for line in lines) if listed else "")
    return {"prompt": prompt, "completion": "\n".join(lines), "answer": lines[-1].rpartition(">>")[2],
            "template": "calc"}


def build_calc_dataset(config: CalcConfig) -> list[dict]:
    """Calculation rows plus the arithmetic rows, shuffled together."""
    rng = random.Random(f"calc:{config.seed}")
    notes = gsm_notes(config.gsm) if config.gsm else []
    rows = [calc_row(rng, notes, config) for _ in range(config.rows)]
    if config.arithmetic:
        rows += [json.loads(line) for line in Path(config.arithmetic).read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    rng.shuffle(rows)
    return rows


def write_calc_dataset(out_dir: str | Path, config: CalcConfig) -> dict:
    """Write train.jsonl and manifest.json under `out_dir`; returns the manifest."""
    from collm.atomic import write_json
    from collm.data.gsm import write_jsonl

    rows = build_calc_dataset(config)
    write_jsonl(Path(out_dir) / "train.jsonl", rows)
    manifest = {"config": asdict(config), "rows": len(rows)}
    write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Write a full HF model folder: ``base`` (default: the adapter's recorded base) with the LoRA merged in.

    Every collm stage loads it like any model folder (``--expert out``). Written atomically.
    """
    from peft import PeftModel

    from collm.atomic import atomic_folder
    from collm.backends.models import load_model

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise CollmError(f"{adapter} is not a LoRA adapter folder (adapter_config.json is missing)")
    if out.exists() and not (out / _MERGED_MARKER).is_file():  # replaced whole below: only one merge wrote
        raise CollmError(f"{out} exists and was not written by merge: give another output folder")
    base = base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tokenizer = load_model(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MERGED_MARKER).write_text(json.dumps({"adapter": str(adapter.resolve()), "base": base}))

    atomic_folder(out, write)
    return out


def adapter_to_bf16(adapter: str | Path) -> None:
    """Store an adapter's weights in bfloat16 (half the bytes), atomically; loading casts them back."""
    import torch
    from safetensors.torch import load_file

    from collm.tensorfile import write_tensors

    path = Path(adapter) / "adapter_model.safetensors"
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    write_tensors(path, weights, {"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    """``python -m collm.training.expert merge ADAPTER OUT`` | ``bf16 ADAPTER``: the steps the reproduction
    script needs."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["merge"] and len(args) == 3:
        print(merge_adapter(args[1], args[2]))
    elif args[:1] == ["bf16"] and len(args) == 2:
        adapter_to_bf16(args[1])
    else:
        raise SystemExit("usage: python -m collm.training.expert merge ADAPTER OUT | bf16 ADAPTER")


if __name__ == "__main__":
    main()
