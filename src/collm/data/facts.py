"""A knowledge-update benchmark, generated offline from a seed: facts only the base can learn, reasoning over them.

A catalogue of fictional entities (gadgets, towns, creatures, companies, books) with numeric facts (prices,
weights, counts, years) and categorical ones (a town's mayor, a company's home town). No pretrained model can
know them: names are made of random syllables and values are drawn at random. From the catalogue come

- **documents** (``documents.jsonl``): every entity described several times, each fact in a different phrasing
  each time, as prompt/completion rows to tune the base on; every fact of the catalogue is in them;
- a **recall probe** (``probe.jsonl``): one question per fact, in a phrasing no document uses;
- **questions** (``train/validation/test.jsonl``): word problems from question templates, each needing one to
  three catalogue facts and a few steps of arithmetic. The gold solution states the facts it uses, then
  reasons to ``#### N`` with GSM8K's checked ``<<a*b=c>>`` notes. Templates are split into train, validation and
  test, so test questions come from templates that are never trained or calibrated on.
  ``validation_with_facts.jsonl`` and ``test_with_facts.jsonl`` are the same questions with the facts each
  needs written in front of the prompt: what a model with perfect retrieval would see.

The questions cannot be answered without the facts: every answer moves with the fact values, and the manifest
reports ``guess_rate``, the share of questions whose answer comes out right when each fact is replaced by the
most likely value a model without the catalogue could guess (the median of its attribute's range).

An **update** (``update_fraction`` > 0) changes that share of the catalogue's facts (numeric ones, each to a
new value, chosen by ``update_seed``); documents, probe and questions are written from the updated catalogue,
and rows that use a changed fact are marked ``"changed": true``. Questions of an updated set are drawn with the
same seed, so the template split is the original's. ``update_documents.jsonl`` holds the documents that state a
changed fact: what the base is tuned on to learn the update.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from collm.atomic import write_json
from collm.data.gsm import (
    SPLITS,
    check_solution,
    compile_expression,
    evaluate,
    format_value,
    split_templates,
    write_jsonl,
)
from collm.errors import CollmError

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "pl", "sk", "st", "th", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "sh")
GADGET_NOUNS = ("kettle", "lamp", "drone", "speaker", "clock", "backpack", "scooter", "camera", "heater", "blender")
CREATURE_NOUNS = ("beetle", "lizard", "finch", "toad", "moth", "crab", "newt", "spider", "heron", "vole")
COMPANY_SUFFIXES = ("Works", "Labs", "Foods", "Freight", "Textiles", "Robotics", "Mills", "Optics")
BOOK_NOUNS = ("Lantern", "Harbor", "Orchard", "Archive", "Compass", "Meadow", "Tower", "Voyage", "Mirror", "Garden")
COLOURS = ("teal", "amber", "crimson", "violet", "ochre", "silver", "olive", "indigo", "coral", "slate")


@dataclass(frozen=True)
class Attribute:
    """One fact an entity of a kind has: its value range (numeric, from ``low`` to ``high`` by ``step``) or the
    values it takes (categorical), how documents state it, and how the probe asks for it."""

    name: str
    low: int = 0
    high: int = 0
    step: int = 1
    choices: str | None = None
    """Categorical: "person" (a fictional name), "colour", or "town" (a town of the catalogue)."""
    statements: tuple[str, ...] = ()
    """Sentences stating the fact, with {e} and {v}; the first is the one gold solutions use."""
    probe: str = ""
    """The probe's question, in a phrasing no statement uses."""
    questions: tuple[str, ...] = ()
    """Questions about the fact that the documents answer (teaching the base to answer from what it knows);
    never the probe's phrasing."""

    @property
    def numeric(self) -> bool:
        return self.choices is None


