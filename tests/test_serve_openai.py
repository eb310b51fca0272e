"""The official `openai` client against a live `collm serve` app on loopback: completions and chat, streamed
and not; greedy text equals `CoLLM.generate`'s; provenance is present and aligned with the tokens."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from serve_live import live, tiny_pair

from collm.serve.app import build_app
from collm.serve.serving import ServeConfig

PROMPT = "Tell me a story"


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def url(pair):
    with live(build_app(pair, ServeConfig(model_name="tiny", max_tokens=64))) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _check_provenance(text: str, provenance, completion_tokens: int) -> None:
    assert len(provenance) == completion_tokens
    assert "".join(t["text"] for t in provenance) == text
    assert all(t["source"] in (0, 1) and 0 <= t["defer_prob"] <= 1 for t in provenance)


def _dicts(items) -> list[dict]:
    return [t if isinstance(t, dict) else t.model_dump() for t in items]


def test_completion_greedy_equals_generate_streamed_or_not(pair, client):
    want = pair.generate([PROMPT], max_new_tokens=24, threshold=0.5, chat=False)
    assert 0 < sum(want.sources[0]) < len(want.sources[0]), "the head should route some tokens each way"
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                    extra_body={"threshold": 0.5})
    choice = got.choices[0]
    assert choice.text == want.texts[0]
    provenance = _dicts(choice.provenance)
    _check_provenance(choice.text, provenance, got.usage.completion_tokens)
    assert [t["token_id"] for t in provenance] == want.token_ids[0]
    assert [t["source"] for t in provenance] == want.sources[0]
    assert [t["defer_prob"] for t in provenance] == pytest.approx(want.defer_probs[0], abs=1e-6)

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, extra_body={"threshold": 0.5}))
    assert "".join(c.choices[0].text for c in chunks) == want.texts[0]
    streamed = [t for c in chunks for t in _dicts(c.choices[0].provenance)]
    assert streamed == provenance
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason == "length"


def test_chat_greedy_equals_generate_streamed_or_not(pair, client):
    want = pair.generate([PROMPT], max_new_tokens=20, threshold=0.5)  # chat template, as the chat endpoint
    messages = [{"role": "user", "content": PROMPT}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20, temperature=0)
    assert got.choices[0].message.content == want.texts[0]
    provenance = _dicts(got.choices[0].provenance)
    _check_provenance(want.texts[0], provenance, got.usage.completion_tokens)
    assert [t["source"] for t in provenance] == want.sources[0]

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.texts[0]
    assert [t for c in chunks if c.choices for t in _dicts(getattr(c.choices[0], "provenance", None) or [])] \
        == provenance
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == len(provenance)
    assert usage.expert_tokens == sum(want.sources[0])
    assert usage.defer_rate == pytest.approx(sum(want.sources[0]) / len(want.sources[0]))


def test_usage_counts_the_experts_tokens(client):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    sources = [t["source"] for t in _dicts(got.choices[0].provenance)]
    assert got.usage.expert_tokens == sum(sources)
    assert got.usage.defer_rate == pytest.approx(sum(sources) / len(sources))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


@pytest.mark.parametrize("extra, writer", [({"mode": "base"}, 0), ({"mode": "expert"}, 1),
                                           ({"threshold": 1.0}, 0), ({"threshold": 0.0}, 1)])
def test_threshold_and_mode_choose_the_writer(client, extra, writer):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
    assert {t["source"] for t in _dicts(got.choices[0].provenance)} == {writer}


def test_token_ids_and_several_prompts(pair, client):
    ids = pair.encode(["ab", "xyz q"], chat=False)
    want = pair.generate(ids, max_new_tokens=10, threshold=0.5)
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == want.texts
    assert got.usage.prompt_tokens == sum(map(len, ids))
    chunks = list(client.completions.create(model="tiny", prompt=ids[1], max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.texts[1]


def test_stop_string_ends_the_text_before_it(pair, client):
    full = pair.generate([PROMPT], max_new_tokens=24, threshold=0.5, chat=False).texts[0]
    stop = full[5:7]
    want = pair.generate([PROMPT], max_new_tokens=24, threshold=0.5, chat=False, stop=[stop])
    for stream in (False, True):
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                        stream=stream)
        chunks = list(got) if stream else [got]
        assert "".join(c.choices[0].text for c in chunks) == want.texts[0] == full[: full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95,
                                         seed=seed).choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_models_health_and_sse_framing(url, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["experts"] == ["tiny-1"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-7")
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3,
                                                             "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_a_request_joining_a_running_one_gets_what_it_gets_alone(pair):
    """The real engine: B joins while A decodes; both equal generate alone; A's client then leaves early and
    its row is dropped (the engine goes idle long before A's 400 tokens)."""
    want_b = pair.generate(["xyz"], max_new_tokens=30, threshold=0.5, chat=False)
    want_a = pair.generate([PROMPT], max_new_tokens=40, threshold=0.5, chat=False)
    app = build_app(pair, ServeConfig(model_name="tiny", max_tokens=400))
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        a = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                      extra_body={"threshold": 0.5})
        a_chunks = iter(a)
        a_text = "".join(next(a_chunks).choices[0].text for _ in range(3))
        b = client.completions.create(model="tiny", prompt="xyz", max_tokens=30, temperature=0,
                                      extra_body={"threshold": 0.5})
        assert b.choices[0].text == want_b.texts[0]
        assert [t["source"] for t in _dicts(b.choices[0].provenance)] == want_b.sources[0]
        a_text += "".join(next(a_chunks).choices[0].text for _ in range(37))
        assert a_text == want_a.texts[0]
        a.close()
        active = None
        for _ in range(100):
            active = httpx.get(f"{url}/health").json()["active_rows"]
            if active == 0:
                break
            time.sleep(0.05)
        engine = app.state.serving.scheduler.engine
        assert active == 0 and engine.stats.steps < 200, "A was dropped, not decoded to its end"
        for _ in range(100):  # and once idle, the engine holds no rows (their caches are freed)
            if not engine.rows:
                break
            time.sleep(0.05)
        assert not engine.rows


def test_finished_rows_leave_the_engine_when_it_goes_idle(pair):
    app = build_app(pair, ServeConfig(model_name="tiny"))
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
        engine = app.state.serving.scheduler.engine
        for _ in range(100):
            if not engine.rows:
                break
            time.sleep(0.05)
        assert not engine.rows and engine.cols is None  # caches and token matrix released


def test_drafting_per_request_and_as_the_server_default(pair):
    """lookahead in extra_body, and a server whose default drafts: greedy text and writers are those of the engine
    without drafting, streamed or not, with another request joining while the first drafts; the engine checked
    drafts (fewer expert reads than deferrals)."""
    want = pair.generate([PROMPT, "xyz"], max_new_tokens=30, threshold=0.5, chat=False)
    app = build_app(pair, ServeConfig(model_name="tiny", lookahead=4))
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        a = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                      extra_body={"threshold": 0.5})
        chunks = iter(a)
        text = next(chunks).choices[0].text
        b = client.completions.create(model="tiny", prompt="xyz", max_tokens=30, temperature=0,
                                      extra_body={"threshold": 0.5, "lookahead": 6})
        text += "".join(c.choices[0].text for c in chunks)
        assert text == want.texts[0] and b.choices[0].text == want.texts[1]
        assert [t["source"] for t in _dicts(b.choices[0].provenance)] == want.sources[1]
        stats = app.state.serving.scheduler.engine.stats
        assert stats.drafted > 0 and stats.expert_calls < stats.checked
        bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "lookahead": 0})
        assert bad.status_code == 400 and "lookahead" in bad.text
