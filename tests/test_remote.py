"""A remote expert against a REAL vLLM server (its CPU build, started on loopback once for this module).

The expert is the real SmolLM2-135M-Instruct (dequantised float32) served by vLLM and, for the references, the
same weights in process. The module is skipped, saying why, only where the vLLM environment is missing
(scripts/install_vllm.sh makes it; .ci/run installs it). The server-killing test runs last: it ends the server.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import make_llama, make_tokenizer, save_tiny
from transformers import LlamaConfig, LlamaForCausalLM
from vllm_server import VllmServer, vllm_python

from collm.backends.base import Columns
from collm.backends.cross import RemoteTextExpert
from collm.backends.models import EMBEDDED_DEFAULT, hf_folder, load_model
from collm.backends.remote import RemoteExpert, is_remote_spec, parse_spec
from collm.core.head import DeferralHead
from collm.core.request import Sampling
from collm.data.rows import encode_file
from collm.errors import CollmError
from collm.pair import CoLLM, read_run_config
from collm.training.score import ScoreConfig, load_scores, score

pytestmark = pytest.mark.skipif(vllm_python() is None,
                                reason="no vLLM environment (.venv-vllm): run scripts/install_vllm.sh")


@pytest.fixture(scope="module")
def server():
    with VllmServer(hf_folder(EMBEDDED_DEFAULT), "smol", eager=True) as running:
        yield running


@pytest.fixture(scope="module")
def smol():
    return load_model(EMBEDDED_DEFAULT, dtype="float32")


@pytest.fixture(scope="module")
def expert(server, smol):
    return RemoteExpert(server.spec, smol[1])


def columns(rows: list[list[int]], pad: int = 0) -> Columns:
    """Left-padded token matrix, as the engine lays it out."""
    width = max(map(len, rows))
    seq = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(seq)
    for r, ids in enumerate(rows):
        seq[r, width - len(ids):] = torch.tensor(ids)
        mask[r, width - len(ids):] = 1
    return Columns(seq, mask, (mask.cumsum(1) - 1).clamp(min=0))


def prompt_ids(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def test_specs():
    assert is_remote_spec("http://gpu-box:8000/v1") and not is_remote_spec("runs/gsm")
    assert parse_spec("http://gpu-box:8000/v1/#llama") == ("http://gpu-box:8000/v1", "llama")
    with pytest.raises(CollmError, match="HOST:PORT"):
        parse_spec("http:///v1")


def test_unreachable_server_fails_with_the_url(smol, monkeypatch):
    monkeypatch.setenv("COLLM_REMOTE_RETRY", "1")
    from vllm_server import free_port
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(CollmError, match=f"cannot reach the expert server at {url}"):
        RemoteExpert(url, smol[1])
    assert time.monotonic() - started < 10


def test_vocabulary_checked_before_use(server, smol):
    with pytest.raises(CollmError, match="vocabularies differ: the base reads .* with token 0"):
        RemoteExpert(server.spec, make_tokenizer())
    with pytest.raises(CollmError, match="does not serve 'other'; it serves smol"):
        RemoteExpert(server.url + "#other", smol[1])
    assert RemoteExpert(server.url, smol[1]).model == "smol"  # the one model, found without naming it


def test_picks_equal_in_process_greedy(expert, smol):
    model, tok = smol
    rows = [prompt_ids(tok, "What is 2+3?"), prompt_ids(tok, "Name a colour of the sky at noon, please.")]
    cols = columns(rows, pad=tok.pad_token_id or 0)
    backbone = expert.backbone()
    out = backbone.read(cols, cols.seq.shape[1], rows=[0, 1], sampling=[Sampling()] * 2)
    want = [int(model(torch.tensor([r])).logits[0, -1].argmax()) for r in rows]
    assert out.tokens.tolist() == want and out.logits is None and backbone.seen == cols.seq.shape[1]
    only_second = backbone.fresh().read(cols, cols.seq.shape[1], rows=[1], sampling=[Sampling()] * 2)
    assert only_second.tokens.tolist() == [-1, want[1]]


def test_sampling_is_seeded(expert, smol):
    cols = columns([prompt_ids(smol[1], "Tell me a word.")])
    hot = [Sampling(do_sample=True, temperature=1.5, seed=7)]
    picks = {int(expert.backbone().read(cols, cols.seq.shape[1], sampling=hot, step=3).tokens[0]) for _ in range(3)}
    assert len(picks) == 1


def write_rows(path, n=4):
    rows = [{"prompt": f"What is {a} plus {a + 3}?", "completion": f"{a} plus {a + 3} is {2 * a + 3}."}
            for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_remote_scoring_equals_local_scoring(server, tmp_path):
    data = write_rows(tmp_path / "d.jsonl")
    local = ScoreConfig(expert=EMBEDDED_DEFAULT, data=str(data), out=str(tmp_path / "local"), shard_rows=3)
    remote = ScoreConfig(expert=server.spec, data=str(data), out=str(tmp_path / "remote"), shard_rows=3,
                         tokenizer=EMBEDDED_DEFAULT)
    score(local)
    score(remote)
    encoded = encode_file(data, load_model(EMBEDDED_DEFAULT)[1], local.data_config())
    a, b = load_scores(tmp_path / "local", encoded), load_scores(tmp_path / "remote", encoded)
    assert torch.equal(a.offsets, b.offsets) and a.gold_logp.numel() > 20
    assert (a.gold_logp - b.gold_logp).abs().max() < 1e-3
    assert torch.equal(a.argmax_gold, b.argmax_gold)
    manifests = [json.loads((tmp_path / f / "manifest.json").read_text()) for f in ("local", "remote")]
    assert manifests[0].keys() == manifests[1].keys() and manifests[1]["complete"]
    assert manifests[0]["key"]["data"] == manifests[1]["key"]["data"]
    assert manifests[0]["key"]["expert"] != manifests[1]["key"]["expert"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "remote").iterdir()}
    score(remote)  # finished: resuming recomputes nothing and rewrites the same bytes
    assert {p.name: p.read_bytes() for p in (tmp_path / "remote").iterdir()} == before


def test_score_cli_takes_a_server(server, tmp_path):
    from typer.testing import CliRunner

    from collm.cli import app

    data = write_rows(tmp_path / "d.jsonl", n=2)
    result = CliRunner().invoke(app, ["score", "--expert", server.spec, "--tokenizer", EMBEDDED_DEFAULT,
                                      "--data", str(data), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["expert"] == server.spec


def test_remote_scoring_needs_the_base_tokenizer(server, tmp_path):
    config = ScoreConfig(expert=server.spec, data=str(write_rows(tmp_path / "d.jsonl")), out=str(tmp_path / "s"))
    with pytest.raises(CollmError, match="needs --tokenizer"):
        score(config)
    other = save_tiny(make_llama(0), make_tokenizer(), tmp_path / "chars")
    with pytest.raises(CollmError, match="vocabularies differ.*give the expert as a model folder"):
        score(ScoreConfig(expert=server.spec, tokenizer=str(other), data=config.data, out=str(tmp_path / "t")))


def tiny_base(tokenizer, folder=None):
    """A small random base over SmolLM2's vocabulary: it and the expert disagree, so routing shows."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model


