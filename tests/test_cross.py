"""Collaboration across tokenizers (collm.backends.cross): the base writes in its character vocabulary, the expert
in a vocabulary with merges ("th", "12", " the", ...), other special tokens and another chat template.

The exactness properties: a head that never defers gives the base's own greedy text, one that always defers the
expert's own greedy text (as its own tokenizer writes it), and one tokenizer for both gives today's path token
for token; at every deferral the expert reads the text as its own tokenizer writes it.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import CHARS, VOCAB, make_llama, make_tokenizer, save_tiny
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from collm import CoLLM
from collm.backends import cross
from collm.backends.base import Columns
from collm.backends.cross import CrossExpert
from collm.backends.remote import RemoteExpert
from collm.core.head import DeferralHead
from collm.errors import CollmError

MERGES = [("t", "h"), ("th", "e"), (" ", "the"), ("1", "2"), ("e", "r"), (" ", "a"), ("a", "n"), ("an", "d"),
          (" ", "t"), ("i", "n"), ("in", "g"), (" ", "1"), ("o", "u"), ("e", "s"), (" ", "s")]
OTHER_SPECIALS = ["<unk>", "[BOS]", "[EOS]", "[PAD]", "[U]", "[A]"]
OTHER_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[U]{% else %}[A]{% endif %}"
                  "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[A]{% endif %}")


def make_other_tokenizer() -> PreTrainedTokenizerFast:
    """Merges over the same characters, other ids (specials first, characters reversed), another template."""
    tokens = OTHER_SPECIALS + CHARS[::-1] + ["".join(m) for m in MERGES]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=MERGES, unk_token="<unk>"))
    backend.add_special_tokens(OTHER_SPECIALS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token="<unk>")
    tok.chat_template = OTHER_TEMPLATE
    return tok


OTHER = make_other_tokenizer()
OTHER_VOCAB = len(OTHER)


def make_other_expert(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=OTHER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


PROMPTS = ["the cat and the 12 dogs", "Add 12 and 21", "sing"]


@pytest.fixture(scope="module")
def base_tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def pair_parts(base_tok):
    return make_llama(0), make_other_expert(1), base_tok


def cross_pair(parts, head: DeferralHead | None) -> CoLLM:
    base, expert, tok = parts
    return CoLLM(base, [CrossExpert(expert, OTHER, tok)], head, tok)


def constant(p: float) -> DeferralHead:
    return DeferralHead.constant(32, p, 1)


def test_the_second_tokenizer_really_differs(base_tok):
    assert OTHER_VOCAB != VOCAB
    assert len(OTHER("the 12 things")["input_ids"]) < len(base_tok("the 12 things")["input_ids"])


def test_a_head_that_never_defers_gives_the_base_s_own_text(pair_parts):
    base, _, tok = pair_parts
    out = cross_pair(pair_parts, constant(0.0)).generate(PROMPTS, max_new_tokens=24)
    alone = CoLLM(base, [], None, tok).generate(PROMPTS, max_new_tokens=24, mode="base")
    assert out.token_ids == alone.token_ids and out.texts == alone.texts
    assert out.stats["expert_calls"] == 0


@pytest.mark.parametrize("how", ["head", "mode"])
def test_a_head_that_always_defers_gives_the_expert_s_own_text(pair_parts, how):
    base, expert, tok = pair_parts
    pair = cross_pair(pair_parts, constant(1.0) if how == "head" else None)
    out = pair.generate(PROMPTS, max_new_tokens=40, **({"mode": "expert"} if how == "mode" else {}))
    own = CoLLM(expert, [], None, OTHER).generate(PROMPTS, max_new_tokens=60, mode="base")
    for row, (text, reference) in enumerate(zip(out.texts, own.texts)):
        assert reference.startswith(text), row
        assert out.stopped_by[row] is None
        if len(out.token_ids[row]) < 40:  # it ended: the expert's EOS became the base's
            assert text == reference
    assert all(s == 1 for sources in out.sources for s in sources)
    # one expert call per expert token, not per base token: its tokens hold several characters
    own = [len(OTHER(t, add_special_tokens=False)["input_ids"]) for t in out.texts]
    # one forward pass per token the expert writes, the rows that write in one step sharing it (special tokens
    # without text and the EOS take a pass too)
    assert max(own) <= out.stats["cross_forwards"] < sum(own) < sum(len(ids) for ids in out.token_ids)


def test_one_tokenizer_for_both_is_today_s_path_token_for_token(pair_parts):
    base, _, tok = pair_parts
    expert = make_llama(1)
    torch.manual_seed(3)
    head = DeferralHead(32, 1)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    today = CoLLM(base, [expert], head, tok).generate(PROMPTS, max_new_tokens=30, threshold=0.5)
    crossed = CoLLM(base, [CrossExpert(expert, tok, tok)], head, tok).generate(PROMPTS, max_new_tokens=30,
                                                                                 threshold=0.5)
    assert 0 < sum(map(sum, today.sources)) < sum(map(len, today.sources))  # the head mixes the two writers
    assert crossed.token_ids == today.token_ids and crossed.sources == today.sources


def _mixed_head() -> DeferralHead:
    torch.manual_seed(5)
    head = DeferralHead(32, 1)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    return head


def test_at_every_deferral_the_expert_reads_the_text_as_its_tokenizer_writes_it(pair_parts):
    """The backbone alone: the base's tokens arrive one at a time; at each read the expert's token is the one
    the expert picks from its own tokenization of the whole text, read from scratch."""
    base, expert, tok = pair_parts
    cross = CrossExpert(expert, OTHER, tok)
    backbone = cross.backbone()
    prompt = tok.apply_chat_template([{"role": "user", "content": "the 12 things"}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    written = "the 12 sing and the 1212 ant"
    asked = 0
    for i, char in enumerate(written):
        ids.append(tok.convert_tokens_to_ids(char))
        if i % 3:
            continue
        cols = Columns(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                       torch.arange(len(ids))[None])
        token = int(backbone.read(cols, len(ids), rows=[0]).tokens[0])
        text, _ = cross.chat(tok.decode(ids, skip_special_tokens=False))
        scratch = OTHER(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            best = int(expert(torch.tensor([scratch])).logits[0, -1].argmax())
        first = OTHER.decode([best])
        assert tok.decode([token]) == (first[:1] if best != 2 else "</s>"), (i, text)
        # the expert's cache holds exactly its tokens of the text
        assert backbone.rows[0].ids == scratch
        asked += 1
        ids.pop()  # the base writes on instead: its own character
        ids.append(tok.convert_tokens_to_ids(char))
    assert asked > 5 and backbone.windows > 0 and backbone.cutbacks > 0


def test_mixed_writers_keep_one_text_and_report_their_seams(pair_parts):
    out = cross_pair(pair_parts, _mixed_head()).generate(PROMPTS, max_new_tokens=40, threshold=0.5)
    _, _, tok = pair_parts
    for ids, text, sources in zip(out.token_ids, out.texts, out.sources):
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert 0 < sum(sources)
    assert any(0 in s and 1 in s for s in out.sources)
    assert out.stats["seam_windows"] > 0


def test_rows_that_join_later_get_what_they_get_alone(pair_parts):
    pair = cross_pair(pair_parts, _mixed_head())
    alone = [pair.generate(p, max_new_tokens=20, threshold=0.5).token_ids[0] for p in PROMPTS]
    engine = pair.engine()
    request = pair.request(max_new_tokens=20, threshold=0.5)
    got: dict[int, list[int]] = {}
    handles = [engine.add(pair.encode(PROMPTS[0])[0], request)]
    for _ in range(3):
        for e in engine.step():
            got.setdefault(e.row, []).append(e.token_id)
    handles += [engine.add(pair.encode(p)[0], request) for p in PROMPTS[1:]]
    while engine.active:
        for e in engine.step():
            got.setdefault(e.row, []).append(e.token_id)
    assert [got[h] for h in handles] == alone


def _joining(pair) -> tuple[list[list[int]], int, int]:
    """Rows join the first one after 3 and 8 of its tokens; their tokens, the widest the expert's matrix got,
    and how often it was compacted."""
    engine = pair.engine()
    request = pair.request(max_new_tokens=30, threshold=0.5)
    got: dict[int, list[int]] = {}
    handles = [engine.add(pair.encode(PROMPTS[0])[0], request)]
    width = compactions = 0
    while engine.active:
        if len(handles) < len(PROMPTS) and len(got.get(handles[0], [])) in (3, 8):
            handles.append(engine.add(pair.encode(PROMPTS[len(handles)])[0], request))
        for e in engine.step():
            got.setdefault(e.row, []).append(e.token_id)
        for backbone in engine.expert_backbones:
            width, compactions = max(width, backbone.cols.seq.shape[1]), max(compactions, backbone.compactions)
    return [got[h] for h in handles], width, compactions


@pytest.mark.parametrize("at", [1, 6])
def test_compacting_the_expert_s_matrix_changes_no_token(pair_parts, monkeypatch, at):
    """Every forward widens the expert's matrix for every row; compacting it (each row's columns right-aligned,
    its cache entries with them) keeps every token and writer, with rows joining and leaving."""
    pair = cross_pair(pair_parts, _mixed_head())
    monkeypatch.setattr(cross, "COMPACT_AT", 10**9)
    loose = pair.generate(PROMPTS, max_new_tokens=40, threshold=0.5)
    joined, loose_width, none = _joining(pair)
    monkeypatch.setattr(cross, "COMPACT_AT", at)
    tight = pair.generate(PROMPTS, max_new_tokens=40, threshold=0.5)
    assert tight.token_ids == loose.token_ids and tight.sources == loose.sources
    tokens, width, compactions = _joining(pair)
    assert tokens == joined and none == 0 < compactions and width < loose_width


def test_reading_only_the_rows_with_new_tokens_changes_no_token(pair_parts, monkeypatch):
    """Where only some rows of a batch have new tokens for the expert, its forward runs over those rows alone
    (HFBackbone.read_rows); every token and writer is the all-rows forward's, with rows joining and leaving."""
    pair = cross_pair(pair_parts, _mixed_head())
    split = pair.generate(PROMPTS, max_new_tokens=40, threshold=0.5)
    joined, _, _ = _joining(pair)
    reads = []
    original = cross.CrossBackbone._place

    def counted(self, wants):
        original(self, wants)
        reads.append(self.subset_forwards)
    monkeypatch.setattr(cross.CrossBackbone, "_place", counted)
    pair.generate(PROMPTS, max_new_tokens=40, threshold=0.5)
    assert max(reads) > 0  # some forwards did read a subset of the rows
    pair.experts[0].row_reads = False
    reads.clear()
    whole = pair.generate(PROMPTS, max_new_tokens=40, threshold=0.5)
    assert max(reads) == 0  # every forward over all rows
    assert split.token_ids == whole.token_ids and split.sources == whole.sources
    assert _joining(pair)[0] == joined


