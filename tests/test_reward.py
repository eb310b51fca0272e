"""collm reward: the head learns from whole answers by policy gradient with a group baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import invoke, make_llama, make_tokenizer, save_tiny

from collm import CoLLM, CollmError, DeferralHead
from collm.core.routing import defer_prob
from collm.training import reward as rw


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny run (random base and expert, a zero head: P(defer) = 0.5) and training rows."""
    root = tmp_path_factory.mktemp("reward")
    tok = make_tokenizer()
    base, expert = save_tiny(make_llama(0), tok, root / "base"), save_tiny(make_llama(1), tok, root / "expert")
    pair = CoLLM.load(base, [expert])
    pair.save_pretrained(root / "run")
    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(start, out, **kw):
    settings = dict(run=str(start / "run"), data=str(start / "rows.jsonl"), out=str(out), rounds=2, problems=2,
                    rollouts=3, batch_size=4, max_new_tokens=6, updates=2, lr=0.05)
    return rw.RewardConfig(**{**settings, **kw})


class Killed(Exception):
    """As if the process were killed: raised from the progress callback."""


def kill_in_round_two(line):
    if line.startswith("round 2 batch 1/"):  # round 2's first batch is on disk, its second is not
        raise Killed


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_gradient_moves_defer_prob_toward_the_rewarded_routing():
    """A scripted reward pays for the expert writing at one token id and charges it elsewhere: over rounds of
    draws from the head and updates, P(defer) rises at that id and falls at the others."""
    torch.manual_seed(0)
    ids, hidden, rewarded = 6, 8, 2
    embed = torch.randn(ids, hidden)
    head = DeferralHead(hidden)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    cfg = rw.RewardConfig(run="r", data="d", out="o", updates=2, rollouts=4)
    generator = torch.Generator().manual_seed(1)
    answers, length = 16, 10
    for _ in range(30):
        tokens = torch.randint(ids, (answers, length), generator=generator)
        x = embed[tokens].reshape(-1, hidden)
        with torch.no_grad():
            p = defer_prob(head.log_probs(x))
        choices = (torch.rand(p.shape, generator=generator) < p).long()
        deferred = choices.view(answers, length)
        rewards = (deferred * torch.where(tokens == rewarded, 1.0, -1.0)).sum(1).double()
        batch = {"inputs": x, "choices": choices, "lengths": torch.full((answers,), length),
                 "advantages": rw.advantages(rewards, torch.arange(answers) // 4, True)}
        rw.update_head(head, optimizer, batch, cfg)
    with torch.no_grad():
        p = defer_prob(head.log_probs(embed))
    assert p[rewarded] > 0.9
    assert all(p[i] < 0.1 for i in range(ids) if i != rewarded)


def test_advantages_are_centred_per_group_and_zero_where_a_group_agrees():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert rw.advantages(rewards, groups, False).tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert rw.advantages(rewards, groups, True).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0]


def test_a_price_on_expert_tokens_makes_the_head_defer_less(start, tmp_path):
    """End to end on the tiny pair: every answer is wrong (a random model), so only the price speaks."""
    out = rw.train_reward(config(start, tmp_path / "out", price=0.2, rounds=3, problems=4), progress=lambda _: None)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert history[0]["defer_prob_before"] == pytest.approx(0.5)
    assert history[-1]["defer_prob_after"] < 0.3
    assert all(0 <= h["defer_rate"] <= 1 and h["answers"] == 12 for h in history)
    pair = CoLLM.from_pretrained(out)  # a loadable run, its manifest checked
    assert pair.info["training"]["objective"] == "reward" and pair.info["training"]["rounds_done"] == 3
    assert not (out / "rollouts").exists()  # finished rounds leave no shards


def test_a_killed_run_resumes_to_the_same_bytes(start, tmp_path):
    """Killed in the middle of round 2 (after its first batch's shard), then run again: every file of the run
    is byte for byte what the uninterrupted run wrote in the same folder."""
    import shutil

    out = tmp_path / "run"
    rw.train_reward(config(start, out), progress=lambda _: None)
    whole = files(out)
    shutil.rmtree(out)

    with pytest.raises(Killed):
        rw.train_reward(config(start, out), progress=kill_in_round_two)
    assert (out / "rollouts" / "round-0001" / "batch-0000.json").is_file()
    lines = []
    rw.train_reward(config(start, out), progress=lines.append)
    assert lines[0].startswith("resuming") and not any(line.startswith("round 2 batch 1/") for line in lines)
    resumed = files(out)
    assert resumed.keys() == whole.keys()
    assert [name for name in whole if resumed[name] != whole[name]] == []


def test_more_rounds_go_on_from_a_finished_run(start, tmp_path):
    two = rw.train_reward(config(start, tmp_path / "two"), progress=lambda _: None)
    one = tmp_path / "one"
    rw.train_reward(config(start, one, rounds=1), progress=lambda _: None)
    rw.train_reward(config(start, one, rounds=2), progress=lambda _: None)
    assert (one / "head.safetensors").read_bytes() == (two / "head.safetensors").read_bytes()
    with pytest.raises(CollmError, match="made with price=0.0, not 0.5"):
        rw.train_reward(config(start, one, price=0.5), progress=lambda _: None)


def bad_checker_raises(row, text):
    raise ValueError("no answer here")


def bad_checker_nan(row, text):
    return math.nan


@pytest.mark.parametrize("spec, message", [
    ("exact", "give gsm or module:function"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("math:no_such_function", "math has no function 'no_such_function'"),
])
def test_a_checker_that_cannot_be_found_is_one_line(spec, message):
    with pytest.raises(CollmError, match=message) as e:
        rw.RewardConfig(run="r", data="d", out="o", checker=spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, message", [("bad_checker_raises", "raised ValueError on row"),
                                           ("bad_checker_nan", "returned nan for row")])
def test_a_checker_that_fails_is_one_line(start, tmp_path, name, message):
    with pytest.raises(CollmError, match=message) as e:
        rw.train_reward(config(start, tmp_path / "out", checker=f"test_reward:{name}"), progress=lambda _: None)
    assert "\n" not in str(e.value)


def test_the_command_runs_and_refuses_bad_settings(start, tmp_path):
    result = invoke("reward", "--run", start / "run", "--data", start / "rows.jsonl", "--out", tmp_path / "cli",
                    "--rounds", 1, "--problems", 2, "--rollouts", 2, "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "head.safetensors").is_file()
    with pytest.raises(CollmError, match="rollouts must be an integer >= 2"):  # `collm` prints it as one line
        invoke("reward", "--run", start / "run", "--data", start / "rows.jsonl", "--out", tmp_path / "x",
               "--rollouts", 1)
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CollmError, match="holds files collm reward did not write"):
        rw.train_reward(config(start, foreign), progress=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_no_resume_starts_over_and_a_failed_start_blocks_nothing(start, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CollmError):  # a start run that does not exist: refused before anything is written
        rw.train_reward(config(start, out, run=str(tmp_path / "nowhere")), progress=lambda _: None)
    assert not (out / "reward_config.json").exists()
    fresh = files(rw.train_reward(config(start, tmp_path / "fresh"), progress=lambda _: None))

    with pytest.raises(Killed):
        rw.train_reward(config(start, out, price=0.5), progress=kill_in_round_two)
    (out / "rollouts" / "round-0001" / "notes.txt").write_text("mine")  # not ours: stays
    lines = []
    rw.train_reward(config(start, out, resume=False), progress=lines.append)
    assert not any(line.startswith("resuming") for line in lines)
    assert (out / "rollouts" / "round-0001" / "notes.txt").read_text() == "mine"
    mine = files(out)
    assert mine["head.safetensors"] == fresh["head.safetensors"]
    assert mine["metrics.jsonl"] == fresh["metrics.jsonl"]
