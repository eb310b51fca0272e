"""Threshold choice as a pure function, and the whole calibration on tiny models."""

import json

import pytest
from conftest import make_llama, make_tokenizer

from collm.errors import CollmError
from collm.evaluation.calibrate import CalibrateConfig, Point, calibrate, choose_threshold
from collm.pair import CoLLM

# Accuracy rises with deferral, then the expert's own mistakes cost a little: worked out by hand,
# the best is threshold 0.3 (0.80); within a 0.25 budget it is 0.6 (0.70 at 0.20 deferral).
POINTS = [
    Point(1.0, 0.50, 0.00),
    Point(0.8, 0.60, 0.05),
    Point(0.6, 0.70, 0.20),
    Point(0.5, 0.70, 0.30),
    Point(0.3, 0.80, 0.55),
    Point(0.0, 0.75, 1.00),
]


def test_best_accuracy_without_budget():
    assert choose_threshold(POINTS).threshold == 0.3


@pytest.mark.parametrize(("budget", "expected"), [(0.25, 0.6), (0.2, 0.6), (0.1, 0.8), (0.0, 1.0), (1.0, 0.3)])
def test_budget_is_respected(budget, expected):
    chosen = choose_threshold(POINTS, max_defer=budget)
    assert chosen.threshold == expected
    assert chosen.defer_rate <= budget


def test_ties_go_to_less_deferral():
    # 0.6 and 0.5 tie on accuracy; 0.6 defers less.
    assert choose_threshold(POINTS[:4]).threshold == 0.6


def test_no_point_within_budget_is_a_clear_error():
    with pytest.raises(CollmError, match="no threshold defers at most 0.01"):
        choose_threshold(POINTS[1:], max_defer=0.01)


def test_config_checks():
    with pytest.raises(CollmError):
        CalibrateConfig(thresholds=(0.5, 1.5))
    with pytest.raises(CollmError):
        CalibrateConfig(max_defer=2)


def test_calibrate_writes_threshold_and_plot(tmp_path):
    pair = CoLLM(make_llama(0), [make_llama(1)], None, make_tokenizer())  # zero head: P(expert) = 0.5
    run = tmp_path / "run"
    pair.save_pretrained(run)
    before = json.loads((run / "collm.json").read_text())
    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "And 4+4?", "answer": "8"}]
    config = CalibrateConfig(thresholds=(0.4, 0.6, 1.0), max_defer=0.2, max_new_tokens=3, batch_size=2)
    record = calibrate(pair, run, rows, config, png=tmp_path / "plot.png")
    rates = {p["threshold"]: p["defer_rate"] for p in record["points"]}
    assert rates == {0.4: 1.0, 0.6: 0.0, 1.0: 0.0}
    after = json.loads((run / "collm.json").read_text())
    assert after["threshold"] == record["chosen"]["threshold"] == 1.0  # tie at 0 deferral: the higher threshold
    assert {k: v for k, v in after.items() if k not in ("threshold", "calibration")} == \
        {k: v for k, v in before.items() if k != "threshold"}
    assert set(record["baselines"]) == {"base alone", "expert alone"}
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*"))  # no temp files left behind