def test_sampling_across_tokenizers_is_seeded(pair_parts):
    pair = cross_pair(pair_parts, constant(1.0))
    a = pair.generate(PROMPTS, max_new_tokens=20, do_sample=True, temperature=1.0, seed=4)
    b = pair.generate(PROMPTS, max_new_tokens=20, do_sample=True, temperature=1.0, seed=4)
    c = pair.generate(PROMPTS, max_new_tokens=20, do_sample=True, temperature=1.0, seed=5)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


@pytest.mark.parametrize("options", [{"lookahead": 4}, {"rewind": 0.1}, {"mode": "compose"}])
def test_what_needs_one_tokenizer_is_refused_in_one_line(pair_parts, options):
    with pytest.raises(CollmError) as err:
        cross_pair(pair_parts, constant(1.0)).generate(PROMPTS[:1], max_new_tokens=4, **options)
    assert "\n" not in str(err.value)


def test_loading_models_with_two_tokenizers_pairs_them_through_the_text(tmp_path, base_tok):
    base = save_tiny(make_llama(0), base_tok, tmp_path / "base")
    expert = save_tiny(make_other_expert(1), OTHER, tmp_path / "expert")
    pair = CoLLM.load(base, [expert], head="always")
    assert isinstance(pair.experts[0], CrossExpert)
    out = pair.generate("the 12 things", max_new_tokens=12)
    assert out.texts[0] and all(s == 1 for s in out.sources[0])


