"""Scoring: values equal a plain forward; a SIGKILLed run resumes to the same bytes; keys are enforced."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_gpt2, make_llama, make_tokenizer, save_tiny

from collm.data.rows import DataConfig, encode_file
from collm.errors import CollmError
from collm.training.score import ScoreConfig, load_scores, score


def write_rows(path, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
        rows.append({"prompt": f"{a}+{b}=?" + "x" * (i % 7), "completion": f"{a + b} because {a} plus {b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def expert_dir(tmp_path):
    return save_tiny(make_llama(1), make_tokenizer(), tmp_path / "expert")


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_scores_equal_a_plain_forward(tmp_path, make):
    model, tok = make(1), make_tokenizer()
    data_path = write_rows(tmp_path / "d.jsonl", n=9)
    config = ScoreConfig(expert="tiny", data=str(data_path), out=str(tmp_path / "s"), batch_tokens=64, shard_rows=4)
    score(config, model, tok)
    data = encode_file(data_path, tok, config.data_config())
    scores = load_scores(tmp_path / "s", data)
    for i, example in enumerate(data.examples):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        targets = torch.tensor(example.completion_mask[1:])
        gold = ids[0, 1:][targets]
        want = logp[targets].gather(-1, gold[:, None])[:, 0]
        got = scores.gold_logp[scores.offsets[i] : scores.offsets[i + 1]]
        assert torch.allclose(got, want, atol=1e-5)
        hit = scores.argmax_gold[scores.offsets[i] : scores.offsets[i + 1]]
        best = logp[targets].max(-1).values  # the tie rule: gold counts when it ties the maximum
        assert torch.equal(hit, torch.isclose(want, best, rtol=1e-5))


KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
import collm.tensorfile as t
import collm.training.score as s
calls = []
real_atomic = t.atomic_write
def write_then_die(path, write):
    def written(tmp):
        write(tmp)
        calls.append(path)
        if len(calls) == 2:  # the second shard's temp file is written, not yet renamed: the worst moment
            os.kill(os.getpid(), signal.SIGKILL)
    real_atomic(path, written)
t.atomic_write = write_then_die
real_shard = s._score_shard
def counting(*a, **k):
    print("SHARD", flush=True)
    return real_shard(*a, **k)
s._score_shard = counting
s.score(s.ScoreConfig(expert=sys.argv[1], data=sys.argv[2], out=sys.argv[3], shard_rows=8, batch_tokens=128))
"""


def _run(script, *args, kill=True):
    code = script if kill else script.replace("if len(calls) == 2", "if False")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sigkill_then_resume_is_byte_identical(tmp_path, expert_dir):
    data_path = write_rows(tmp_path / "d.jsonl", n=30)
    killed = _run(KILL_AFTER_FIRST_SHARD, expert_dir, data_path, tmp_path / "a")
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["0"] and not manifest["complete"]
    first_shard = (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns

    resumed = _run(KILL_AFTER_FIRST_SHARD, expert_dir, data_path, tmp_path / "a", kill=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("SHARD") == 3  # 4 shards of 8 rows; the finished one is not recomputed
    assert (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns == first_shard

    whole = _run(KILL_AFTER_FIRST_SHARD, expert_dir, data_path, tmp_path / "b", kill=False)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_mismatched_keys_are_refused(tmp_path):
    model, tok = make_llama(1), make_tokenizer()
    data_path = write_rows(tmp_path / "d.jsonl", n=6)
    config = ScoreConfig(expert="tiny", data=str(data_path), out=str(tmp_path / "s"), max_len=64)
    score(config, model, tok)
    with pytest.raises(CollmError, match="other data or encoding settings"):
        load_scores(tmp_path / "s", encode_file(data_path, tok, DataConfig(max_len=32)))
    other_tok = make_tokenizer()
    other_tok.chat_template = None
    with pytest.raises(CollmError, match="another tokenizer"):
        load_scores(tmp_path / "s", encode_file(data_path, other_tok, DataConfig(max_len=64)))
    other = write_rows(tmp_path / "e.jsonl", n=6, seed=1)
    with pytest.raises(CollmError, match="data fingerprint"):
        score(ScoreConfig(expert="tiny", data=str(other), out=str(tmp_path / "s")), model, tok)
    score(ScoreConfig(expert="tiny", data=str(other), out=str(tmp_path / "s"), overwrite=True), model, tok)
    assert load_scores(tmp_path / "s", encode_file(other, tok)).gold_logp.numel() > 0


def test_unfinished_or_missing_scores_are_refused(tmp_path):
    tok = make_tokenizer()
    data = encode_file(write_rows(tmp_path / "d.jsonl", n=3), tok)
    with pytest.raises(CollmError, match="run collm score first"):
        load_scores(tmp_path / "none", data)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"key": {}, "shards": {}, "num_shards": 1,
                                                             "complete": False}))
    with pytest.raises(CollmError, match="unfinished"):
        load_scores(tmp_path / "s", data)
    (tmp_path / "s" / "manifest.json").write_text("{torn")
    with pytest.raises(CollmError, match="was not written by collm score"):
        load_scores(tmp_path / "s", data)