def test_load_and_run_folders_accept_a_remote_expert(server, smol, tmp_path):
    tiny_base(smol[1], tmp_path / "base")
    pair = CoLLM.load(str(tmp_path / "base"), [server.spec], head="always")
    assert isinstance(pair.experts[0], RemoteExpert) and pair.vocab == len(smol[1])
    pair.save_pretrained(tmp_path / "run")
    assert read_run_config(tmp_path / "run")["experts"] == [server.spec]
    again = CoLLM.from_pretrained(tmp_path / "run")
    assert isinstance(again.experts[0], RemoteExpert) and again.experts[0].model == "smol"


@pytest.mark.parametrize("threshold", [0.0, 0.45, 0.5, 0.55, 1.0])
def test_collm_with_remote_expert_equals_in_process(expert, smol, threshold):
    model, tok = smol
    base = tiny_base(tok)
    torch.manual_seed(1)
    head = DeferralHead(base.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    prompts = ["What is 2+3?", "Write one short sentence about the sea."]
    local = CoLLM(base, [model], head, tok).generate(prompts, max_new_tokens=12, threshold=threshold)
    remote = CoLLM(base, [expert], head, tok).generate(prompts, max_new_tokens=12, threshold=threshold)
    assert remote.token_ids == local.token_ids
    assert remote.sources == local.sources
    if threshold == 0.0:
        assert all(s == [1] * len(s) for s in remote.sources)


@pytest.mark.parametrize("lookahead", [4, 8])
def test_drafts_are_checked_on_the_server(expert, smol, lookahead):
    """Greedy drafting past deferrals with a served expert: one request (prompt_logprobs) checks every row's
    draft; the tokens and writers are those of one request per deferral, with fewer requests. Mode expert with
    lookahead: speculative decoding against the server, the expert's own answer."""
    model, tok = smol
    base = tiny_base(tok)
    torch.manual_seed(1)
    head = DeferralHead(base.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    prompts = ["What is 2+3?", "Write one short sentence about the sea."]
    pair = CoLLM(base, [expert], head, tok)
    plain = pair.generate(prompts, max_new_tokens=16, threshold=0.5)
    drafted = pair.generate(prompts, max_new_tokens=16, threshold=0.5, lookahead=lookahead)
    assert (drafted.token_ids, drafted.sources) == (plain.token_ids, plain.sources)
    assert drafted.stats["drafted"] > 0 and drafted.stats["expert_calls"] < plain.stats["expert_calls"]
    alone = CoLLM(base, [model], None, tok).generate(prompts, max_new_tokens=12, mode="expert")
    spec = pair.generate(prompts, max_new_tokens=12, mode="expert", lookahead=lookahead)
    assert spec.token_ids == alone.token_ids and all(set(s) == {1} for s in spec.sources)


def test_expert_alone_through_the_server(expert, smol):
    """The baseline eval and calibrate run (mode expert) works with a remote expert, token for token."""
    model, tok = smol
    base = tiny_base(tok)
    prompts = ["What is 2+3?", "Name a fruit."]
    local = CoLLM(base, [model], None, tok).generate(prompts, max_new_tokens=8, mode="expert")
    remote = CoLLM(base, [expert], None, tok).generate(prompts, max_new_tokens=8, mode="expert")
    assert remote.token_ids == local.token_ids
    assert all(set(s) == {1} for s in remote.sources)


def test_bench_times_a_remote_expert(server, smol, tmp_path):
    from collm.evaluation.bench import BenchConfig, run

    tiny_base(smol[1], tmp_path / "base")
    with pytest.raises(CollmError, match="need the expert in process"):
        BenchConfig(base=str(tmp_path / "base"), expert=server.spec)
    config = BenchConfig(base=str(tmp_path / "base"), expert=server.spec, systems=("base", "expert", "collm"),
                         fractions=(0.5,), prompt_len=8, new_tokens=3, repeats=1)
    rows = {r.system: r for r in run(config)}
    assert set(rows) == {"base", "expert", "collm"} and rows["collm"].expert_calls > 0


def test_generate_cli_takes_a_server(server, smol, tmp_path):
    from typer.testing import CliRunner

    from collm.cli import app

    tiny_base(smol[1], tmp_path / "base")
    result = CliRunner().invoke(app, ["generate", "--base", str(tmp_path / "base"), "--expert", server.spec,
                                      "--head", "always", "--threshold", "0", "--max-new-tokens", "4", "--json",
                                      "What is 2+3?"])
    assert result.exit_code == 0, result.output
    sources = json.loads(result.output.strip().splitlines()[-1])["sources"][0]
    assert sources and set(sources) == {1}


TEXT_PROMPTS = ["Name three colours.", "What is 12 plus 30? Answer in one sentence."]


def test_a_served_expert_with_another_tokenizer_writes_through_the_text(server, smol):
    """A base with a character vocabulary and the served SmolLM2: a head that always defers gives SmolLM2's
    own greedy text (its template, its tokens, read by the server from the text), one request per expert token
    (not per base token); one that never defers gives the base's and asks nothing."""
    model, tok = smol
    chars = make_tokenizer()
    served = RemoteTextExpert(RemoteExpert(server.spec, chars, check=False), chars)
    base = make_llama(0)
    always = CoLLM(base, [served], DeferralHead.constant(32, 1.0, 1), chars)
    out = always.generate(TEXT_PROMPTS, max_new_tokens=40)
    own = CoLLM(model, [], None, tok).generate(TEXT_PROMPTS, max_new_tokens=40, mode="base")
    for ids, text, reference in zip(out.token_ids, out.texts, own.texts):
        assert len(text) > 10 and reference.startswith(text), (text, reference)
        assert len(ids) == 40 or text == reference  # it ended where SmolLM2 ends: its EOS became the base's
    assert all(s == [1] * len(s) for s in out.sources)
    assert out.stats["cross_forwards"] < sum(map(len, out.token_ids))  # an expert token holds several characters
    assert always.generate(TEXT_PROMPTS, max_new_tokens=40, mode="expert").texts == out.texts
    never = CoLLM(base, [served], DeferralHead.constant(32, 0.0, 1), chars).generate(TEXT_PROMPTS, max_new_tokens=20)
    alone = CoLLM(base, [], None, chars).generate(TEXT_PROMPTS, max_new_tokens=20, mode="base")
    assert never.token_ids == alone.token_ids and never.stats["expert_calls"] == 0
    with pytest.raises(CollmError, match="lookahead and rewinds need an expert that shares"):
        always.generate(TEXT_PROMPTS[:1], max_new_tokens=4, lookahead=4)


def test_load_pairs_a_served_expert_of_another_vocabulary_through_the_text(server, tmp_path):
    folder = save_tiny(make_llama(0), make_tokenizer(), tmp_path / "base")
    pair = CoLLM.load(folder, [server.spec], "always")
    assert isinstance(pair.experts[0], RemoteTextExpert)
    torch.manual_seed(2)
    mixed = DeferralHead(32, 1)
    torch.nn.init.normal_(mixed.linear.weight, std=0.5)
    pair.head = mixed
    out = pair.generate(TEXT_PROMPTS, max_new_tokens=30, threshold=0.5)
    for ids, text, sources in zip(out.token_ids, out.texts, out.sources):
        assert pair.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert any(0 in s and 1 in s for s in out.sources)  # both write


def test_killed_server_fails_promptly_with_the_url(server, smol, monkeypatch):
    """Runs last: kills the module's server while Co-LLM is writing with it (every token deferred)."""
    monkeypatch.setenv("COLLM_REMOTE_RETRY", "2")
    model, tok = smol
    base = tiny_base(tok)
    pair = CoLLM(base, [RemoteExpert(server.spec, tok)], DeferralHead.constant(base.config.hidden_size, 1.0), tok)
    written, errors, finished = [], [], []

    def write():
        try:
            for events in pair.stream(["Count from one to a thousand."], max_new_tokens=1500, threshold=0.0):
                written.extend(events)
        except Exception as e:  # noqa: BLE001 - the test inspects whatever came out
            errors.append(e)
        finished.append(time.monotonic())

    worker = threading.Thread(target=write, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while len(written) < 3 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(written) >= 3 and all(e.source == 1 for e in written), "the expert was not writing"
    killed = time.monotonic()
    server.kill()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the client hung after the server died"
    assert len(errors) == 1 and isinstance(errors[0], CollmError), errors
    assert server.url in str(errors[0]) and "\n" not in str(errors[0])
    assert finished[0] - killed < 15, f"took {finished[0] - killed:.1f}s after the kill"