# ---------------------------------------------------------------- scoring across tokenizers


def test_a_seam_token_s_log_probability_is_split_by_its_characters():
    from collm.training.align import weights

    # base "ab|cd|<end>", expert "abc|d|<end, end>": "abc" straddles the base's boundary
    w = weights([(0, 2), (2, 4), (4, 5)], [(0, 3), (3, 4), (4, 6)], shared=4)
    want = torch.tensor([[2 / 3, 0, 0], [1 / 3, 1, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(w, want)
    assert torch.allclose(w.sum(0), torch.ones(3, dtype=torch.float64))


def test_one_tokenizer_aligns_token_for_token(base_tok):
    from collm.data.rows import DataConfig
    from collm.training.align import align_row

    aligned = align_row({"prompt": "Add 12 and 21", "completion": "the 33 things"}, base_tok, base_tok, DataConfig())
    assert torch.equal(aligned.weights, torch.eye(aligned.weights.shape[0]))


def _write_rows(path):
    import json

    rows = [{"prompt": f"Add {a} and {b}", "completion": f"the {a + b} things and {a}"}
            for a, b in [(12, 21), (3, 40), (7, 7), (120, 1)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_across_tokenizers_keep_each_row_s_probability_and_train(tmp_path, base_tok):
    from conftest import invoke

    from collm.data.rows import DataConfig, encode_file
    from collm.training.align import align_file
    from collm.training.score import ScoreConfig, load_scores, score

    data = _write_rows(tmp_path / "rows.jsonl")
    base_dir = save_tiny(make_llama(0), base_tok, tmp_path / "base")
    expert = make_other_expert(1)
    config = ScoreConfig(expert="other", data=str(data), out=str(tmp_path / "scores"), tokenizer=base_dir,
                         batch_tokens=64, shard_rows=2)
    score(config, expert, OTHER)
    encoded = encode_file(data, base_tok, config.data_config())
    scores = load_scores(tmp_path / "scores", encoded)
    for i, aligned in enumerate(align_file(data, base_tok, OTHER, DataConfig())):
        ids = torch.tensor([aligned.example.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(expert(ids).logits[0, :-1].float(), -1)
        targets = torch.tensor(aligned.example.completion_mask[1:])
        own = logp[targets].gather(-1, ids[0, 1:][targets][:, None]).sum()
        got = scores.gold_logp[scores.offsets[i]: scores.offsets[i + 1]]
        assert len(got) == encoded.examples[i].num_targets  # one score per base target
        assert torch.allclose(got.sum(), own, atol=1e-3)  # the expert's probability of the whole completion
    expert_dir = save_tiny(expert, OTHER, tmp_path / "expert")
    invoke("train", "--base", base_dir, "--data", str(data), "--scores", str(tmp_path / "scores"),
           "--out", str(tmp_path / "run"), "--base-mode", "frozen", "--max-steps", "3", "--batch-size", "2")
    pair = CoLLM.load(base_dir, [expert_dir], str(tmp_path / "run" / "head.safetensors"), threshold=0.5)
    assert isinstance(pair.experts[0], CrossExpert)
    assert pair.generate("Add 3 and 4", max_new_tokens=8).texts[0] is not None


def test_the_server_serves_a_pair_of_two_tokenizers(pair_parts):
    import openai
    from serve_live import live

    from collm.serve.app import build_app
    from collm.serve.serving import ServeConfig

    pair = cross_pair(pair_parts, _mixed_head())
    want = pair.generate(["the cat and"], max_new_tokens=24, threshold=0.5, chat=False)
    assert 0 < sum(want.sources[0]) < len(want.sources[0])
    with live(build_app(pair, ServeConfig(model_name="tiny", max_tokens=64))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model="tiny", prompt="the cat and", max_tokens=24, temperature=0,
                                        extra_body={"threshold": 0.5})
        assert got.choices[0].text == want.texts[0]
        chunks = list(client.completions.create(model="tiny", prompt="the cat and", max_tokens=24, temperature=0,
                                                stream=True, extra_body={"threshold": 0.5}))
        assert "".join(c.choices[0].text for c in chunks) == want.texts[0]
        chat = pair.generate(["Add 12 and 21"], max_new_tokens=16, mode="expert")
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add 12 and 21"}],
                                                max_tokens=16, temperature=0, extra_body={"mode": "expert"})
        assert answer.choices[0].message.content == chat.texts[0]


def _served(handler) -> RemoteExpert:
    """A RemoteExpert talking to ``handler`` (an httpx mock of the server's /tokenize and /detokenize)."""
    expert = RemoteExpert.__new__(RemoteExpert)
    expert.url, expert.root, expert.model = "http://served/v1", "http://served", "m"
    expert.timeout, expert.retry = 5.0, 0.0
    expert.client = httpx.Client(transport=httpx.MockTransport(handler))
    return expert


def test_served_chat_turn_none_only_without_a_template():
    """A served expert's chat template is read through /tokenize: HTTP 400 (vLLM's answer for a model without a
    template) means no template; any other refusal (a wrong path, an auth error) is an error, not 'no template'."""
    def answer(status):
        def handler(request):
            if request.url.path == "/tokenize":
                return httpx.Response(status, json={"tokens": [1, 2]} if status == 200 else {"message": "no"})
            return httpx.Response(200, json={"prompt": "<u>@@</u><a>"})
        return handler

    assert _served(answer(200)).chat_turn("@@") == "<u>@@</u><a>"
    assert _served(answer(400)).chat_turn("@@") is None
    with pytest.raises(CollmError, match="HTTP 404"):
        _served(answer(404)).chat_turn("@@")
