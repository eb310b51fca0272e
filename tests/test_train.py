"""Learning to defer on a known case, resume, baselines, the run folder, and two processes.

The known case: completions like "kq=3 zp=8" where each digit is a hash of the word before it. An oracle
expert gives the gold digit probability 0.9 and every other gold token 0.001; no base can learn the hash,
so after training the head should defer exactly before digits, on held-out rows too.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_llama, make_tokenizer, save_tiny

from collm.core.head import DeferralHead
from collm.data.rows import encode_file
from collm.errors import CollmError
from collm.training.loss import defer_prob
from collm.training.score import ScoreConfig, pad_batch, score, target_outputs
from collm.training.train import TrainConfig, train

DIGITS = set("0123456789")


def digit_rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        words = []
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            word = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (2,), generator=g))
            words.append(f"{word}={int(hashlib.md5(word.encode()).hexdigest(), 16) % 10}")
        rows.append({"prompt": "go", "completion": " ".join(words)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def oracle_forward(tokenizer):
    """An expert that is right (p = 0.9, argmax) exactly on digits and nearly never elsewhere."""
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(sorted(DIGITS)))

    def forward(model, ids, attention, targets):
        gold = ids[:, 1:][targets[:, 1:]]
        is_digit = torch.isin(gold, digit_ids)
        logp = torch.where(is_digit, torch.tensor(math.log(0.9)), torch.tensor(math.log(1e-3)))
        return logp, is_digit, None

    return forward


@pytest.fixture(scope="module")
def known_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    tok = make_tokenizer()
    train_data = write_jsonl(root / "train.jsonl", digit_rows(160, seed=0))
    heldout = write_jsonl(root / "heldout.jsonl", digit_rows(40, seed=1))
    base = save_tiny(make_llama(0), tok, root / "base")
    scores = str(root / "scores")
    score(ScoreConfig(expert="oracle", data=train_data, out=scores, max_len=64), "oracle", tok, oracle_forward(tok))
    return {"root": root, "tok": tok, "data": train_data, "heldout": heldout, "base": base, "scores": scores}


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def heldout_auroc(case, run) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(case["base"])
    if (run / "base_adapter").is_dir():
        base = PeftModel.from_pretrained(base, str(run / "base_adapter")).merge_and_unload()
    head = DeferralHead.load(run / "head.safetensors")
    data = encode_file(case["heldout"], case["tok"])
    ids, attention, targets = pad_batch(data.examples, 0)
    with torch.no_grad():
        _, _, hidden = target_outputs(base.eval(), ids, attention, targets, features=head.features)
        pi = defer_prob(head(hidden))
    gold = ids[:, 1:][targets[:, 1:]]
    is_digit = torch.isin(gold, torch.tensor(case["tok"].convert_tokens_to_ids(sorted(DIGITS))))
    return auroc(pi, is_digit)


def config(case, out, **overrides):
    values = dict(base=case["base"], data=case["data"], scores=[case["scores"]], out=str(case["root"] / out),
                  max_len=64, batch_size=16, epochs=8, head_lr=3e-2, lr=3e-3, weak_steps=100, save_every=1000)
    return TrainConfig(**(values | overrides))


@pytest.mark.parametrize("mode, weak, features", [("frozen", False, ""), ("frozen", True, ""), ("lora", True, ""),
                                                  ("frozen", True, "entropy,margin"),
                                                  ("lora", True, "entropy,max_prob,margin")])
def test_learns_to_defer_before_the_digits(known_case, mode, weak, features):
    run = train(config(known_case, f"{mode}-{weak}-{features}", base_mode=mode, weak_start=weak,
                       head_features=features))
    assert DeferralHead.load(run / "head.safetensors").features == tuple(filter(None, features.split(",")))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 8 * (160 // 16)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert heldout_auroc(known_case, run) >= 0.95
    run_config = json.loads((run / "collm.json").read_text())
    assert run_config["base_weights"] == {"frozen": "original", "lora": "lora"}[mode]
    assert run_config.get("head_features", []) == list(filter(None, features.split(",")))
    if weak:  # digits are about a fifth of the targets; the base (random) never gets them right
        assert 0.1 < run_config["training"]["weak_fit"]["positive_rate"] < 0.4


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resumed_training_follows_the_uninterrupted_run(known_case, monkeypatch):
    import collm.training.train as t

    common = dict(base_mode="lora", lora_dropout=0.1, max_steps=8, save_every=3, weak_steps=20)
    whole = train(config(known_case, "whole", **common))
    real_step, calls = t.train_step, []

    def crash_at_step_5(s, module, optimizer, scheduler, step):
        if step == 5 and not calls:
            calls.append(step)
            raise KeyboardInterrupt  # as if killed mid-run, after the step-3 checkpoint and two more steps
        return real_step(s, module, optimizer, scheduler, step)

    monkeypatch.setattr(t, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config(known_case, "resumed", **common))
    assert len(_losses(known_case["root"] / "resumed")) == 5
    resumed = train(config(known_case, "resumed", **common))
    assert _losses(resumed) == pytest.approx(_losses(whole), rel=1e-5)
    assert torch.allclose(DeferralHead.load(resumed / "head.safetensors").linear.weight,
                          DeferralHead.load(whole / "head.safetensors").linear.weight, atol=1e-6)
    with pytest.raises(CollmError, match="other settings .*lr"):
        train(config(known_case, "resumed", **common | {"lr": 1e-4}))


def test_an_out_folder_holding_a_user_s_files_is_refused_and_left_alone(known_case, tmp_path):
    """`collm train --out u2` where u2 holds files train did not write: nothing there is removed or trimmed."""
    out = tmp_path / "u2"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model-epoch9.pt").write_text("p")
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    quick = dict(base_mode="frozen", max_steps=2, weak_start=False, save_every=1)
    with pytest.raises(CollmError, match="holds files collm train did not write"):
        train(config(known_case, out, **quick))
    assert (out / "checkpoints" / "model-epoch9.pt").read_text() == "p"
    assert (out / "metrics.jsonl").read_text() == '{"step": 7, "loss": 1.0}\n'
    # In a run folder train made, starting over removes its own checkpoints and nothing else.
    run = train(config(known_case, "own", **quick))
    (run / "checkpoints" / "notes.txt").write_text("mine")
    train(config(known_case, "own", **quick, resume=False))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "notes.txt", "step-000001",
                                                                        "step-000002"]


def test_disk_full_mid_log_line_then_the_same_command_resumes_or_restarts(known_case, monkeypatch):
    """A full disk cuts metrics.jsonl mid-line: a one-line error, then resuming and --no-resume both work."""
    import errno

    import collm.atomic

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if '"step": 5' in text:
                self.f.write(text[:12])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    common = dict(base_mode="frozen", max_steps=6, save_every=2, weak_start=False)
    monkeypatch.setattr(collm.atomic, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(CollmError) as e:
        train(config(known_case, "disk-full", **common))
    assert "no space left on the device while writing" in str(e.value) and "metrics.jsonl" in str(e.value)
    run = known_case["root"] / "disk-full"
    assert (run / "metrics.jsonl").read_text().endswith('\n{"step": 5, ')  # the torn line a full disk leaves
    monkeypatch.undo()
    train(config(known_case, "disk-full", **common))  # resumes at the step-4 checkpoint
    whole = train(config(known_case, "disk-whole", **common))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert _losses(run) == pytest.approx(_losses(whole), rel=1e-5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # torn again; then start over
    train(config(known_case, "disk-full", **common, resume=False))
    assert _losses(run) == pytest.approx(_losses(whole), rel=1e-5)
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot a row\n{"step": 2}\n')
    with pytest.raises(CollmError, match=r"metrics.jsonl:2 is not a metrics row"):
        train(config(known_case, "disk-full", **common))
    assert (run / "checkpoints" / "latest").is_file()  # refused before anything was removed


def test_rows_longer_than_the_base_s_context_are_refused(tmp_path):
    tok = make_tokenizer()
    base = save_tiny(make_llama(0), tok, tmp_path / "base")  # 512 positions
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "go", "completion": "x" * 700}] * 4)
    with pytest.raises(CollmError, match="4 of 4 rows are longer than the base's context of 512 tokens"):
        train(TrainConfig(base=base, data=data, out=str(tmp_path / "run"), objective="sft", max_steps=1,
                          batch_size=2))


def test_run_folder_loads_with_from_pretrained_and_generates(tmp_path):
    from collm import CoLLM

    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", digit_rows(16, seed=2))
    expert = save_tiny(make_llama(1), tok, tmp_path / "expert")
    base = save_tiny(make_llama(0), tok, tmp_path / "base")
    score(ScoreConfig(expert=expert, data=data, out=str(tmp_path / "s"), max_len=64))
    for mode in ("lora", "full"):
        run = train(TrainConfig(base=base, data=data, scores=[str(tmp_path / "s")], out=str(tmp_path / mode),
                                base_mode=mode, max_len=64, batch_size=4, max_steps=2, weak_steps=5))
        pair = CoLLM.from_pretrained(run)
        out = pair.generate(["go"], max_new_tokens=4)
        assert len(out.token_ids[0]) >= 1 and pair.info["training"]["base_mode"] == mode
        assert pair.info["experts"] == [str((tmp_path / "expert").resolve())]


def test_target_outputs_with_features_append_the_distribution_s_to_the_hidden_states():
    from collm.core.head import FEATURES, distribution_features

    model = make_llama(0).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 0, 0]])
    attention = (ids != 0).long()
    targets = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        logp, hit, hidden = target_outputs(model, ids, attention, targets)
        logp2, hit2, x = target_outputs(model, ids, attention, targets, chunk=2, features=FEATURES)
        out = model(ids, attention_mask=attention, output_hidden_states=True)
    pred = targets[:, 1:]
    assert torch.allclose(logp, logp2, atol=1e-6) and torch.equal(hit, hit2) and torch.equal(x[:, :-3], hidden)
    assert torch.allclose(x[:, -3:], distribution_features(out.logits[:, :-1][pred], FEATURES), atol=1e-5)


def test_baselines_sft_and_weak(known_case):
    sft = train(config(known_case, "sft", objective="sft", scores=[], max_steps=4))
    sft_config = json.loads((sft / "collm.json").read_text())
    assert sft_config["base_weights"] == "lora" and sft_config["training"]["objective"] == "sft"
    head = DeferralHead.load(sft / "head.safetensors")  # never defers: the run decodes as the tuned base
    assert float(defer_prob(head(torch.zeros(1, head.hidden_size)))) == 0.0
    assert _losses(sft)[-1] < _losses(sft)[0]
    weak = train(config(known_case, "weak", objective="weak", base_mode="frozen", epochs=4))
    assert heldout_auroc(known_case, weak) >= 0.95
    # With a frozen base the logged `loss` is the base's LM loss, which training cannot change: the log also
    # shows what does train, the head's BCE.
    rows = [json.loads(line) for line in (weak / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["head_bce"] < rows[0]["head_bce"]
    assert "head_bce" not in json.loads((sft / "metrics.jsonl").read_text().splitlines()[0])
    # The untrained base is nearly never right, so "exactly one is right" is "the expert is right": digits.
    disagree = train(config(known_case, "disagree", objective="weak", base_mode="frozen", epochs=4,
                            weak_label="disagree"))
    assert heldout_auroc(known_case, disagree) >= 0.95


def test_the_weak_objective_with_a_trained_base_starts_from_the_weak_fit(known_case):
    # A LoRA base moves the head's inputs while the head learns; starting it from the fit on the original
    # base's states (as the marginal objective does) gives base and head a working router from step one.
    started = train(config(known_case, "weak-lora", objective="weak", base_mode="lora", max_steps=2))
    fit = json.loads((started / "collm.json").read_text())["training"]["weak_fit"]
    assert fit is not None and 0.1 < fit["positive_rate"] < 0.4
    assert heldout_auroc(known_case, started) >= 0.95
    first = json.loads((started / "metrics.jsonl").read_text().splitlines()[0])
    assert first["defer_rate"] > 0.1 and first["mean_pi"] != 0.5  # the first step's head is the fitted one
    cold = train(config(known_case, "weak-lora-cold", objective="weak", base_mode="lora", max_steps=2,
                        weak_start=False))
    assert json.loads((cold / "collm.json").read_text())["training"]["weak_fit"] is None
    first = json.loads((cold / "metrics.jsonl").read_text().splitlines()[0])
    assert first["defer_rate"] == 0.0 and first["mean_pi"] == 0.5  # a zero head: π = 1/2 everywhere
    frozen = train(config(known_case, "weak-frozen", objective="weak", base_mode="frozen", max_steps=2))
    assert json.loads((frozen / "collm.json").read_text())["training"]["weak_fit"] is None


def test_a_run_from_before_a_config_field_existed_resumes(known_case):
    run = train(config(known_case, "old", base_mode="frozen", max_steps=2, weak_steps=5))
    saved = json.loads((run / "train_config.json").read_text())
    del saved["weak_label"]  # as a run saved before the field was added
    (run / "train_config.json").write_text(json.dumps(saved))
    train(config(known_case, "old", base_mode="frozen", max_steps=2, weak_steps=5))  # resumes, no refusal
    with pytest.raises(CollmError, match="other settings .*weak_label"):
        train(config(known_case, "old", base_mode="frozen", max_steps=2, weak_steps=5, weak_label="disagree"))


def test_two_experts_softmax_head(known_case, tmp_path):
    # Expert 2 is expert 1 made worse everywhere: the head should route digits to expert 1.
    tok = known_case["tok"]
    oracle = oracle_forward(tok)

    def worse(model, ids, attention, targets):
        logp, hit, _ = oracle(model, ids, attention, targets)
        return logp - 3.0, torch.zeros_like(hit), None

    second = str(tmp_path / "scores2")
    score(ScoreConfig(expert="worse", data=known_case["data"], out=second, max_len=64), "worse", tok, worse)
    run = train(config(known_case, "two", base_mode="frozen", scores=[known_case["scores"], second], epochs=4))
    head = DeferralHead.load(run / "head.safetensors")
    assert head.num_experts == 2
    data = encode_file(known_case["heldout"], tok)
    ids, attention, targets = pad_batch(data.examples, 0)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        _, _, hidden = target_outputs(AutoModelForCausalLM.from_pretrained(known_case["base"]), ids, attention, targets)
        choice = head.log_probs(hidden).argmax(-1)
    gold = ids[:, 1:][targets[:, 1:]]
    is_digit = torch.isin(gold, torch.tensor(tok.convert_tokens_to_ids(sorted(DIGITS))))
    assert (choice[is_digit] == 1).float().mean() > 0.9 and (choice[~is_digit] == 2).float().mean() < 0.05


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "nope"}, "objective must be one of"),
        ({"base_mode": "frozen", "objective": "sft"}, "trains the base"),
        ({"scores": []}, "needs --scores"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"threshold": 1.5}, "threshold"),
        ({"weak_label": "gold"}, "weak_label must be one of paper, disagree"),
        ({"weak_label": "disagree", "scores": ["s", "t"]}, "one expert"),
        ({"disagree_below": 0.1}, "applies to weak_label disagree"),
        ({"weak_label": "disagree", "disagree_below": 0.0}, r"probability in \(0, 1\]"),
        ({"weak_label": "disagree", "disagree_below": 1.5}, r"probability in \(0, 1\]"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(CollmError, match=message):
        TrainConfig(**({"base": "b", "data": "d", "out": "o", "scores": ["s"]} | overrides))


def test_a_bad_model_path_leaves_no_run_folder(known_case, tmp_path):
    """A typo in --base is a one-line error, and the --out folder the command would have made is not left empty;
    a folder that was there already stays."""
    with pytest.raises(CollmError, match="does not exist"):
        train(config(known_case, tmp_path / "typo", base=str(tmp_path / "no-such-model")))
    assert not (tmp_path / "typo").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(CollmError, match="does not exist"):
        train(config(known_case, tmp_path / "mine", base=str(tmp_path / "no-such-model")))
    assert (tmp_path / "mine").is_dir()


def test_scores_for_other_data_are_refused(known_case, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", digit_rows(20, seed=5))
    with pytest.raises(CollmError, match="other data"):
        train(config(known_case, "refused", data=other))


TWO_PROCESS = """
import json, sys
from collm.training.train import TrainConfig, train
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def test_accelerate_launch_two_cpu_processes_matches_one(known_case, tmp_path):
    common = dict(base=known_case["base"], data=known_case["data"], scores=[known_case["scores"]], max_len=64,
                  base_mode="lora", max_steps=3, weak_steps=10, lr=3e-3)
    one = train(TrainConfig(**common, out=str(tmp_path / "one"), batch_size=4, grad_accum=2))
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(TWO_PROCESS))
    two = tmp_path / "two"
    args = json.dumps(common | {"out": str(two), "batch_size": 4, "grad_accum": 1})
    # accelerate 1.x: "--cpu --num_processes 2" starts ONE process (multi-CPU there needs mpirun);
    # torchrun's launcher with ACCELERATE_USE_CPU=1 gives two gloo processes.
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(script), args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    assert json.loads((two / "collm.json").read_text())["base_weights"] == "lora"