def test_a_folder_collm_did_not_write_is_refused_and_left_alone(tmp_path):
    """`collm score --out u` where u holds a user's files: refused, and every file is still there."""
    model, tok = make_llama(1), make_tokenizer()
    data_path = write_rows(tmp_path / "d.jsonl", n=4)
    mine = tmp_path / "u"
    mine.mkdir()
    files = {".env": "x", ".gitignore": "y", "shard-plan.txt": "z", "shard-00000.safetensors": "w"}
    for name, text in files.items():
        (mine / name).write_text(text)
    with pytest.raises(CollmError, match="holds files collm score did not write"):
        score(ScoreConfig(expert="tiny", data=str(data_path), out=str(mine)), model, tok)
    assert {p.name: p.read_text() for p in mine.iterdir()} == files
    (mine / "manifest.json").write_text(json.dumps({"files": {}}))  # someone else's manifest
    with pytest.raises(CollmError, match="was not written by collm score"):
        score(ScoreConfig(expert="tiny", data=str(data_path), out=str(mine), overwrite=True), model, tok)
    assert (mine / "manifest.json").read_text() == json.dumps({"files": {}})


def test_overwrite_removes_only_the_old_scores(tmp_path):
    model, tok = make_llama(1), make_tokenizer()
    out = tmp_path / "s"
    score(ScoreConfig(expert="tiny", data=str(write_rows(tmp_path / "d.jsonl", n=6)), out=str(out), shard_rows=2),
          model, tok)
    (out / ".env").write_text("secret")
    (out / "shard-notes.txt").write_text("mine")
    (out / ".shard-00001.safetensors.abcd1234").write_text("left by a kill")  # our temp file
    other = write_rows(tmp_path / "e.jsonl", n=2, seed=1)
    score(ScoreConfig(expert="tiny", data=str(other), out=str(out), shard_rows=2, overwrite=True), model, tok)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".env", "manifest.json", "shard-00000.safetensors", "shard-notes.txt"]


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_rows_longer_than_the_expert_s_context_are_refused_or_cut_visibly(tmp_path, make, capsys):
    """512-position models, a 700-token row: refused (GPT-2 crashed with IndexError, Llama said
    "0 truncated"); with --max-len 512 the row is cut and counted."""
    model, tok = make(1), make_tokenizer()
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "p", "completion": "x" * 700},
                                                            {"prompt": "q", "completion": "short"}]))
    with pytest.raises(CollmError, match=r"1 of 2 rows are longer than the expert's context of 512 tokens"):
        score(ScoreConfig(expert="tiny", data=str(path), out=str(tmp_path / "s")), model, tok)
    assert not (tmp_path / "s").exists()
    score(ScoreConfig(expert="tiny", data=str(path), out=str(tmp_path / "t"), max_len=512), model, tok)
    reported = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")][-1]
    assert reported.startswith("data: 2 rows, 522 tokens") and "; 1 truncated" in reported  # 512 + 10


def test_scores_of_the_older_argmax_rule_are_refused_not_mixed(tmp_path):
    model, tok = make_llama(1), make_tokenizer()
    data_path = write_rows(tmp_path / "d.jsonl", n=4)
    config = ScoreConfig(expert="tiny", data=str(data_path), out=str(tmp_path / "s"))
    score(config, model, tok)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest | {"format": 1}))
    with pytest.raises(CollmError, match="format 1 .*run collm score again with --overwrite"):
        load_scores(tmp_path / "s", encode_file(data_path, tok))
    with pytest.raises(CollmError, match="older format"):
        score(config, model, tok)
    score(ScoreConfig(**{**config.__dict__, "overwrite": True}), model, tok)
    assert load_scores(tmp_path / "s", encode_file(data_path, tok)).gold_logp.numel() > 0


