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
    assert any(n.startswith("expert/") for n in names)
    assert any(n.startswith(("base_adapter/", "sft_base/")) for n in names)
    assert manifest["total_bytes"] <= 30 * 2**20  # the repository's budget for shipped weights and results


def test_the_shipped_qwen_run_is_whole_small_and_names_its_models():
    """The package ships what the commands read (the run, the demo's problems and table), under 1 MB; the
    study's answers, speed and plots stay in the repository beside its scripts."""
    import json
    from pathlib import Path

    manifest = demo.verify(demo.QWEN_ASSETS)
    assert set(manifest["files"]) == {"collm.json", "head.safetensors", "problems.json", "results.md"}
    assert manifest["total_bytes"] <= 2**20
    config = json.loads((demo.QWEN_ASSETS / "collm.json").read_text())
    assert config["base"] == "qwen2.5-coder-0.5b-instruct" and config["experts"] == ["qwen2.5-coder-1.5b-instruct"]
    assert config["threshold"] == config["calibration"]["chosen"]["threshold"]
    study = Path(__file__).parent.parent / "research" / "qwen" / "results" / "run"
    if study.is_dir():  # a checkout (an installed wheel has no research folder)
        demo.verify(study)
        results = json.loads((study / "test_results.json").read_text())
        assert results["rows"] == 220
        assert {s["name"] for s in results["systems"]} >= {"base alone", "expert alone", "Co-LLM"}


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
    example = {"tokens": ["Half", " is", " ", "2", "4", ".", "5", " clips", "."],
               "sources": [0, 0, 0, 1, 1, 1, 1, 1, 0]}
    summary = demo.deferral_summary({"examples": [example]})
    assert summary["deferred"] == 5 and summary["deferred_in_numbers"] == 4
    assert summary["defer_rate"] == pytest.approx(5 / 9) and summary["share_in_numbers"] == pytest.approx(0.8)
    assert demo.provenance_text(example) == "Half is [[24.5 clips]]."


def _results(pairs):
    """`collm eval`-shaped results: (Co-LLM correct, base correct) per row."""
    def examples(flags):
        return [{"prompt": f"p{i}", "answer": str(i), "text": f"t{i}", "correct": ok, "tokens": ["a", "1"],
                 "sources": [0, 1]} for i, ok in enumerate(flags)]
    systems = [{"name": name, "accuracy": sum(f) / len(f), "correct": sum(f), "total": len(f), "ci_low": 0.0,
                "ci_high": 1.0, "defer_rate": 0.5, "note": "", "examples": examples(f)}
               for name, f in (("base alone", [b for _, b in pairs]), ("expert alone", [False] * len(pairs)),
                               ("Co-LLM", [c for c, _ in pairs]), ("SFT base alone", [b for _, b in pairs]))]
    return {"rows": len(pairs), "threshold": 0.8, "systems": systems}


def test_package_ships_a_frozen_sft_base_and_puts_fixed_rows_first(tmp_path):
    import json

    from collm.atomic import write_json
    from collm.run import seal

    runs, sft, expert = tmp_path / "runs", tmp_path / "sft", tmp_path / "expert"
    for adapter in (sft / "base_adapter", expert / "base_adapter"):
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(adapter.parent.name.encode())
    (runs / "collm").mkdir(parents=True)
    write_json(runs / "collm" / "collm.json", {"format": 1, "base": str(sft / "base_adapter"), "experts": ["m"],
                                               "base_weights": "original", "training": {"data_stats": {}}})
    (runs / "collm" / "head.safetensors").write_bytes(b"head")
    seal(runs / "collm")  # as collm train does
    results = _results([(False, True), (True, True), (True, False), (True, False)])
    results["systems"][2]["examples"][2]["text"] = "so <<1+1=3>>3"  # right by luck: a false note
    write_json(runs / "eval-new-numbers.json", results)
    with pytest.raises(CollmError, match="--sft"):
        demo.package(runs, tmp_path / "out")
    manifest = demo.package(runs, tmp_path / "out", sft=sft, expert=expert, results=tmp_path / "results")
    out = tmp_path / "out"
    assert not {"results.json", "calibration.png"} & set(manifest["files"])  # no command reads them
    assert json.loads((tmp_path / "results" / "results.json").read_text())["examples"]
    assert {"sft_base/adapter_model.safetensors", "expert/adapter_model.safetensors"} <= set(manifest["files"])
    config = json.loads((out / "collm.json").read_text())
    assert config["base"] == "sft_base" and config["experts"] == ["expert"] and "data_stats" not in config["training"]
    prompts = [p["prompt"] for p in json.loads((out / "problems.json").read_text())["problems"]]
    assert prompts == ["p3", "p2", "p0"]  # Co-LLM right, base wrong, true notes; then with a false note; then others
    assert "Co-LLM − max(SFT base, expert)" in (out / "results.md").read_text()
    demo.verify(out)


