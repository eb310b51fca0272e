"""`collm data`, `collm calibrate` and `collm eval` end to end on a tiny run."""

from __future__ import annotations

import json

import pytest
from conftest import invoke, make_llama, make_tokenizer, save_tiny
from typer.testing import CliRunner

from collm.cli import app
from collm.errors import CollmError
from collm.pair import CoLLM

runner = CliRunner()



@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer()
    base, expert = save_tiny(make_llama(0), tok, root / "base"), save_tiny(make_llama(1), tok, root / "expert")
    CoLLM.load(base, [expert]).save_pretrained(root / "run")  # zero head: P(expert) = 0.5 everywhere
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in [("2+3?", "5"), ("4+4?", "8")]))
    return root / "run", data


def test_calibrate_then_eval_with_html(run_and_data, tmp_path):
    run, data = run_and_data
    result = invoke("calibrate", "--run", run, "--data", data, "--thresholds", "0.4,1", "--max-new-tokens", 3,
                    "--max-defer", 0.5, "--png", tmp_path / "cal.png")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threshold"] == 1.0
    saved = json.loads((run / "collm.json").read_text())
    assert saved["threshold"] == 1.0 and saved["calibration"]["points"]
    result = invoke("eval", "--run", run, "--data", data, "--max-new-tokens", 3, "--html", tmp_path / "r.html",
                    "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    assert "| Co-LLM |" in result.stdout and "proxy tuning" in result.stdout
    page = (tmp_path / "r.html").read_text()
    assert page.count("class='example'") == 2 and "data:image/png;base64," in page
    assert json.loads((tmp_path / "r.json").read_text())["threshold"] == 1.0


def test_eval_bad_data_is_one_line_error(run_and_data, tmp_path):
    run, _ = run_and_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = runner.invoke(app, ["eval", "--run", str(run), "--data", str(bad)])
    assert isinstance(result.exception, CollmError)  # `collm.cli.main` prints it as one line, exit status 2
    assert "bad.jsonl:1: not valid JSON" in str(result.exception)


def test_data_gsm_small(tmp_path):
    result = invoke("data", "gsm", "--out", tmp_path, "--train-variants", 1, "--new-numbers-variants", 1,
                    "--eval-variants", 1, "--seed", 1)
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["rows"]
    assert counts["train"] > 0 and counts["test"] > 0
    assert json.loads((tmp_path / "splits.json").read_text())["seed"] == 1
