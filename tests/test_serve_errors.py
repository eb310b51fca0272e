"""Bad requests get an OpenAI error object with a 4xx status and a message, and the server keeps serving;
schemathesis, driven by the server's own OpenAPI schema, finds no 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from serve_live import live, tiny_pair

from collm.serve.app import build_app
from collm.serve.serving import ServeConfig

LIMITS = ServeConfig(model_name="tiny", max_prompt_tokens=300, max_tokens=32, max_body_bytes=4096)
GOOD = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def url():
    with live(build_app(tiny_pair(), LIMITS)) as url:
        yield url


def _post(url, path, body, headers=None, **kwargs):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers=headers or {"content-type": "application/json"},
                      timeout=60, **kwargs)


BAD = [
    ("max_tokens zero", "/v1/completions", GOOD | {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("max_tokens over the limit", "/v1/completions", GOOD | {"max_tokens": 33}, 400, "at most 32"),
    ("prompt over the server's limit", "/v1/completions", GOOD | {"prompt": [7] * 301}, 400, "at most 300"),
    ("wrong type", "/v1/completions", GOOD | {"temperature": "hot"}, 400, "temperature"),
    ("prompt wrong type", "/v1/completions", GOOD | {"prompt": {"a": 1}}, 400, "prompt"),
    ("token id outside the vocabulary", "/v1/completions", GOOD | {"prompt": [10**6]}, 400, "vocabulary"),
    ("empty prompt", "/v1/completions", GOOD | {"prompt": "  "}, 400, "empty"),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("unknown model", "/v1/completions", GOOD | {"model": "gpt-7"}, 404, "gpt-7"),
    ("n other than 1", "/v1/completions", GOOD | {"n": 2}, 400, "n other than 1"),
    ("unsupported option", "/v1/completions", GOOD | {"logprobs": 3}, 400, "logprobs"),
    ("unsupported penalty", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1.0},
     400, "presence_penalty"),
    ("tools", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown field", "/v1/completions", GOOD | {"temprature": 0.5}, 400, "temprature"),
    ("threshold outside [0, 1]", "/v1/completions", GOOD | {"threshold": 1.5}, 400, "threshold"),
    ("unknown mode", "/v1/completions", GOOD | {"mode": "compose"}, 400, "mode"),
    ("seed negative", "/v1/completions", GOOD | {"seed": -1}, 400, "seed"),
    ("too many stops", "/v1/completions", GOOD | {"stop": list("abcde")}, 400, "stop"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
     400, "role"),
    ("invalid JSON", "/v1/completions", '{"model": "tiny", "prompt": ', 400, "JSON"),
    ("lone surrogate in a prompt", "/v1/completions", '{"model": "tiny", "prompt": "\\ud800 hi"}', 400, "surrogate"),
    ("lone surrogate in a streamed prompt", "/v1/completions",
     '{"model": "tiny", "prompt": "\\udfff", "stream": true}', 400, "surrogate"),
    ("lone surrogate in a chat message", "/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 hi"}]}', 400, "surrogate"),
    ("lone surrogate in a streamed chat part", "/v1/chat/completions",
     '{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\ud83d"}]}]}', 400, "surrogate"),
    ("lone surrogate in a stop string", "/v1/completions", '{"model": "tiny", "prompt": "a", "stop": ["\\udc80"]}',
     400, "surrogate"),
    ("body not UTF-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not UTF-8"),
    ("threshold NaN", "/v1/completions", '{"model": "tiny", "prompt": "a", "threshold": NaN}', 400, "finite"),
    ("temperature Infinity", "/v1/completions", '{"model": "tiny", "prompt": "a", "temperature": Infinity}', 400,
     "finite"),
    ("not an object", "/v1/completions", "[1, 2]", 400, ""),
    ("oversized body", "/v1/completions", GOOD | {"prompt": "x" * 5000}, 413, "limit"),
]


PARAMS = {"lone surrogate in a prompt": "prompt", "lone surrogate in a streamed prompt": "prompt",
          "lone surrogate in a chat message": "messages", "lone surrogate in a streamed chat part": "messages",
          "lone surrogate in a stop string": "stop", "threshold NaN": "threshold",
          "temperature Infinity": "temperature"}


@pytest.mark.parametrize("name, path, body, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_4xx_error_object_and_the_server_keeps_serving(url, name, path, body, status, words):
    r = _post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and words.lower() in error["message"].lower()
    if name in PARAMS:
        assert error["param"] == PARAMS[name]
    assert _post(url, "/v1/completions", GOOD).status_code == 200


def _texts():
    from hypothesis import strategies as st

    # every code point, lone surrogates included (hypothesis leaves them out unless asked)
    return st.text(st.characters(codec=None, exclude_categories=()), max_size=12)


def _bodies():
    """Request bodies as a client could send them: JSON objects whose strings are arbitrary Unicode (lone
    surrogates reach the server as \\uXXXX escapes), and raw bytes that need not be UTF-8 at all."""
    from hypothesis import strategies as st

    text = _texts()
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                     "content": text | st.lists(st.fixed_dictionaries(
                                         {"type": st.just("text"), "text": text}), max_size=2)})
    common = {"model": st.just("tiny") | text, "max_tokens": st.integers(1, 4), "stream": st.booleans()}
    optional = {"stop": text | st.lists(text, max_size=3), "user": text, "threshold": st.floats(allow_nan=True)}
    completion = st.fixed_dictionaries({**common, "prompt": text | st.lists(text, min_size=1, max_size=2)},
                                       optional=optional)
    chat = st.fixed_dictionaries({**common, "messages": st.lists(message, min_size=1, max_size=2)}, optional=optional)
    as_json = st.one_of(completion.map(lambda b: ("/v1/completions", b)),
                        chat.map(lambda b: ("/v1/chat/completions", b)))
    return as_json.map(lambda p: (p[0], json.dumps(p[1]).encode())) | st.tuples(
        st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.binary(max_size=64))


def test_fuzzed_bodies_with_any_text_never_get_a_server_error(url):
    from hypothesis import given

    @given(_bodies())
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        path, body = case
        r = _post(url, path, body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")

    check()


def test_only_the_host_names_served_are_answered(url):
    """A page on another site that rebinds its name to 127.0.0.1 sends its own name as Host: refused."""
    r = _post(url, "/v1/completions", GOOD, headers={"content-type": "application/json", "host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "host"
    assert "--allowed-host evil.example" in r.json()["error"]["message"]
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        ok = _post(url, "/v1/completions", GOOD, headers={"content-type": "application/json", "host": host})
        assert ok.status_code == 200, host
    with live(build_app(tiny_pair(), ServeConfig(model_name="tiny", max_tokens=4, allowed_hosts=("*",)))) as open_url:
        r = _post(open_url, "/v1/completions", GOOD, headers={"content-type": "application/json", "host": "box.lan"})
        assert r.status_code == 200


def test_an_api_key_is_required_where_one_is_set():
    import openai

    with live(build_app(tiny_pair(), ServeConfig(model_name="tiny", max_tokens=4, api_key="s3cret"))) as keyed:
        with pytest.raises(openai.AuthenticationError, match="needs an API key"):
            openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong").completions.create(model="tiny", prompt="a")
        out = openai.OpenAI(base_url=f"{keyed}/v1", api_key="s3cret").completions.create(
            model="tiny", prompt="a", max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert httpx.get(f"{keyed}/health").status_code == 200  # health and the page need no key


def test_context_limit_is_checked_with_max_tokens():  # the tiny models' context is 512 positions
    with live(build_app(tiny_pair(), ServeConfig(model_name="tiny", max_prompt_tokens=1000, max_tokens=64))) as url2:
        r = _post(url2, "/v1/completions", GOOD | {"prompt": [7] * 500, "max_tokens": 20})
        assert r.status_code == 400 and "context is 512" in r.json()["error"]["message"]
        default = _post(url2, "/v1/completions", {"model": "tiny", "prompt": [7] * 500})  # max_tokens: what fits
        assert default.status_code == 200 and default.json()["usage"]["completion_tokens"] <= 12


def test_chunked_oversized_body_is_refused(url):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_wrong_method_and_path_are_4xx(url):
    assert httpx.get(f"{url}/v1/completions").status_code == 405
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


schema = schemathesis.pytest.from_fixture("served_schema")


@pytest.fixture(scope="module")
def served_schema(url):
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_finds_no_server_error(case):
    case.call_and_validate(checks=[not_a_server_error], timeout=60)