def test_cli_score_then_train_with_a_config_file(tmp_path):
    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", digit_rows(12, seed=3))
    expert = save_tiny(make_llama(1), tok, tmp_path / "expert")
    base = save_tiny(make_llama(0), tok, tmp_path / "base")
    cli = [sys.executable, "-m", "collm.cli"]
    scored = subprocess.run([*cli, "score", "--expert", expert, "--data", data, "--out", str(tmp_path / "s"),
                             "--max-len", "64"], capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr[-2000:]
    (tmp_path / "train.yaml").write_text(f"base: {base}\nmax_len: 64\nbatch_size: 4\nmax_steps: 2\nweak_steps: 5\n"
                                         f"base_mode: frozen\n")
    trained = subprocess.run([*cli, "train", "--config", str(tmp_path / "train.yaml"), "--data", data,
                              "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--max-steps", "3"],
                             capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "collm.json").read_text())["training"]
    assert saved["max_steps"] == 3 and saved["base_mode"] == "frozen" and saved["batch_size"] == 4
    refused = subprocess.run([*cli, "train", "--base", base, "--data", data, "--out", str(tmp_path / "r2"),
                              "--scores", str(tmp_path / "s"), "--max-len", "32"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "other data or encoding settings" in refused.stderr
    assert "Traceback" not in refused.stderr


def _run_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_and_resumed_run_writes_the_same_bytes_as_an_uninterrupted_one(known_case, monkeypatch):
    """Every file of the run, checkpoints and log included: the same folder name, so the saved config agrees."""
    import shutil

    import collm.training.train as t

    common = dict(base_mode="lora", lora_dropout=0.1, max_steps=6, save_every=2, weak_steps=10)
    out = known_case["root"] / "bytes"
    train(config(known_case, "bytes", **common))
    whole = _run_bytes(out)
    shutil.rmtree(out)
    real_step, calls = t.train_step, []

    def crash_at_step_4(s, module, optimizer, scheduler, step):
        if step == 4 and not calls:
            calls.append(step)
            raise KeyboardInterrupt
        return real_step(s, module, optimizer, scheduler, step)

    monkeypatch.setattr(t, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config(known_case, "bytes", **common))
    train(config(known_case, "bytes", **common))
    resumed = _run_bytes(out)
    assert resumed.keys() == whole.keys()
    assert [name for name in whole if resumed[name] != whole[name]] == []


def test_training_opens_no_socket_and_prints_nothing_to_act_on(known_case, monkeypatch, recwarn):
    """With the network blocked and the base named as a hub id would be (as the embedded default is), a LoRA
    run tries no connection and raises no warning: peft's adapter save would otherwise look the name up."""
    import socket

    import collm.training.train as t

    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    real_load = t.load_model

    def named(spec, **kwargs):
        model, tokenizer = real_load(spec, **kwargs)
        model.name_or_path = model.config._name_or_path = "smollm2-135m-instruct"  # no folder of that name
        return model, tokenizer

    monkeypatch.setattr(t, "load_model", named)
    run = train(config(known_case, "offline", base_mode="lora", max_steps=2, weak_steps=5))
    assert (run / "base_adapter" / "adapter_model.safetensors").is_file()
    assert tried == []
    assert [str(w.message) for w in recwarn] == []
