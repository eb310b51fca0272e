"""Tiny randomly initialised models (Llama and GPT-2 families) and a character tokenizer, built from configs.

Fixtures for every test file. Models are seeded, so a test sees the same weights on every run.
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per printable ASCII character, plus chat special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB = len(SPECIALS) + len(CHARS)
EOS_ID = SPECIALS.index("</s>")
PAD_ID = SPECIALS.index("<pad>")


def make_llama(seed: int, hidden: int = 32, layers: int = 2, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def make_gpt2(seed: int, hidden: int = 32, layers: int = 2, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, initializer_range=0.2,
        bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def family(request):
    """Run a test once per model family."""
    return request.param


@pytest.fixture
def models(family):
    """(base, expert) of one family, different seeds."""
    make = make_llama if family == "llama" else make_gpt2
    return make(0), make(1)


def save_tiny(model, tokenizer, folder) -> str:
    """Save a tiny model and the tokenizer as an HF folder (for loaders and the CLI)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a pair fails the test: for settings that must be refused before loading."""
    from collm.pair import CoLLM

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(CoLLM, "load", no_loading)
    monkeypatch.setattr(CoLLM, "from_pretrained", no_loading)


def invoke(*args):
    """Run a `collm` command in process; an error other than the exit it asks for is raised as it is."""
    from typer.testing import CliRunner

    from collm.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