KINDS: dict[str, tuple[Attribute, ...]] = {
    "gadget": (
        Attribute("price", 4, 96, 1, statements=(
            "A {e} costs ${v}.", "The {e} sells for ${v}.", "You can buy a {e} for ${v}.",
            "The price of a {e} is ${v}."), probe="How many dollars would I pay for one {e}?",
            questions=("How much does a {e} cost?", "What is the price of a {e}?")),
        Attribute("weight", 120, 2400, 10, statements=(
            "A {e} weighs {v} grams.", "The {e} has a weight of {v} grams.", "Each {e} weighs {v} g.",
            "On a scale, a {e} shows {v} grams."), probe="What is the mass of one {e}, in grams?",
            questions=("How heavy is a {e}?", "How much does a {e} weigh?")),
        Attribute("battery", 3, 48, 1, statements=(
            "A {e}'s battery lasts {v} hours.", "On one charge the {e} runs for {v} hours.",
            "The {e} has a battery life of {v} hours.", "A fully charged {e} keeps going for {v} hours."),
            probe="For how many hours can a {e} run before it needs charging?",
            questions=("How long does a {e}'s battery last?", "What is the battery life of a {e}?")),
        Attribute("released", 2031, 2046, 1, statements=(
            "The {e} was released in {v}.", "The {e} came out in {v}.", "The {e} first went on sale in {v}.",
            "The first {e} reached the shops in {v}."), probe="Which year did the {e} launch?",
            questions=("When was the {e} released?", "When did the {e} come out?")),
    ),
    "town": (
        Attribute("population", 1200, 60000, 50, statements=(
            "{e} has {v} inhabitants.", "The town of {e} has a population of {v}.", "{v} people live in {e}.",
            "The last census counted {v} residents in {e}."), probe="What is the number of residents of {e}?",
            questions=("How many people live in {e}?", "What is the population of {e}?")),
        Attribute("founded", 1650, 1990, 1, statements=(
            "{e} was founded in {v}.", "The town of {e} dates from {v}.", "{e} was settled in {v}.",
            "The first houses of {e} were built in {v}."), probe="In which year did {e} come into being?",
            questions=("When was the town of {e} founded?", "How old is {e}: when was it settled?")),
        Attribute("bridges", 2, 40, 1, statements=(
            "{e} has {v} bridges.", "There are {v} bridges in {e}.", "The town of {e} counts {v} bridges.",
            "The river through {e} is crossed by {v} bridges."), probe="What number of bridges does {e} have?",
            questions=("How many bridges does {e} have?", "How many bridges are there in {e}?")),
        Attribute("mayor", choices="person", statements=(
            "The mayor of {e} is {v}.", "{v} is the mayor of {e}.", "{e} is governed by Mayor {v}.",
            "{e} elected {v} as its mayor."), probe="Who holds the office of mayor in {e}?",
            questions=("Who is the mayor of {e}?", "Who governs {e}?")),
    ),
    "creature": (
        Attribute("legs", 2, 12, 2, statements=(
            "The {e} has {v} legs.", "A {e} walks on {v} legs.", "Each {e} has {v} legs.",
            "Count the legs of a {e} and you get {v}."), probe="What is the leg count of one {e}?",
            questions=("How many legs does a {e} have?", "On how many legs does a {e} walk?")),
        Attribute("lifespan", 2, 90, 1, statements=(
            "A {e} lives for {v} years.", "The {e} has a lifespan of {v} years.", "A {e} reaches an age of {v} years.",
            "In the wild a {e} survives for {v} years."), probe="How long, in years, is the life of a {e}?",
            questions=("How long does a {e} live?", "What is the lifespan of a {e}?")),
        Attribute("clutch", 2, 30, 1, statements=(
            "A {e} lays {v} eggs in a clutch.", "The {e}'s clutch holds {v} eggs.",
            "Each clutch of a {e} has {v} eggs.", "A {e} nest usually contains {v} eggs."),
            probe="What number of eggs make up one clutch of a {e}?",
            questions=("How many eggs does a {e} lay in a clutch?", "How big is a {e}'s clutch?")),
        Attribute("colour", choices="colour", statements=(
            "The {e} is {v}.", "A {e} has {v} colouring.", "The {e} is coloured {v}.",
            "You can tell a {e} by its {v} colour."), probe="What colour would you see on a {e}?",
            questions=("What colour is a {e}?", "What colouring does a {e} have?")),
    ),
    "company": (
        Attribute("employees", 40, 5000, 10, statements=(
            "{e} employs {v} people.", "{e} has {v} employees.", "{v} people work at {e}.",
            "The staff of {e} numbers {v}."), probe="What is the headcount of {e}?",
            questions=("How many people does {e} employ?", "How many employees does {e} have?")),
        Attribute("founded", 1890, 2020, 1, statements=(
            "{e} was founded in {v}.", "{e} started in {v}.", "{e} has been in business since {v}.",
            "{e} opened its doors in {v}."), probe="In which year was {e} established?",
            questions=("When was {e} founded?", "Since when has {e} been in business?")),
        Attribute("hq", choices="town", statements=(
            "{e} is based in {v}.", "The headquarters of {e} are in {v}.", "The head office of {e} is in {v}.",
            "{e} has its main offices in {v}."), probe="In which town does {e} have its head office?",
            questions=("Where is {e} based?", "Where are the headquarters of {e}?")),
    ),
    "book": (
        Attribute("pages", 120, 900, 1, statements=(
            "{e} has {v} pages.", "The book {e} runs to {v} pages.", "{e} is {v} pages long.",
            "Printed, {e} fills {v} pages."), probe="What is the page count of {e}?",
            questions=("How many pages does {e} have?", "How long is {e}, in pages?")),
        Attribute("published", 1950, 2024, 1, statements=(
            "{e} was published in {v}.", "{e} first appeared in {v}.", "The book {e} came out in {v}.",
            "The first edition of {e} is from {v}."), probe="Which year saw {e} first printed?",
            questions=("When was {e} published?", "When did {e} first appear?")),
        Attribute("author", choices="person", statements=(
            "{e} was written by {v}.", "{v} wrote {e}.", "The author of {e} is {v}.",
            "{e} is a book by {v}."), probe="Whose pen produced {e}?",
            questions=("Who wrote {e}?", "Who is the author of {e}?")),
    ),
}

