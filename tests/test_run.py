"""The run folder: every load checks the manifest of sha256s, and a malformed collm.json or head is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke, make_llama, make_tokenizer, save_tiny
from safetensors.torch import load_file, save_file

from collm import CoLLM, CollmError, DeferralHead

MANIFEST = "manifest.json"


def run_main(argv):
    from collm.run import main

    main(argv)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    return save_tiny(make_llama(0), tok, root / "base"), save_tiny(make_llama(1), tok, root / "expert")


@pytest.fixture
def run(folders, tmp_path):
    pair = CoLLM.load(folders[0], [folders[1]], "never", threshold=0.3)
    pair.save_pretrained(tmp_path / "run")
    return tmp_path / "run"


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_save_pretrained_records_every_file_it_wrote(run):
    manifest = json.loads((run / MANIFEST).read_text())
    assert set(manifest["files"]) == {"collm.json", "head.safetensors"}
    assert CoLLM.from_pretrained(run).threshold == 0.3


def test_one_changed_byte_in_the_head_is_refused(run):
    head = run / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0x01  # a weight's last byte: still a valid head, a different one
    head.write_bytes(bytes(data))
    DeferralHead.load(head)  # loadable on its own; only the manifest can tell
    with pytest.raises(CollmError) as e:
        CoLLM.from_pretrained(run)
    assert "head.safetensors does not match its recorded sha256" in one_line(e)


def test_a_changed_config_or_missing_file_is_refused(run):
    saved = (run / "collm.json").read_text()
    (run / "collm.json").write_text(json.dumps(json.loads(saved) | {"threshold": 0.0}))
    with pytest.raises(CollmError, match="collm.json does not match"):
        CoLLM.from_pretrained(run)
    (run / "collm.json").write_text(saved)
    (run / "head.safetensors").unlink()
    with pytest.raises(CollmError, match="head.safetensors is missing"):
        CoLLM.from_pretrained(run)


def test_an_added_model_file_inside_the_run_is_refused(folders, tmp_path):
    import shutil

    shutil.copytree(folders[1], tmp_path / "run" / "expert")
    pair = CoLLM.load(folders[0], [str(tmp_path / "run" / "expert")], "never")
    pair.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "collm.json").read_text())
    (tmp_path / "run" / "collm.json").write_text(json.dumps(config | {"experts": ["expert"]}))
    run_main(["seal", str(tmp_path / "run")])  # relative spec: the expert folder is part of the run
    assert "expert/model.safetensors" in json.loads((tmp_path / "run" / MANIFEST).read_text())["files"]
    CoLLM.from_pretrained(tmp_path / "run")
    (tmp_path / "run" / "expert" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CollmError, match="extra.safetensors is not in .*manifest.json"):
        CoLLM.from_pretrained(tmp_path / "run")


def test_manifest_that_is_not_json_or_absent_is_a_one_line_error(run):
    (run / MANIFEST).write_text("{not json")
    with pytest.raises(CollmError) as e:
        CoLLM.from_pretrained(run)
    assert "manifest.json is not valid JSON" in one_line(e)
    (run / MANIFEST).write_text(json.dumps({"files": ["head.safetensors"]}))
    with pytest.raises(CollmError, match="is not a collm manifest"):
        CoLLM.from_pretrained(run)
    (run / MANIFEST).unlink()
    with pytest.raises(CollmError) as e:
        CoLLM.from_pretrained(run)
    assert f"collm seal {run}" in one_line(e)
    result = invoke("seal", run)  # the user vouches for the files as they are
    assert result.exit_code == 0 and json.loads(result.stdout)["files"] >= 2
    assert CoLLM.from_pretrained(run).threshold == 0.3


@pytest.mark.parametrize("change, message", [
    ({"format": "2"}, "format must be a positive integer, got '2'"),
    ({"format": 2}, "has format 2; this collm reads up to 1"),
    ({"experts": "expert"}, "experts must be a list of model specs"),
    ({"base": 3}, "base must be a model spec"),
    ({"threshold": 1.5}, "threshold must be a number in [0, 1]"),
    ({"base_weights": "half"}, "base_weights must be one of"),
])
def test_malformed_collm_json_is_a_one_line_error(run, change, message):
    from collm.run import seal

    config = json.loads((run / "collm.json").read_text())
    (run / "collm.json").write_text(json.dumps(config | change))
    seal(run, [run / "collm.json", run / "head.safetensors"])  # intact by its manifest: the content is wrong
    with pytest.raises(CollmError) as e:
        CoLLM.from_pretrained(run)
    assert message in one_line(e)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_head_with_nan_or_infinite_weights_is_refused(tmp_path, value):
    head = DeferralHead(32)
    path = tmp_path / "head.safetensors"
    head.save(path)
    tensors = load_file(str(path))
    tensors["linear.weight"][0, 3] = value
    save_file(tensors, str(path), metadata={"hidden_size": "32", "num_experts": "1"})
    with pytest.raises(CollmError) as e:
        DeferralHead.load(path)
    assert "NaN or infinite" in one_line(e)
    with torch.no_grad():
        head.linear.bias.fill_(value)
    with pytest.raises(CollmError, match="training diverged"):
        head.save(tmp_path / "again.safetensors")


def test_head_of_another_run_is_refused(run):
    from collm.run import seal

    DeferralHead(32, 2).save(run / "head.safetensors")  # a two-expert head where collm.json says one
    seal(run)
    with pytest.raises(CollmError, match="head has outputs for 2 experts|belongs to another run"):
        CoLLM.from_pretrained(run)


def test_a_head_reading_the_base_s_distribution_saves_loads_and_is_checked(folders, tmp_path):
    from collm.run import seal

    pair = CoLLM.load(folders[0], [folders[1]], threshold=0.4)
    pair.head = DeferralHead(32, 1, "entropy,margin")
    with torch.no_grad():
        pair.head.linear.weight.normal_()
    pair.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "collm.json").read_text())["head_features"] == ["entropy", "margin"]
    again = CoLLM.from_pretrained(tmp_path / "run")
    assert again.head.features == ("entropy", "margin")
    assert torch.equal(again.head.linear.weight, pair.head.linear.weight)
    assert again.generate(["go"], max_new_tokens=3).token_ids == pair.generate(["go"], max_new_tokens=3).token_ids
    tensors = load_file(str(tmp_path / "run" / "head.safetensors"))
    save_file(tensors, str(tmp_path / "newer.safetensors"),
              metadata={"hidden_size": "32", "num_experts": "1", "features": "entropy,surprise"})
    with pytest.raises(CollmError) as e:
        DeferralHead.load(tmp_path / "newer.safetensors")
    assert "unknown head feature 'surprise'" in one_line(e) and "upgrade collm" in one_line(e)
    DeferralHead(32, 1).save(tmp_path / "run" / "head.safetensors")  # the plain head of another run
    seal(tmp_path / "run")
    with pytest.raises(CollmError) as e:
        CoLLM.from_pretrained(tmp_path / "run")
    assert "belongs to another run" in one_line(e)


def test_calibrate_keeps_the_run_loadable(run):
    from collm.evaluation.calibrate import write_threshold

    write_threshold(run, 0.7, {"points": []})
    assert CoLLM.from_pretrained(run).threshold == 0.7


def test_a_head_saved_in_two_processes_has_one_sha256(tmp_path):
    """safetensors orders its header from a hash map; collm writes it canonically, so equal heads are equal bytes."""
    import hashlib
    import subprocess
    import sys

    script = ("import sys, torch; from collm import DeferralHead; torch.manual_seed(0); "
              "h = DeferralHead(16, 2, 'entropy,margin'); h.linear.weight.data.normal_(); h.save(sys.argv[1])")
    digests = set()
    for i in range(3):
        path = tmp_path / f"head{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env={"PYTHONHASHSEED": str(i),
                       **{k: v for k, v in __import__("os").environ.items() if k != "PYTHONHASHSEED"}})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        DeferralHead.load(path)  # still a valid head
    assert len(digests) == 1


def test_a_missing_run_folder_is_named_as_missing(tmp_path):
    with pytest.raises(CollmError, match="run folder .*missing.* does not exist") as e:
        CoLLM.from_pretrained(tmp_path / "missing")
    assert "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CollmError, match="is a file, not a run folder"):
        CoLLM.from_pretrained(tmp_path / "file")