@pytest.mark.parametrize("args, message", [
    (["--threshold", "2"], "threshold must be a number in [0, 1], got 2.0"),
    (["--count", "0"], "--count must be between 1 and 3 (the held-out problems shipped), got 0"),
    (["--count", "-1"], "--count must be between 1 and 3"),
    (["--count", "100"], "--count must be between 1 and 3"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--lookahead", "0"], "lookahead"),
    (["--rewind", "2"], "rewind must be a probability"),
])
def test_demo_refuses_bad_settings_before_loading(no_model_loading, args, message):
    from collm.cli import app

    result = CliRunner().invoke(app, ["demo", *args])
    assert isinstance(result.exception, CollmError) and message in str(result.exception)


@pytest.mark.slow
def test_demo_answers_a_shipped_problem_offline():
    from collm.cli import app

    result = CliRunner().invoke(app, ["demo", "--count", "1", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    for text in ("base alone", "expert alone", "Co-LLM", "problem 1", "deferral rate"):
        assert text in result.output
    assert "drafts cut" not in result.output
    drafted = CliRunner().invoke(app, ["demo", "--count", "1", "--max-new-tokens", "24", "--lookahead", "4"])
    assert drafted.exit_code == 0, drafted.output
    assert "drafts cut" in drafted.output
    # greedy drafting writes the same answers: every line but the expert-call count is the same
    strip = [line for line in result.output.splitlines() if "expert calls" not in line]
    assert strip == [line for line in drafted.output.splitlines() if "expert calls" not in line]


def test_ship_removes_only_what_an_earlier_shipping_listed(tmp_path):
    from collm.demo.package import ship

    src = tmp_path / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "w.bin").write_bytes(b"w")
    (src / "head").write_bytes(b"h")
    out = tmp_path / "out"
    first = ship(out, {"head.safetensors": src / "head", "adapter": src / "adapter"}, {"results.md": "one\n"})
    assert set(first["files"]) == {"head.safetensors", "adapter/w.bin", "results.md"}
    second = ship(out, {"head.safetensors": src / "head"}, {"results.md": "two\n"})  # no adapter this time
    assert set(second["files"]) == {"head.safetensors", "results.md"} and not (out / "adapter").exists()
    assert (out / "results.md").read_text() == "two\n"
    (out / "notes.txt").write_text("mine")  # a file no packaging wrote
    with pytest.raises(CollmError, match="no packaging wrote"):
        ship(out, {"head.safetensors": src / "head"})
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.md").exists()
    with pytest.raises(CollmError, match="is missing"):
        ship(tmp_path / "other", {"head.safetensors": src / "nothing"})
    assert not (tmp_path / "other").exists()


def test_the_qwen_packager_ships_the_run_and_puts_the_study_beside_it(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from collm.atomic import write_json
    from collm.run import verify_manifest

    runs = tmp_path / "runs"
    router = runs / "router"
    (router / "base_adapter").mkdir(parents=True)
    (router / "base_adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    write_json(router / "collm.json", {"format": 1})
    (router / "head.safetensors").write_bytes(b"head")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    write_json(router / "train_config.json", {"data": str(tmp_path / "rows.jsonl")})
    results = _results([(True, False), (False, False), (True, True)])
    for system in results["systems"]:
        system |= {"expert_calls": 2, "tokens_per_s": 1.5}
    write_json(runs / "eval-test220" / "results.json", results)
    (runs / "eval-test220" / "results.md").write_text("| table |\n")
    (runs / "speed.json").write_text("{}\n")
    out, study = tmp_path / "assets", tmp_path / "study"
    script = Path(__file__).parents[1] / "research" / "qwen" / "qwen_package.py"
    for _ in range(2):  # a second packaging over the first rewrites it in place
        done = subprocess.run([sys.executable, str(script), "--runs", str(runs), "--out", str(out), "--study",
                               str(study)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    shipped = verify_manifest(out)
    assert set(shipped["files"]) == {"collm.json", "head.safetensors", "base_adapter/adapter_model.safetensors",
                                     "problems.json", "results.md"}
    assert json.loads((out / "problems.json").read_text())["problems"][0]["prompt"] == "p0"
    kept = verify_manifest(study)
    assert {"train_rows.jsonl", "train_config.json", "test_results.json", "test_results.md", "speed.json"} == \
        set(kept["files"])
    light = json.loads((study / "test_results.json").read_text())
    assert "tokens" not in light["systems"][0]["examples"][0]
    # a head trained on a frozen adapter base ships with a given adapter as its base (the fact-tuned one, shrunk)
    adapter = tmp_path / "small_adapter"
    adapter.mkdir()
    write_json(adapter / "adapter_config.json", {"base_model_name_or_path": "qwen2.5-coder-0.5b-instruct", "r": 16})
    (adapter / "adapter_model.safetensors").write_bytes(b"small")
    done = subprocess.run([sys.executable, str(script), "--runs", str(runs), "--out", str(tmp_path / "facts"),
                           "--study", str(tmp_path / "facts-study"), "--adapter", str(adapter)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    verify_manifest(tmp_path / "facts")
    config = json.loads((tmp_path / "facts" / "collm.json").read_text())
    assert config["base"] == "qwen2.5-coder-0.5b-instruct" and config["base_weights"] == "lora"
    assert (tmp_path / "facts" / "base_adapter" / "adapter_model.safetensors").read_bytes() == b"small"