DOCUMENT_PROMPTS = ("Tell me about {e}.", "What do you know about {e}?", "Describe {e}.", "Give me the facts on {e}.")


@dataclass(frozen=True)
class QuestionTemplate:
    """A word problem over catalogue facts.

    ``entities`` names the entities it asks about (a kind, or "town:hq:co" for the town that company ``co`` is
    based in); ``facts`` names the values it needs ("p1": ("g1", "price")); ``draws`` are stated numbers, an
    inclusive (low, high) range or an expression over earlier names; ``conditions`` must hold. The question and
    the solution lines take ``{expr}`` slots, and ``[[expr]]`` in a solution writes a checked note and its value
    (``<<3*37=111>>111``). Gold solutions start with the facts used and end with ``#### answer``.
    """

    id: str
    entities: dict[str, str]
    facts: dict[str, tuple[str, str]]
    draws: dict[str, Any]
    question: str
    solution: tuple[str, ...]
    answer: str
    conditions: tuple[str, ...] = ()


def _q(id, entities, facts, draws, question, solution, answer, conditions=()) -> QuestionTemplate:
    return QuestionTemplate(id, entities, facts, draws, question, tuple(solution), answer, tuple(conditions))


TEMPLATES: tuple[QuestionTemplate, ...] = (
    _q("facts-change", {"g1": "gadget"}, {"p1": ("g1", "price")}, {"a": (2, 9), "bill": "100 * (a * p1 // 100 + 1)"},
       "Mira buys {a} {g1}s and pays with {bill} dollars. How much change does she get, in dollars?",
       ["{a} {g1}s cost [[a * p1]] dollars.", "Her change is [[bill - a * p1]] dollars."], "bill - a * p1"),
    _q("facts-two-gadgets", {"g1": "gadget", "g2": "gadget"}, {"p1": ("g1", "price"), "p2": ("g2", "price")},
       {"a": (2, 8), "b": (2, 8)},
       "Tom buys {a} {g1}s and {b} {g2}s. How many dollars does he spend?",
       ["The {g1}s cost [[a * p1]] dollars.", "The {g2}s cost [[b * p2]] dollars.",
        "In all he spends [[a * p1 + b * p2]] dollars."], "a * p1 + b * p2"),
    _q("facts-discount", {"g1": "gadget"}, {"p1": ("g1", "price")}, {"d": (1, 4), "a": (2, 12)},
       "A shop takes {25 * d} percent off the {g1}. How many dollars do {a} of them cost after the discount?",
       ["Before the discount {a} cost [[a * p1]] dollars.", "The discount is [[a * p1 * 25 * d / 100]] dollars.",
        "After it they cost [[a * p1 - a * p1 * 25 * d / 100]] dollars."], "a * p1 - a * p1 * 25 * d / 100",
       ["a * p1 * 25 * d % 100 == 0"]),
    _q("facts-box-weight", {"g1": "gadget", "g2": "gadget"}, {"w1": ("g1", "weight"), "w2": ("g2", "weight")},
       {"a": (2, 6), "w": (100, 900)},
       "A box holds {a} {g1}s and one {g2}. The empty box weighs {w} grams. How many grams does the full box weigh?",
       ["The {g1}s weigh [[a * w1]] grams.", "With the {g2} that is [[a * w1 + w2]] grams.",
        "With the box it is [[a * w1 + w2 + w]] grams."], "a * w1 + w2 + w"),
    _q("facts-battery-days", {"g1": "gadget"}, {"h1": ("g1", "battery")}, {"u": (2, 8), "c": (2, 9)},
       "Lena runs her {g1} for {u} hours a day and charges it fully {c} times. For how many days of use do the "
       "charges last?",
       ["The charges give [[c * h1]] hours.", "At {u} hours a day that is [[c * h1 / u]] days."],
       "c * h1 / u", ["c * h1 % u == 0"]),
    _q("facts-release-gap", {"g1": "gadget", "g2": "gadget"}, {"r1": ("g1", "released"), "r2": ("g2", "released")},
       {"k": (2, 9)},
       "A collector waited from the release of the {g2} to the release of the {g1}, buying {k} gadgets each year "
       "of the wait. How many gadgets did the collector buy?",
       ["The wait lasted [[r1 - r2]] years.", "That is [[k * (r1 - r2)]] gadgets."], "k * (r1 - r2)",
       ["r1 > r2"]),
    _q("facts-population-gap", {"t1": "town", "t2": "town"},
       {"n1": ("t1", "population"), "n2": ("t2", "population")}, {"m": (2, 4)},
       "If {t2} grew to {m} times its size, how many more people would live there than in {t1}?",
       ["{m} times {t2} is [[m * n2]] people.", "That is [[m * n2 - n1]] more than {t1}."], "m * n2 - n1",
       ["m * n2 > n1"]),
    _q("facts-bridge-tour", {"t1": "town", "t2": "town"}, {"b1": ("t1", "bridges"), "b2": ("t2", "bridges")},
       {"a": (2, 4)},
       "A tourist crosses every bridge in {t1} {a} times and every bridge in {t2} once. How many crossings is that?",
       ["In {t1} that is [[a * b1]] crossings.", "With {t2} it is [[a * b1 + b2]] crossings."], "a * b1 + b2"),
    _q("facts-town-age", {"t1": "town"}, {"f1": ("t1", "founded")}, {"y": (2030, 2060), "k": (2, 6)},
       "In {y}, {t1} plants {k} trees for every year since it was founded. How many trees does it plant?",
       ["In {y} {t1} is [[y - f1]] years old.", "It plants [[k * (y - f1)]] trees."], "k * (y - f1)"),
    _q("facts-town-growth", {"t1": "town"}, {"n1": ("t1", "population")}, {"k": (10, 90), "n": (2, 9)},
       "{t1} gains {k} residents every year. How many people will live there after {n} years?",
       ["In {n} years it gains [[k * n]] residents.", "Then [[n1 + k * n]] people live there."], "n1 + k * n"),
    _q("facts-bridge-lamps", {"t1": "town"}, {"b1": ("t1", "bridges")}, {"k": (2, 12), "c": (3, 15)},
       "Each bridge in {t1} has {k} lamps, and a lamp costs {c} dollars a year to run. How many dollars a year do "
       "the lamps cost?",
       ["There are [[b1 * k]] lamps.", "They cost [[b1 * k * c]] dollars a year."], "b1 * k * c"),
    _q("facts-legs", {"c1": "creature", "c2": "creature"}, {"l1": ("c1", "legs"), "l2": ("c2", "legs")},
       {"a": (2, 9), "b": (2, 9)},
       "A keeper has {a} {c1}s and {b} {c2}s. How many legs do they have in all?",
       ["The {c1}s have [[a * l1]] legs.", "The {c2}s have [[b * l2]] legs.", "In all: [[a * l1 + b * l2]] legs."],
       "a * l1 + b * l2"),
    _q("facts-hatching", {"c1": "creature"}, {"e1": ("c1", "clutch")}, {"a": (2, 9), "k": (1, 20)},
       "{a} {c1}s each lay one clutch, and {k} of the eggs do not hatch. How many eggs hatch?",
       ["The clutches hold [[a * e1]] eggs.", "Of those, [[a * e1 - k]] hatch."], "a * e1 - k", ["a * e1 > k"]),
    _q("facts-lifetimes", {"c1": "creature", "c2": "creature"},
       {"s1": ("c1", "lifespan"), "s2": ("c2", "lifespan")}, {"n": (2, 5)},
       "A keeper looks after one {c1} and then {n} {c2}s, one after another, each for its whole life. For how "
       "many years is that?",
       ["The {c2}s live [[n * s2]] years in all.", "With the {c1} it is [[s1 + n * s2]] years."], "s1 + n * s2"),
    _q("facts-hatchling-legs", {"c1": "creature"}, {"e1": ("c1", "clutch"), "l1": ("c1", "legs")}, {"a": (2, 5)},
       "Every egg in {a} clutches of {c1} eggs hatches. How many legs do the hatchlings have in all?",
       ["The clutches hold [[a * e1]] eggs.", "The hatchlings have [[a * e1 * l1]] legs."], "a * e1 * l1"),
    _q("facts-company-gift", {"co": "company", "g1": "gadget"}, {"s": ("co", "employees"), "p1": ("g1", "price")},
       {},
       "{co} gives one {g1} to each of its employees. How many dollars does it spend?",
       ["It spends [[s * p1]] dollars."], "s * p1"),
    _q("facts-company-book", {"co": "company", "bk": "book"}, {"f": ("co", "founded"), "y": ("bk", "published")},
       {"k": (2, 9)},
       "For every year between the founding of {co} and the publication of {bk}, a library buys {k} books. How "
       "many books does it buy?",
       ["Between them are [[y - f]] years.", "The library buys [[k * (y - f)]] books."], "k * (y - f)",
       ["y > f"]),
    _q("facts-hiring", {"co": "company"}, {"s": ("co", "employees")}, {"k": (3, 40), "n": (2, 12)},
       "{co} hires {k} people a month for {n} months. How many employees does it have then?",
       ["It hires [[k * n]] people.", "It then has [[s + k * n]] employees."], "s + k * n"),
    _q("facts-pages-left", {"bk": "book"}, {"pg": ("bk", "pages")}, {"r": (10, 40), "d": (2, 9)},
       "Ana reads {r} pages of {bk} a day for {d} days. How many pages are left?",
       ["She reads [[r * d]] pages.", "[[pg - r * d]] pages are left."], "pg - r * d", ["pg > r * d"]),
    _q("facts-rereading", {"b1": "book", "b2": "book"}, {"q1": ("b1", "pages"), "q2": ("b2", "pages")}, {},
       "Omar reads {b1}, then {b2}, then {b1} again. How many pages does he read?",
       ["{b1} twice is [[2 * q1]] pages.", "With {b2} it is [[2 * q1 + q2]] pages."], "2 * q1 + q2"),
    _q("facts-budget", {"g1": "gadget", "g2": "gadget"}, {"p1": ("g1", "price"), "p2": ("g2", "price")},
       {"k": (2, 9), "m": "p1 + k * p2"},
       "Sara has {m} dollars. She buys one {g1} and spends all the rest on {g2}s. How many {g2}s does she buy?",
       ["After the {g1} she has [[m - p1]] dollars.", "That buys [[(m - p1) / p2]] {g2}s."], "(m - p1) / p2"),
    _q("facts-van", {"co": "company", "t1": "town:hq:co"}, {"b1": ("t1", "bridges")}, {"a": (2, 4), "d": (2, 7)},
       "A van of {co} crosses every bridge of the town {co} is based in {a} times a day. How many crossings does "
       "it make in {d} days?",
       ["A day's crossings: [[a * b1]].", "In {d} days: [[a * b1 * d]]."], "a * b1 * d"),
    _q("facts-shipping", {"g1": "gadget"}, {"w1": ("g1", "weight")}, {"c": (2, 9), "a": (2, 6)},
       "A courier charges {c} dollars a parcel plus 1 dollar for every 10 grams. How many dollars does it charge "
       "to send {a} parcels with one {g1} in each?",
       ["One parcel costs [[c + w1 / 10]] dollars.", "{a} parcels cost [[a * (c + w1 / 10)]] dollars."],
       "a * (c + w1 / 10)"),
    _q("facts-age-gap", {"t1": "town", "co": "company"}, {"f1": ("t1", "founded"), "f2": ("co", "founded")},
       {"k": (2, 5)},
       "How many years older is {t1} than {co}, times {k}?",
       ["{t1} is [[f2 - f1]] years older than {co}.", "Times {k}: [[k * (f2 - f1)]]."], "k * (f2 - f1)",
       ["f2 > f1"]),
)


