"""Final-answer extraction and exact match for math word problems.

A model's answer is found, in order of trust, after the GSM8K marker ``#### N``, after a phrase such as
"The final answer is N", inside ``\\boxed{N}``, or as the last number in the text. Numbers are compared by
value: commas, currency signs, units, a trailing percent sign and trailing zeros do not matter, and a
fraction equals its decimal ("1/2" == "0.5").
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number as people and models write it: sign, currency, thousands groups, decimals or a fraction.
# Thousands groups need exactly three digits so "3,4 and 5" stays three numbers.
_NUMBER = r"-?[$€£]?\s?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_PHRASE_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)?\s*:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")")


def normalize_number(text: str) -> str | None:
    """Canonical text of one number: "$1,200.50" -> "1200.5", "18.00" -> "18", "6/4" -> "3/2".

    Returns None when `text` holds no number. Integers come out without a decimal point, finite decimals
    without trailing zeros, other ratios as a reduced fraction.
    """
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    value = _to_fraction(match.group(0))
    return None if value is None else _canonical(value)


def extract_answer(text: str) -> str | None:
    """The final answer a solution states, normalised (see `normalize_number`), or None if it has none.

    The first ``#### N`` wins (a model that runs on past its answer often invents a new problem with its
    own marker), then the first "final answer is N", then ``\\boxed{N}``, then the last number.
    """
    for pattern in (_MARKER_RE, _PHRASE_RE, _BOXED_RE):
        match = pattern.search(text)
        if match is not None:
            return normalize_number(match.group(1))
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(prediction: str, gold: str | int | float) -> bool:
    """Whether the answer extracted from `prediction` equals `gold` by value (False if none is found)."""
    predicted = extract_answer(prediction)
    expected = normalize_number(str(gold))
    return predicted is not None and predicted == expected


def _to_fraction(raw: str) -> Fraction | None:
    cleaned = re.sub(r"[$€£,\s]", "", raw)
    negative = cleaned.count("-") % 2 == 1  # "-$5" and "$-5" both mean minus five
    cleaned = cleaned.replace("-", "")
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    return -value if negative else value


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:  # not a finite decimal: keep it exact
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = abs(value.numerator * 10**digits // value.denominator)  # exact: no float rounding
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}"
