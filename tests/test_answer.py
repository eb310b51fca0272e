"""Answer extraction: the marker, phrases, awkward number formats, and exact match by value."""

import pytest

from collm.data.answer import extract_answer, is_correct, normalize_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 18", "18"),
        ("####18", "18"),
        ("She has 5 left.\n#### 5 apples\n\nQuestion: Tom has 3 ... #### 3", "5"),
        ("The final answer is $1,200.50.", "1200.5"),
        ("The final answer is: 1,234,567 dollars", "1234567"),
        ("so the answer is 42. Next question has 7 cats", "42"),
        ("The answer is: **42**", "42"),
        ("\\boxed{12} and then 99", "12"),
        ("It costs $-0.50 now", "-0.5"),
        ("18.00 apples were left", "18"),
        ("She sold 50% of them", "50"),
        ("x = 6/4", "1.5"),
        ("one third: 1/3", "1/3"),
        ("numbers 3,4 and 5", "5"),
        ("costs 2.50 each, 10 in total.", "10"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("raw", "expected"), [("$1,200.50", "1200.5"), ("-0", "0"), ("007", "7"), ("10/4", "2.5"),
                                               ("2/3", "2/3"), ("€3", "3"), ("1.000", "1"), ("abc", None)])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_is_correct_compares_values_not_strings():
    assert is_correct("... #### 1,200", "1200")
    assert is_correct("The final answer is 0.5", "1/2")
    assert is_correct("#### 18.0", 18)
    assert not is_correct("#### 17", "18")
    assert not is_correct("I do not know", "18")