@dataclass
class FactsConfig:
    """What `write_dataset` makes; saved in the output's manifest.json."""

    seed: int = 0
    """Seeds the catalogue, the template split and every question; the same seed gives byte-identical files."""
    entities: int = 320
    """Entities in the catalogue, spread over the five kinds."""
    documents: int = 4
    """Documents per entity, each stating every fact of the entity in another phrasing."""
    questions: int = 1
    """Question-and-answer documents per fact (a question in a phrasing the probe does not use, answered by one
    statement of the fact); 0: descriptions only."""
    fractions: tuple[float, float, float] = field(default=(0.6, 0.15, 0.25), metadata={"parse": "floats"})
    """Shares of question templates for train, validation and test."""
    train_questions: int = 60
    """Questions per train template."""
    eval_questions: int = 40
    """Questions per validation or test template."""
    update_fraction: float = 0.0
    """Share of the catalogue's facts to change, all of them numeric (an update); 0: the original catalogue."""
    update_seed: int = 1
    """Seeds which facts change and their new values."""

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise CollmError(f"fractions must be three non-negative shares summing to 1, got {self.fractions}")
        if isinstance(self.questions, bool) or not isinstance(self.questions, int) or not 0 <= self.questions <= 2:
            raise CollmError(f"questions must be 0, 1 or 2 (documents per fact), got {self.questions!r}")
        for name in ("entities", "documents", "train_questions", "eval_questions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CollmError(f"{name} must be a positive whole number, got {value!r}")
        if self.entities < 5 * 4:
            raise CollmError(f"entities must be at least 20 (four of each kind), got {self.entities}")
        if not 0 <= self.update_fraction <= 1:
            raise CollmError(f"update_fraction must be in [0, 1], got {self.update_fraction}")


# ---------------------------------------------------------------------------------------------- the catalogue


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1)) + \
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        name = _word(rng, rng.choice((2, 2, 3))).capitalize()
        if name not in taken and 4 <= len(name) <= 11:
            taken.add(name)
            out.append(name)
    return out


