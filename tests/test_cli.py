"""The `collm` command line on tiny models saved as HF folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import invoke, make_gpt2, make_llama, make_tokenizer, save_tiny
from typer.testing import CliRunner

from collm.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    return save_tiny(make_llama(0), tok, root / "base"), save_tiny(make_llama(1), tok, root / "expert")



@pytest.mark.parametrize("head, rate", [("never", 0.0), ("always", 1.0)])
def test_generate_json(folders, head, rate):
    base, expert = folders
    result = invoke("generate", "--base", base, "--expert", expert, "--head", head, "--max-new-tokens", 6,
                    "--json", "What is 2+3?", "hello")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["texts"]) == 2 and out["stats"]["defer_rate"] == rate
    assert all(len(s) == len(t) for s, t in zip(out["sources"], out["token_ids"]))


def test_generate_colored_output_and_summary(folders):
    base, expert = folders
    result = invoke("generate", "--base", base, "--expert", expert, "--head", "always", "--max-new-tokens", 5, "hi")
    assert result.exit_code == 0
    assert "deferral rate 100.0%" in result.stdout and "expert calls" in result.stdout


def test_generate_with_lookahead_writes_what_the_engine_writes(folders):
    base, expert = folders
    args = ["generate", "--base", base, "--expert", expert, "--threshold", "0.3", "--max-new-tokens", 12, "--json",
            "What is 2+3?", "hello"]
    plain = json.loads(invoke(*args).stdout)
    drafted = json.loads(invoke(*args, "--lookahead", 4).stdout)
    assert drafted["token_ids"] == plain["token_ids"] and drafted["sources"] == plain["sources"]
    assert drafted["texts"] == plain["texts"] and drafted["stats"]["lookahead"] == 4
    shown = invoke("generate", "--base", base, "--expert", expert, "--threshold", "0.3", "--max-new-tokens", 12,
                   "--lookahead", 4, "hello")  # one prompt: streamed as it is written, colored
    assert shown.exit_code == 0 and "expert calls" in shown.stdout
    expert_alone = json.loads(invoke(*args, "--mode", "expert").stdout)
    speculative = json.loads(invoke(*args, "--mode", "expert", "--lookahead", 4).stdout)  # speculative decoding
    assert speculative["token_ids"] == expert_alone["token_ids"] and speculative["texts"] == expert_alone["texts"]


def test_config_file_sets_options(folders, tmp_path):
    base, expert = folders
    config = tmp_path / "gen.json"
    config.write_text(json.dumps({"base": base, "expert": [expert], "head": "always", "max_new_tokens": 3}))
    out = json.loads(invoke("generate", "--config", config, "--json", "hi").stdout)
    assert out["stats"]["new_tokens"] <= 3 and out["stats"]["defer_rate"] == 1.0


@pytest.mark.parametrize("text, key, closest", [
    ("thresold: 0.3\n", "thresold", "threshold"),
    ('{"max-new-token": 3}', "max-new-token", "max_new_tokens"),
    ("temprature: 0.5\n", "temprature", "temperature"),
])
def test_config_file_with_an_unknown_key_is_refused_naming_the_closest(tmp_path, text, key, closest):
    config = tmp_path / ("gen.json" if text.startswith("{") else "gen.yaml")
    config.write_text(text)
    result = runner.invoke(app, ["generate", "--config", str(config), "hi"])
    message = str(result.exception)
    assert f"{key!r} is not an option of collm generate; did you mean {closest!r}?" in message
    (tmp_path / "bad.yaml").write_bytes(b"threshold: 0.3 \xff\n")
    result = runner.invoke(app, ["generate", "--config", str(tmp_path / "bad.yaml"), "hi"])
    assert "is not UTF-8 text" in str(result.exception)


def test_config_file_with_a_key_like_no_option_suggests_none(tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text("frobnicate: 1\n")
    message = str(runner.invoke(app, ["generate", "--config", str(config), "hi"]).exception)
    assert "'frobnicate' is not an option of collm generate; see `collm generate --help`" in message
    assert "did you mean" not in message


def test_bad_input_is_one_line_and_exit_2(folders):
    base, expert = folders
    proc = subprocess.run([sys.executable, "-m", "collm.cli", "generate", "--base", base, "--expert", expert,
                           "--threshold", "1.5", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: threshold must be a number in [0, 1], got 1.5"]
    proc = subprocess.run([sys.executable, "-m", "collm.cli", "generate", "--base", "/nonexistent", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "threshold must be a number in [0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--mode", "bogus"], "mode must be one of"),
    (["--do-sample", "--temperature", "0"], "temperature must be > 0"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--lookahead", "0"], "lookahead must be a whole number of tokens >= 1"),
    (["--lookahead", "4", "--mode", "compose"], "mode 'compose' cannot draft"),
])
def test_generate_refuses_bad_settings_before_loading_any_model(monkeypatch, args, message):
    """A typo in a setting costs no model load (minutes for a large model), and prints no prompt first."""
    from collm.errors import CollmError
    from collm.pair import CoLLM

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(CoLLM, "load", no_loading)
    monkeypatch.setattr(CoLLM, "from_pretrained", no_loading)
    result = runner.invoke(app, ["generate", *args, "hi"])  # `collm` turns a CollmError into one line, exit 2
    assert isinstance(result.exception, CollmError) and message in str(result.exception)
    assert "> hi" not in result.output


def _no_loading(monkeypatch):
    from collm.pair import CoLLM

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(CoLLM, "load", no_loading)
    monkeypatch.setattr(CoLLM, "from_pretrained", no_loading)


@pytest.mark.parametrize("args, message", [
    (["--seed", "99999999999999999999", "hi"], "seed must be an integer in [0, 4294967295]"),
    (["--seed", "-1", "hi"], "seed must be an integer"),
    (["--device", "cuda", "hi"], "CUDA is not available here: use --device cpu"),
    (["--device", "gpu0", "hi"], "is not a torch device"),
    ([""], "prompt 1 is empty"),
    (["ok", "  "], "prompt 2 is empty"),
    (["caf\udce9"], "prompt 1 is not valid UTF-8 text"),  # how Python passes argv bytes that are not UTF-8
])
def test_generate_refuses_bad_input_before_loading_any_model(monkeypatch, args, message):
    import torch

    _no_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["generate", *args])
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_prompt_file_that_is_not_utf8_is_a_one_line_error(monkeypatch, tmp_path):
    _no_loading(monkeypatch)
    (tmp_path / "p.txt").write_bytes(b"What is 2+3?\nCaf\xe9 prices?\n")  # latin-1
    result = runner.invoke(app, ["generate", "--prompt-file", str(tmp_path / "p.txt")])
    assert "p.txt:2: not UTF-8 text" in str(result.exception)


def test_train_and_eval_refuse_a_seed_out_of_range(tmp_path):
    result = runner.invoke(app, ["train", "--base", "b", "--data", "d", "--out", str(tmp_path / "r"), "--scores", "s",
                                 "--seed", "99999999999999999999"])
    assert "seed must be an integer" in str(result.exception)
    from collm.errors import CollmError
    from collm.evaluation.evaluate import EvalConfig
    from collm.training.train import TrainConfig

    with pytest.raises(CollmError, match="seed must be"):
        TrainConfig(base="b", data="d", out="o", scores=["s"], seed=2**64)
    with pytest.raises(CollmError, match="seed must be"):
        EvalConfig(seed=-5)


def test_default_head_says_it_never_defers(monkeypatch, folders):
    base, expert = folders
    result = runner.invoke(app, ["generate", "--base", base, "--expert", expert, "--max-new-tokens", 2, "--json", "hi"])
    assert result.exit_code == 0 and json.loads(result.stdout)["stats"]["defer_rate"] == 0.0
    assert "no --head: the zero head gives P(defer) = 0.5, which never exceeds threshold 0.5" in result.stderr
    quiet = runner.invoke(app, ["generate", "--base", base, "--expert", expert, "--max-new-tokens", 2, "--json",
                                "--threshold", "0.4", "hi"])
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr
    assert json.loads(quiet.stdout)["stats"]["defer_rate"] == 1.0


def test_a_pair_of_two_tokenizers_collaborates_through_the_text(tmp_path, folders):
    base, _ = folders
    tok = make_tokenizer()
    tok.add_tokens(["<extra>"])  # another vocabulary: the expert is paired through the text (collm.backends.cross)
    other = save_tiny(make_gpt2(3), tok, tmp_path / "other")
    out = json.loads(invoke("generate", "--base", base, "--expert", other, "--head", "always", "--max-new-tokens", 6,
                            "--json", "hi").stdout)
    assert out["stats"]["defer_rate"] == 1.0 and out["stats"]["cross_forwards"] > 0


def test_generate_from_a_saved_run(folders, tmp_path):
    from collm.pair import CoLLM

    base, expert = folders
    pair = CoLLM.load(base, [expert], "always", threshold=0.25)
    pair.save_pretrained(tmp_path / "run")
    out = json.loads(invoke("generate", "--run", tmp_path / "run", "--max-new-tokens", 4, "--json", "hi").stdout)
    assert out["stats"]["defer_rate"] == 1.0 and len(out["token_ids"][0]) <= 4


def test_one_prompt_streams_the_same_text_as_json(folders):
    base, expert = folders
    args = ("generate", "--base", base, "--expert", expert, "--head", "always", "--max-new-tokens", 12)
    text = json.loads(invoke(*args, "--json", "hello").stdout)["texts"][0]
    streamed = invoke(*args, "hello").stdout
    def squeeze(t):  # rich wraps lines at the terminal width
        return "".join(t.split())

    assert squeeze(text) and squeeze(text) in squeeze(streamed)
    assert "deferral rate 100.0%" in streamed


def test_on_token_sees_every_token_and_its_writer():
    import torch
    from conftest import make_llama

    from collm import CoLLM, DeferralHead

    base, expert = make_llama(0), make_llama(1)
    torch.manual_seed(7)
    head = DeferralHead(32)
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.5)
    seen = {0: [], 1: []}

    def on_token(tokens, sources, done):
        for row in (0, 1):
            if not done[row]:
                seen[row].append((tokens[row], sources[row]))

    out = CoLLM(base, [expert], head).generate([[1, 40, 41], [1, 50]], max_new_tokens=16, on_token=on_token)
    for row in (0, 1):
        assert seen[row] == list(zip(out.token_ids[row], out.sources[row]))


def test_train_options_are_the_config_fields():
    """`collm train` is generated from TrainConfig: every field is an option, with its docstring as help."""
    import dataclasses

    import typer

    from collm.training.train import TrainConfig

    options = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options, f.name
    assert options["weak_start"].help.startswith("Marginal objective, and the weak objective with a trained base")
    assert options["base"].required and options["lr"].default == TrainConfig.lr
