"""The shipped run behind `collm demo`: its files match the manifest, and the demo runs on them."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from collm import demo
from collm.errors import CollmError


def test_shipped_files_match_their_recorded_sha256():
    manifest = demo.verify(demo.ASSETS)
    names = set(manifest["files"])
    assert {"collm.json", "head.safetensors", "results.md", "problems.json"} <= names
    assert any(n.startswith("expert/") for n in names) and any(n.startswith("base_adapter/") for n in names)
    assert manifest["total_bytes"] <= 30 * 2**20  # the repository's budget for shipped weights and results


def test_verify_refuses_a_changed_or_missing_file(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    demo.write_manifest(tmp_path)
    demo.verify(tmp_path)
    (tmp_path / "a.txt").write_text("two")
    with pytest.raises(CollmError, match="a.txt does not match"):
        demo.verify(tmp_path)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(CollmError, match="a.txt is missing"):
        demo.verify(tmp_path)
    shutil.rmtree(tmp_path / "sub")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CollmError, match="no manifest.json"):
        demo.verify(tmp_path)


def test_deferral_summary_counts_deferred_tokens_inside_numbers():
    example = {"tokens": ["Half", " is", " ", "2", "4", ".", "5", " clips", "."], "sources": [0, 0, 0, 1, 1, 1, 1, 1, 0]}
    summary = demo.deferral_summary({"examples": [example]})
    assert summary["deferred"] == 5 and summary["deferred_in_numbers"] == 4
    assert summary["defer_rate"] == pytest.approx(5 / 9) and summary["share_in_numbers"] == pytest.approx(0.8)
    assert demo.provenance_text(example) == "Half is [[24.5 clips]]."


@pytest.mark.slow
def test_demo_answers_a_shipped_problem_offline():
    from collm.cli import app

    result = CliRunner().invoke(app, ["demo", "--count", "1", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    for text in ("base alone", "expert alone", "Co-LLM", "held-out problem 1", "deferral rate"):
        assert text in result.output