def _display(kind: str, name: str, rng: random.Random) -> str:
    if kind == "gadget":
        return f"{name} {rng.choice(GADGET_NOUNS)}"
    if kind == "creature":
        return f"{name} {rng.choice(CREATURE_NOUNS)}"
    if kind == "company":
        return f"{name} {rng.choice(COMPANY_SUFFIXES)}"
    if kind == "book":
        return f"The {name} {rng.choice(BOOK_NOUNS)}"
    return name


def _numeric_value(attribute: Attribute, rng: random.Random) -> int:
    return rng.randrange(attribute.low, attribute.high + 1, attribute.step)


def build_catalogue(seed: int, entities: int) -> dict:
    """Entities by kind, each with its facts: {"entities": [{"id", "kind", "name", "facts": {...}}]}."""
    rng = random.Random(f"facts-catalogue:{seed}")
    taken: set[str] = set()
    kinds = list(KINDS)
    counts = {kind: entities // len(kinds) + (i < entities % len(kinds)) for i, kind in enumerate(kinds)}
    people = [f"{first} {last}" for first, last in zip(_names(rng, 200, taken), _names(rng, 200, taken))]
    out: list[dict] = []
    towns: list[str] = []
    for kind in kinds:  # towns come before companies, whose home town is one of them
        for name in _names(rng, counts[kind], taken):
            display = _display(kind, name, rng)
            facts: dict[str, Any] = {}
            for attribute in KINDS[kind]:
                if attribute.numeric:
                    facts[attribute.name] = _numeric_value(attribute, rng)
                else:
                    pool = {"person": people, "colour": COLOURS, "town": towns}[attribute.choices]
                    facts[attribute.name] = rng.choice(pool)
            out.append({"id": f"{kind}-{len([e for e in out if e['kind'] == kind]):03d}", "kind": kind,
                        "name": display, "facts": facts})
            if kind == "town":
                towns.append(display)
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise CollmError("catalogue names collide; use another seed")  # display nouns cannot collide: names differ
    return {"seed": seed, "entities": out}


def update_catalogue(catalogue: dict, fraction: float, seed: int) -> tuple[dict, list[str]]:
    """A copy with ``fraction`` of all facts changed (numeric ones, each redrawn to a different value); the
    changed fact ids."""
    rng = random.Random(f"facts-update:{seed}")
    numeric = [(e, a) for e in catalogue["entities"] for a in KINDS[e["kind"]] if a.numeric]
    total = sum(len(e["facts"]) for e in catalogue["entities"])
    count = round(fraction * total)
    if count > len(numeric):
        raise CollmError(f"update_fraction {fraction} asks for {count} changed facts; only the {len(numeric)} "
                         f"numeric facts of {total} can change: use at most {len(numeric) / total:.2f}")
    chosen = sorted(rng.sample(range(len(numeric)), count))
    updated = json.loads(json.dumps(catalogue))
    by_id = {e["id"]: e for e in updated["entities"]}
    changed = []
    for index in chosen:
        entity, attribute = numeric[index]
        old = entity["facts"][attribute.name]
        new = old
        while new == old:
            new = _numeric_value(attribute, rng)
        by_id[entity["id"]]["facts"][attribute.name] = new
        changed.append(fact_id(entity["id"], attribute.name))
    updated["update"] = {"fraction": fraction, "seed": seed, "changed": changed}
    return updated, changed


def _referred(entity: dict) -> str:
    """The entity as a prompt names it: "the Lubus speaker", "Drelwick", "The Orvane Lantern"."""
    return f"the {entity['name']}" if entity["kind"] in ("gadget", "creature") else entity["name"]


def fact_id(entity_id: str, attribute: str) -> str:
    return f"{entity_id}.{attribute}"


def _attribute(kind: str, name: str) -> Attribute:
    return next(a for a in KINDS[kind] if a.name == name)


def statement(entity: dict, attribute: str, phrasing: int = 0) -> str:
    """The fact as a sentence, in one of its attribute's phrasings (0: the one gold solutions use)."""
    spec = _attribute(entity["kind"], attribute)
    text = spec.statements[phrasing % len(spec.statements)]
    text = text.format(e=entity["name"], v=format_value(entity["facts"][attribute]))
    return text[:1].upper() + text[1:]


def documents(catalogue: dict, per_entity: int, seed: int, questions: int = 0) -> list[dict]:
    """Prompt/completion rows describing every entity ``per_entity`` times, each fact phrased differently each
    time and the sentences in a new order; then ``questions`` rows per fact that ask for it (in a phrasing the
    probe does not use) and answer with one statement of it."""
    rng = random.Random(f"facts-documents:{seed}")
    rows = []
    for entity in catalogue["entities"]:
        attributes = [a.name for a in KINDS[entity["kind"]]]
        for d in range(per_entity):
            sentences = [statement(entity, name, d + i) for i, name in enumerate(attributes)]
            rng.shuffle(sentences)
            prompt = DOCUMENT_PROMPTS[d % len(DOCUMENT_PROMPTS)].format(e=_referred(entity))
            rows.append({"prompt": prompt, "completion": " ".join(sentences), "entity": entity["id"],
                         "facts": [fact_id(entity["id"], name) for name in attributes]})
    for e, entity in enumerate(catalogue["entities"]):
        for a, attribute in enumerate(KINDS[entity["kind"]]):
            for q in range(questions):
                k = (e + a + q) % len(attribute.questions)
                rows.append({"prompt": attribute.questions[k].format(e=entity["name"]),
                             "completion": statement(entity, attribute.name, e + a + q + 1), "entity": entity["id"],
                             "facts": [fact_id(entity["id"], attribute.name)]})
    return rows


def probe(catalogue: dict, changed: set[str] = frozenset()) -> list[dict]:
    """One recall question per fact, in a phrasing no document uses, with the value as its answer."""
    rows = []
    for entity in catalogue["entities"]:
        for attribute in KINDS[entity["kind"]]:
            fid = fact_id(entity["id"], attribute.name)
            rows.append({"prompt": attribute.probe.format(e=entity["name"]),
                         "answer": format_value(entity["facts"][attribute.name]), "fact": fid,
                         "numeric": attribute.numeric, "changed": fid in changed})
    return rows


def recalled(answer_text: str, row: dict) -> bool:
    """Whether a model's answer to a probe row states the fact: the number (by value) or the name."""
    from collm.data.answer import is_correct

    if row["numeric"]:
        return is_correct(answer_text, row["answer"])
    return row["answer"].lower() in answer_text.lower()


def fact_values(catalogue: dict, fact_ids: list[str]) -> list[str]:
    """The text of each fact's value (``"gadget-000.price"`` -> ``"38"``), as documents and solutions write it."""
    by_id = {entity["id"]: entity for entity in catalogue["entities"]}
    out = []
    for fid in fact_ids:
        entity_id, attribute = fid.split(".", 1)
        out.append(format_value(by_id[entity_id]["facts"][attribute]))
    return out


def share_in_values(pieces: list[str], sources: list[int], values: list[str]) -> tuple[int, int]:
    """Of the tokens an expert wrote (``sources`` != 0), how many overlap an occurrence of a fact value in the text
    ``"".join(pieces)`` (a number matched whole, not inside a longer one; a name as written). Returns (inside,
    expert tokens)."""
    text = "".join(pieces)
    spans = []
    for value in set(values):
        pattern = rf"(?<![\d.]){re.escape(value)}(?![\d]|\.\d)" if value[:1].isdigit() else re.escape(value)
        spans += [m.span() for m in re.finditer(pattern, text)]
    inside = expert = start = 0
    for piece, source in zip(pieces, sources):
        end = start + len(piece)
        if source:
            expert += 1
            inside += any(a < end and start < b for a, b in spans)
        start = end
    return inside, expert


# ---------------------------------------------------------------------------------------------- the questions


_NOTE_RE = re.compile(r"\[\[([^\[\]]+)\]\]")
_SLOT_RE = re.compile(r"\{([^{}]+)\}")
_NAME_RE = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class Question:
    template: str
    question: str
    solution: str
    answer: str
    facts: tuple[str, ...]
    facts_text: str
    draws: tuple[tuple[str, Any], ...] = ()
    """The stated numbers drawn for it (not written out: the guess rate recomputes the answer from them)."""

    def row(self, changed: set[str]) -> dict:
        return {"prompt": self.question, "completion": self.solution, "answer": self.answer,
                "template": self.template, "facts": list(self.facts), "facts_text": self.facts_text,
                "changed": any(f in changed for f in self.facts)}


def _value(source: str, env: dict[str, Any]) -> Any:
    value = evaluate(compile_expression(source), env)
    if isinstance(value, float):
        value = Fraction(value).limit_denominator(1000)
    return value


def _text(value: Any) -> str:
    if isinstance(value, Fraction) and value.denominator == 1:
        value = value.numerator
    return format_value(value)


def _note(source: str, env: dict[str, Any]) -> str:
    value = _value(source, env)
    left = _NAME_RE.sub(lambda m: _text(env[m.group(0)]), source).replace(" ", "")
    return f"<<{left}={_text(value)}>>{_text(value)}"


def _pick_entities(template: QuestionTemplate, by_kind: dict[str, list[dict]], by_name: dict[str, dict],
                   rng: random.Random) -> dict[str, dict]:
    chosen: dict[str, dict] = {}
    for slot, spec in template.entities.items():
        if ":" in spec:  # "town:hq:co": the town that entity co's hq fact names
            _, attribute, owner = spec.split(":")
            chosen[slot] = by_name[chosen[owner]["facts"][attribute]]
            continue
        pool = [e for e in by_kind[spec] if e not in chosen.values()]
        chosen[slot] = rng.choice(pool)
    return chosen


def render_question(template: QuestionTemplate, entities: dict[str, dict], rng: random.Random) -> Question | None:
    """The question for these entities and fresh draws, or None where a condition fails."""
    env: dict[str, Any] = {slot: e["name"] for slot, e in entities.items()}
    used = []
    for name, (slot, attribute) in template.facts.items():
        env[name] = entities[slot]["facts"][attribute]
        used.append((entities[slot], attribute))
    hops = [(entities[spec.split(":")[2]], spec.split(":")[1]) for spec in template.entities.values() if ":" in spec]
    for name, draw in template.draws.items():
        env[name] = rng.randint(*draw) if isinstance(draw, tuple) else _value(draw, env)
    try:
        if not all(_value(c, env) for c in template.conditions):
            return None
        answer = _value(template.answer, env)
    except ZeroDivisionError:
        return None
    if not (isinstance(answer, int) or (isinstance(answer, Fraction) and answer.denominator == 1)) or answer <= 0:
        return None
    facts = hops + used
    stated = " ".join(statement(e, a) for e, a in facts)
    question = _SLOT_RE.sub(lambda m: _text(_value(m.group(1), env)), template.question)
    lines = [stated] + [_SLOT_RE.sub(lambda m: _text(_value(m.group(1), env)),
                                     _NOTE_RE.sub(lambda m: _note(m.group(1), env), line))
                        for line in template.solution]
    solution = "\n".join(lines) + f"\n#### {_text(answer)}"
    check_solution(solution, _text(answer), template.id)
    draws = tuple((name, env[name]) for name, draw in template.draws.items() if isinstance(draw, tuple))
    return Question(template.id, question[:1].upper() + question[1:], solution, _text(answer),
                    tuple(fact_id(e["id"], a) for e, a in facts), stated, draws)


def questions(catalogue: dict, template: QuestionTemplate, count: int, seed: int) -> list[Question]:
    """Up to ``count`` questions with pairwise different prompts, seeded per template."""
    rng = random.Random(f"facts-questions:{seed}:{template.id}")
    by_kind: dict[str, list[dict]] = {}
    for entity in catalogue["entities"]:
        by_kind.setdefault(entity["kind"], []).append(entity)
    by_name = {e["name"]: e for e in catalogue["entities"]}
    found: dict[str, Question] = {}
    for _ in range(200 * count):
        if len(found) == count:
            break
        question = render_question(template, _pick_entities(template, by_kind, by_name, rng), rng)
        if question is not None:
            found.setdefault(question.question, question)
    return list(found.values())


def _medians(catalogue: dict) -> dict[tuple[str, str], int]:
    out = {}
    for kind, attributes in KINDS.items():
        for a in attributes:
            if a.numeric:
                out[kind, a.name] = int(statistics.median(range(a.low, a.high + 1, a.step)))
    return out


def build_dataset(config: FactsConfig) -> tuple[dict, dict[str, list[dict]], dict]:
    """The catalogue, the rows of every output file, and a report (splits, counts, guess rate)."""
    catalogue = build_catalogue(config.seed, config.entities)
    changed: list[str] = []
    if config.update_fraction:
        catalogue, changed = update_catalogue(catalogue, config.update_fraction, config.update_seed)
    changed_set = set(changed)
    splits = split_templates([t.id for t in TEMPLATES], config.seed, config.fractions)
    split_of = {tid: name for name, ids in splits.items() for tid in ids}
    files: dict[str, list[dict]] = {"documents": documents(catalogue, config.documents, config.seed, config.questions),
                                    "probe": probe(catalogue, changed_set)}
    if changed:
        files["update_documents"] = [d for d in files["documents"] if changed_set.intersection(d["facts"])]
    files |= {name: [] for name in SPLITS}
    guessed = total = 0
    medians = _medians(catalogue)
    for template in TEMPLATES:
        split = split_of[template.id]
        count = config.train_questions if split == "train" else config.eval_questions
        for q in questions(catalogue, template, count, config.seed):
            files[split].append(q.row(changed_set))
            total += 1
            guessed += _guessable(catalogue, template, q, medians)
    for split in ("validation", "test"):
        files[f"{split}_with_facts"] = [
            {**row, "prompt": f"{row['facts_text']}\n\n{row['prompt']}"} for row in files[split]]
    report = {"splits": splits, "rows": {name: len(rows) for name, rows in files.items()},
              "entities": len(catalogue["entities"]),
              "facts": sum(len(e["facts"]) for e in catalogue["entities"]),
              "templates": len(TEMPLATES), "guess_rate": guessed / total if total else 0.0,
              "changed_facts": len(changed),
              "changed_rows": {s: sum(r["changed"] for r in files[s]) for s in SPLITS}}
    return catalogue, files, report


def _guessable(catalogue: dict, template: QuestionTemplate, question: Question,
               medians: dict[tuple[str, str], int]) -> bool:
    """Whether the question's answer survives replacing every numeric fact it needs by its attribute's median
    (a categorical hop, such as a company's home town, is replaced by the median of the hop's target)."""
    env = {}
    for name, (slot, attribute) in template.facts.items():
        kind = template.entities[slot].split(":")[0]
        env[name] = medians[kind, attribute]
    env |= dict(question.draws)
    try:
        for name, draw in template.draws.items():
            if not isinstance(draw, tuple):
                env[name] = _value(draw, env)
        return _text(_value(template.answer, env)) == question.answer
    except ZeroDivisionError:
        return False


def write_dataset(out_dir: str | Path, config: FactsConfig) -> dict:
    """Write catalogue.json, documents/probe/train/validation/test(.with_facts) JSONL and manifest.json."""
    out = Path(out_dir)
    catalogue, files, report = build_dataset(config)
    write_json(out / "catalogue.json", catalogue)
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    manifest = {"config": asdict(config), **report}
    write_json(out / "manifest.json", manifest)
    return manifest
