"""The HTML report: every example and the table are in it, tokens carry source and P(expert); a screenshot."""

import base64
import shutil
import subprocess
import tempfile

import pytest

from collm.evaluation.evaluate import wilson_interval
from collm.evaluation.report import render_html, write_html

# A 1x1 PNG stands in for the calibration plot.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


def _system(name, examples, defer_rate):
    correct = sum(e["correct"] for e in examples)
    low, high = wilson_interval(correct, len(examples))
    return {"name": name, "accuracy": correct / len(examples), "correct": correct, "total": len(examples),
            "ci_low": low, "ci_high": high, "defer_rate": defer_rate, "expert_calls": 3, "tokens_per_s": 12.5,
            "note": "", "examples": examples}


def results():
    examples = [
        {"prompt": "Natalia sold 48 clips in April and half as many in May. How many in total?", "answer": "72",
         "text": "48/2 = 24. 48+24 = 72\n#### 72", "correct": True,
         "tokens": ["48", "/", "2", " =", " 24", ".", " 48", "+", "24", " =", " 72", "\n", "####", " 72"],
         "sources": [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1],
         "defer_probs": [0.1, 0.05, 0.2, 0.1, 0.9, 0.1, 0.1, 0.2, 0.3, 0.1, 0.8, 0.1, 0.1, 0.7]},
        {"prompt": "Is <b>this</b> escaped & safe?", "answer": "3", "text": "#### 4", "correct": False,
         "tokens": ["####", " 4"], "sources": [0, 0], "defer_probs": [0.2, 0.4]},
    ]
    return {"rows": 2, "threshold": 0.5, "systems": [
        _system("base alone", [dict(e, sources=[0] * len(e["sources"])) for e in examples], 0.0),
        _system("Co-LLM", examples, 0.19),
        {"name": "proxy tuning", "accuracy": None, "note": "not run: no proxy-tuning decoder", "examples": []},
    ]}


def test_html_holds_every_example_the_table_and_the_plot():
    page = render_html(results(), PIXEL)
    assert page.count("class='example'") == 2
    assert "Natalia sold 48 clips" in page and "&lt;b&gt;this&lt;/b&gt; escaped &amp; safe" in page
    for name in ("base alone", "Co-LLM", "proxy tuning", "not run: no proxy-tuning decoder"):
        assert name in page
    assert "title='expert 1; P(expert)=0.900'" in page
    assert "title='base; P(expert)=0.050'" in page
    assert page.count("✓") == 1 and page.count("✗") == 1
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_screenshot(tmp_path):
    page = tmp_path / "report.html"
    write_html(page, results(), PIXEL)
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                       check=True, capture_output=True, timeout=90)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a blank page compresses far smaller
