"""The knowledge-update benchmark (`collm data facts`): deterministic from its seed, splits by template, gold
solutions whose arithmetic holds and whose facts are the catalogue's, a probe and documents over the same
catalogue, and an update that changes exactly the facts it says it changes."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from collm.cli import app
from collm.data import facts
from collm.data.answer import extract_answer
from collm.data.gsm import NOTE_RE, check_solution
from collm.errors import CollmError

SMALL = dict(entities=60, train_questions=8, eval_questions=6)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    result = CliRunner().invoke(app, ["data", "facts", "--out", str(out / "a"), "--entities", "60",
                                      "--train-questions", "8", "--eval-questions", "6"])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(app, ["data", "facts", "--out", str(out / "b"), "--entities", "60",
                                     "--train-questions", "8", "--eval-questions", "6"])
    assert again.exit_code == 0, again.output
    return out


def _rows(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(written, tmp_path):
    a, b = written / "a", written / "b"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    facts.write_dataset(tmp_path, facts.FactsConfig(seed=1, **SMALL))
    assert (tmp_path / "catalogue.json").read_bytes() != (a / "catalogue.json").read_bytes()


def test_the_default_catalogue_is_the_size_the_benchmark_needs():
    catalogue = facts.build_catalogue(0, facts.FactsConfig().entities)
    entities = catalogue["entities"]
    assert len(entities) >= 300 and sum(len(e["facts"]) for e in entities) >= 1000
    assert len({e["name"] for e in entities}) == len(entities)
    towns = {e["name"] for e in entities if e["kind"] == "town"}
    assert all(e["facts"]["hq"] in towns for e in entities if e["kind"] == "company")


def test_splits_share_no_template(written):
    folder = written / "a"
    templates = {split: {row["template"] for row in _rows(folder, split)} for split in ("train", "validation", "test")}
    assert templates["train"] and templates["validation"] and templates["test"]
    assert not (templates["train"] & templates["validation"] or templates["train"] & templates["test"]
                or templates["validation"] & templates["test"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {t for s in manifest["splits"].values() for t in s} == {t.id for t in facts.TEMPLATES}


def test_gold_solutions_hold_and_state_the_catalogue_s_facts(written):
    folder = written / "a"
    catalogue = {e["id"]: e for e in json.loads((folder / "catalogue.json").read_text())["entities"]}
    for split in ("train", "validation", "test"):
        for row in _rows(folder, split):
            check_solution(row["completion"], row["answer"], row["template"])  # every <<a=b>> note is true
            assert extract_answer(row["completion"]) == row["answer"]
            assert NOTE_RE.search(row["completion"])
            stated = [facts.statement(catalogue[f.split(".")[0]], f.split(".")[1]) for f in row["facts"]]
            assert row["facts_text"] == " ".join(stated) and row["completion"].startswith(row["facts_text"])
            # the fact values are the numbers the arithmetic starts from
            notes = " ".join(left for left, _ in NOTE_RE.findall(row["completion"]))
            for fid in row["facts"]:
                entity, attribute = fid.split(".")
                value = catalogue[entity]["facts"][attribute]
                if isinstance(value, int):
                    assert re.search(rf"(?<!\d){value}(?!\d)", notes), (row, fid)
            assert row["facts_text"] not in row["prompt"]  # the question itself never states its facts


def test_with_facts_rows_are_the_questions_with_their_facts_in_front(written):
    folder = written / "a"
    for split in ("validation", "test"):
        for plain, told in zip(_rows(folder, split), _rows(folder, f"{split}_with_facts"), strict=True):
            assert told["prompt"] == f"{plain['facts_text']}\n\n{plain['prompt']}"
            assert told["answer"] == plain["answer"]


def test_probe_and_documents_read_the_same_catalogue(written):
    folder = written / "a"
    catalogue = json.loads((folder / "catalogue.json").read_text())["entities"]
    probe = {row["fact"]: row for row in _rows(folder, "probe")}
    documents = _rows(folder, "documents")
    every = {facts.fact_id(e["id"], a): (e, v) for e in catalogue for a, v in e["facts"].items()}
    assert set(probe) == set(every)
    covered = {f for d in documents for f in d["facts"]}
    assert covered == set(every)  # every fact is in the base's knowledge training
    texts = {d["entity"]: [] for d in documents}
    for d in documents:
        if len(d["facts"]) > 1:  # the descriptions (question documents state one fact each)
            texts[d["entity"]].append(d["completion"])
    for fid, (entity, value) in every.items():
        assert probe[fid]["answer"] == str(value)
        assert all(str(value) in text for text in texts[entity["id"]])
        assert facts.recalled(f"It is {value}.", probe[fid]) and not facts.recalled("I do not know.", probe[fid])
    sentences = {s for d in documents for s in re.split(r"(?<=[.?!])\s+", d["completion"])}
    prompts = {d["prompt"] for d in documents}
    assert not any(row["prompt"] in sentences or row["prompt"] in prompts for row in probe.values())
    # each entity's documents phrase each of its facts differently
    first = [d for d in documents if d["entity"] == catalogue[0]["id"] and len(d["facts"]) > 1]
    assert len({d["completion"] for d in first}) == len(first) == 4


def test_answers_move_with_the_facts_so_they_cannot_be_guessed(written):
    manifest = json.loads((written / "a" / "manifest.json").read_text())
    assert manifest["guess_rate"] < 0.1
    big = facts.build_dataset(facts.FactsConfig())[2]
    assert big["rows"]["test"] >= 200 and big["guess_rate"] < 0.1


def test_an_update_changes_exactly_the_facts_it_names(tmp_path):
    before = facts.build_dataset(facts.FactsConfig(**SMALL))
    after = facts.build_dataset(facts.FactsConfig(update_fraction=0.25, **SMALL))
    old = {e["id"]: e["facts"] for e in before[0]["entities"]}
    new = {e["id"]: e["facts"] for e in after[0]["entities"]}
    changed = set(after[0]["update"]["changed"])
    total = sum(len(f) for f in old.values())
    assert len(changed) == round(0.25 * total)
    for entity, values in old.items():
        for attribute, value in values.items():
            assert (new[entity][attribute] != value) == (facts.fact_id(entity, attribute) in changed)
    probe = after[1]["probe"]
    assert {row["fact"] for row in probe if row["changed"]} == changed
    rows = after[1]["test"] + after[1]["validation"]
    assert any(row["changed"] for row in rows)
    assert all(row["changed"] == any(f in changed for f in row["facts"]) for row in rows)
    assert after[2]["splits"] == before[2]["splits"]
    # the update's documents: exactly those that state a changed fact, every changed fact among them
    update = after[1]["update_documents"]
    assert update == [d for d in after[1]["documents"] if changed & set(d["facts"])]
    assert changed <= {f for d in update for f in d["facts"]} and "update_documents" not in before[1]


@pytest.mark.parametrize("options, message", [
    (dict(update_fraction=0.95), "only the"),
    (dict(entities=5), "at least 20"),
    (dict(fractions=(0.5, 0.5, 0.5)), "summing to 1"),
    (dict(documents=0), "positive whole number"),
])
def test_bad_settings_are_one_line(options, message):
    with pytest.raises(CollmError, match=message):
        facts.build_dataset(facts.FactsConfig(**options))


def test_fact_values_are_read_from_the_catalogue_and_found_whole_in_text(written):
    catalogue = json.loads((written / "a" / "catalogue.json").read_text())
    entity = catalogue["entities"][0]
    attribute, value = next(iter(entity["facts"].items()))
    assert facts.fact_values(catalogue, [f"{entity['id']}.{attribute}"]) == [str(value)]
    # " 4" + "2" spell 42; "142" and "42.5" hold 42 only inside a longer number
    pieces = ["It", " lasts", " 4", "2", " hours", ", 1", "42", " or", " 42", ".5", "."]
    sources = [0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0]
    assert facts.share_in_values(pieces, sources, ["42"]) == (1, 6)
    assert facts.share_in_values(pieces, [0] * len(pieces), ["42"]) == (0, 0)
    assert facts.share_in_values(["Mayor", " Bo", "rk", " rules"], [0, 1, 1, 1], ["Bork"]) == (2, 3)


def test_question_documents_ask_every_fact_but_never_as_the_probe_does(written):
    documents = _rows(written / "a", "documents")
    probe = {row["prompt"] for row in _rows(written / "a", "probe")}
    asked = [row for row in documents if len(row["facts"]) == 1]
    assert {row["facts"][0] for row in asked} == {row["fact"] for row in _rows(written / "a", "probe")}
    assert not probe & {row["prompt"] for row in asked}
    for row in asked[:50]:
        assert row["prompt"].endswith("?") and " the the " not in row["prompt"] and " a the " not in row["prompt"]