def test_disk_full_mid_shard_is_one_line_then_the_same_command_resumes(tmp_path, monkeypatch):
    import errno


    model, tok = make_llama(1), make_tokenizer()
    data_path = write_rows(tmp_path / "d.jsonl", n=12)
    def config(out):
        return ScoreConfig(expert="tiny", data=str(data_path), out=str(tmp_path / out), shard_rows=4)

    import collm.tensorfile as t

    real_atomic, calls = t.atomic_write, []

    def fill_the_disk(path, write):
        def half(tmp):
            calls.append(path)
            if len(calls) == 2:
                open(tmp, "wb").write(b"half a shard")
                raise OSError(errno.ENOSPC, "No space left on device")
            write(tmp)
        real_atomic(path, half)

    monkeypatch.setattr(t, "atomic_write", fill_the_disk)
    with pytest.raises(CollmError) as e:
        score(config("a"), model, tok)
    assert "no space left on the device while writing" in str(e.value) and "shard-00001" in str(e.value)
    monkeypatch.undo()
    score(config("a"), model, tok)
    score(config("b"), model, tok)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_reuse_copies_rows_scored_before_and_scores_only_the_new_ones(tmp_path):
    from collm.training.score import target_outputs

    model, tok = make_llama(1), make_tokenizer()
    old = write_rows(tmp_path / "old.jsonl", n=6)
    score(ScoreConfig(expert="tiny", data=str(old), out=str(tmp_path / "s-old"), shard_rows=4), model, tok)
    new_rows = write_rows(tmp_path / "extra.jsonl", n=4, seed=1).read_text().splitlines(keepends=True)
    old_rows = old.read_text().splitlines(keepends=True)
    grown = tmp_path / "grown.jsonl"  # new rows interleaved with the old ones, one old row twice
    grown.write_text("".join([new_rows[0], *old_rows[:3], new_rows[1], old_rows[2], *old_rows[3:], *new_rows[2:]]))
    scored = []

    def counting(model, ids, attention, targets):
        scored.append(ids.shape[0])
        return target_outputs(model, ids, attention, targets)

    config = ScoreConfig(expert="tiny", data=str(grown), out=str(tmp_path / "s-grown"), shard_rows=4,
                         reuse=(str(tmp_path / "s-old"),))
    score(config, model, tok, forward=counting)
    assert sum(scored) == 4  # only the rows the old folder had not scored
    score(ScoreConfig(expert="tiny", data=str(grown), out=str(tmp_path / "s-fresh"), shard_rows=4), model, tok)
    data = encode_file(grown, tok, config.data_config())
    reused, fresh = load_scores(tmp_path / "s-grown", data), load_scores(tmp_path / "s-fresh", data)
    assert torch.equal(reused.offsets, fresh.offsets)
    assert torch.allclose(reused.gold_logp, fresh.gold_logp, atol=1e-5)
    assert torch.equal(reused.argmax_gold, fresh.argmax_gold)


def test_reuse_refuses_scores_of_another_expert_changed_data_or_an_unfinished_run(tmp_path):
    model, tok = make_llama(1), make_tokenizer()
    old = write_rows(tmp_path / "old.jsonl", n=4)
    score(ScoreConfig(expert="tiny", data=str(old), out=str(tmp_path / "s-old")), model, tok)
    data = write_rows(tmp_path / "d.jsonl", n=6)

    def run(expert="tiny", out="s"):
        score(ScoreConfig(expert=expert, data=str(data), out=str(tmp_path / out), reuse=(str(tmp_path / "s-old"),)),
              model, tok)

    with pytest.raises(CollmError, match="another expert or dtype"):
        run(expert="other", out="s1")
    old.write_text(old.read_text() + json.dumps({"prompt": "1+1=?", "completion": "2"}) + "\n")
    with pytest.raises(CollmError, match="changed since it was scored"):
        run(out="s2")
    manifest = json.loads((tmp_path / "s-old" / "manifest.json").read_text())
    (tmp_path / "s-old" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CollmError, match="unfinished"):
        run(out="s3")
    with pytest.raises(CollmError, match="holds no scores"):
        score(ScoreConfig(expert="tiny", data=str(data), out=str(tmp_path / "s4"), reuse=(str(tmp_path / "none"),)),
              model, tok)
