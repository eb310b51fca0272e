"""Bad input: each a clear one-line CollmError that says what to fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_gpt2, make_llama, make_tokenizer, save_tiny

from collm import CoLLM, CollmError, DeferralHead
from collm.backends.models import check_vocab, load_model


@pytest.fixture(scope="module")
def pair():
    return CoLLM(make_llama(0), [make_llama(1)], None, make_tokenizer())


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan, "0.5", None.__class__])
def test_threshold_outside_unit_interval(pair, threshold):
    with pytest.raises(CollmError) as e:
        pair.generate("hi", threshold=threshold)
    assert "threshold" in one_line(e)


@pytest.mark.parametrize("new", [0, -3, 2.5])
def test_max_new_tokens_must_be_positive(pair, new):
    with pytest.raises(CollmError) as e:
        pair.generate("hi", max_new_tokens=new)
    assert "max_new_tokens" in one_line(e)


@pytest.mark.parametrize("prompts", ["", "   ", ["ok", ""], [[1, 2], []], []])
def test_empty_prompt(pair, prompts):
    with pytest.raises(CollmError) as e:
        pair.generate(prompts)
    assert "prompt" in one_line(e)


def test_token_ids_outside_vocab(pair):
    with pytest.raises(CollmError) as e:
        pair.generate([[1, 2, 10_000]])
    assert "10000" in one_line(e)


def test_unknown_mode_and_bad_sampling(pair):
    with pytest.raises(CollmError, match="mode"):
        pair.generate("hi", mode="vote")
    with pytest.raises(CollmError, match="temperature"):
        pair.generate("hi", do_sample=True, temperature=0)
    with pytest.raises(CollmError, match="top_p"):
        pair.generate("hi", do_sample=True, top_p=1.5)


def test_input_ids_tensor_matches_lists(pair):
    ids = torch.tensor([[1, 40, 41], [1, 50, 51]])
    assert pair.generate(ids, max_new_tokens=5).token_ids == pair.generate(ids.tolist(), max_new_tokens=5).token_ids


def test_vocabularies_that_differ_name_the_first_mismatch():
    a, b = make_tokenizer(), make_tokenizer()
    b.add_tokens(["<extra>"])
    with pytest.raises(CollmError) as e:
        check_vocab(a, b)
    assert "size" in one_line(e)
    vocab = a.get_vocab()
    swapped = {**vocab, "a": vocab["b"], "b": vocab["a"]}
    c = type("Tok", (), {"get_vocab": lambda self: swapped})()
    with pytest.raises(CollmError) as e:
        check_vocab(a, c)
    assert "'a'" in one_line(e)


def test_models_with_different_logit_widths_refused():
    base, expert = make_llama(0), make_gpt2(1)
    expert.resize_token_embeddings(expert.config.vocab_size + 8)
    with pytest.raises(CollmError, match="vocabularies differ"):
        CoLLM(base, [expert])


def test_head_of_wrong_shape_refused():
    with pytest.raises(CollmError, match="hidden size"):
        CoLLM(make_llama(0), [make_llama(1)], DeferralHead(64))
    with pytest.raises(CollmError, match="2 experts"):
        CoLLM(make_llama(0), [make_llama(1)], DeferralHead(32, 2))


def test_missing_paths(tmp_path):
    with pytest.raises(CollmError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CollmError, match="not a model"):
        load_model(str(tmp_path))
    with pytest.raises(CollmError, match="does not exist"):
        DeferralHead.load(tmp_path / "head.safetensors")
    with pytest.raises(CollmError, match="not a collm run"):
        CoLLM.from_pretrained(tmp_path)


def test_gguf_that_is_not_a_causal_lm(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("COLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CollmError) as e:
        load_model(str(path))
    assert "not a causal language model" in one_line(e)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all")
    with pytest.raises(CollmError, match="not a causal language model"):
        load_model(str(garbage))


def test_hf_folder_roundtrip_and_run_save_load(tmp_path):
    tok = make_tokenizer()
    base_dir = save_tiny(make_llama(0), tok, tmp_path / "base")
    expert_dir = save_tiny(make_llama(1), tok, tmp_path / "expert")
    pair = CoLLM.load(base_dir, [expert_dir], threshold=0.3)
    with torch.no_grad():
        pair.head.linear.weight.normal_(0, 0.5)
    before = pair.generate("What is 2+3?", max_new_tokens=12)
    pair.save_pretrained(tmp_path / "run")
    again = CoLLM.from_pretrained(tmp_path / "run")
    after = again.generate("What is 2+3?", max_new_tokens=12)
    assert again.threshold == 0.3
    assert (after.token_ids, after.sources) == (before.token_ids, before.sources)


def test_lora_adapter_folder_is_a_model_spec(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = make_tokenizer()
    base_dir = save_tiny(make_llama(0), tok, tmp_path / "base")
    tuned = get_peft_model(load_model(base_dir)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tuned.save_pretrained(tmp_path / "adapter")
    merged = tuned.merge_and_unload()
    loaded, loaded_tok = load_model(str(tmp_path / "adapter"))
    x = torch.tensor([[1, 40, 41, 42]])
    assert torch.allclose(loaded(x).logits, merged(x).logits, atol=1e-5)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    from collm.backends.models import load_tokenizer

    assert load_tokenizer(str(tmp_path / "adapter")).get_vocab() == tok.get_vocab()
    assert not torch.allclose(loaded(x).logits, load_model(base_dir)[0](x).logits, atol=1e-3)


def test_request_longer_than_the_context_is_refused():
    pair = CoLLM(make_gpt2(0), [make_gpt2(1)])  # n_positions = 512
    with pytest.raises(CollmError) as e:
        pair.generate([[1] * 500], max_new_tokens=20)
    assert "context is 512" in one_line(e)
    assert len(pair.generate([[1] * 500], max_new_tokens=12).token_ids[0]) <= 12


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"garbage" * 10])
def test_truncated_or_garbage_weights_are_a_one_line_error(tmp_path, damage):
    folder = save_tiny(make_llama(0), make_tokenizer(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CollmError) as e:
        load_model(folder)
    assert "damaged or truncated" in one_line(e) and "model again" in one_line(e)


def _stand_in_gguf(tmp_path, monkeypatch, model_factory=lambda: make_llama(0)):
    """A .gguf path whose dequantisation gives a tiny model (no real GGUF needed)."""
    from collm.backends import models

    monkeypatch.setenv("COLLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")
    monkeypatch.setattr(models, "_read_gguf", lambda path: (model_factory(), make_tokenizer()))
    return str(gguf)


def test_a_truncated_file_in_the_dequantised_cache_is_rebuilt(tmp_path, monkeypatch):
    gguf = _stand_in_gguf(tmp_path, monkeypatch)
    load_model(gguf)
    (cached,) = (tmp_path / "cache").iterdir()
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    again, _ = load_model(gguf)
    x = torch.tensor([[1, 40, 41]])
    assert torch.equal(again(x).logits, make_llama(0)(x).logits)


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                 'device" })'),  # how safetensors reports it
])
def test_disk_full_while_dequantising_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch, error):
    def model_that_fills_the_disk():
        model = make_llama(0)

        def save_pretrained(folder, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise error

        model.save_pretrained = save_pretrained
        return model

    from pathlib import Path

    gguf = _stand_in_gguf(tmp_path, monkeypatch, model_that_fills_the_disk)
    with pytest.raises(CollmError) as e:
        load_model(gguf)
    assert "no space left on the device" in one_line(e)
    assert list((tmp_path / "cache").iterdir()) == []


def test_device_that_this_machine_lacks_is_a_one_line_error(monkeypatch, tmp_path):
    folder = save_tiny(make_llama(0), make_tokenizer(), tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CollmError) as e:
        load_model(folder, device="cuda")
    assert "CUDA is not available here: use --device cpu" in one_line(e)
    with pytest.raises(CollmError, match="is not a torch device"):
        load_model(folder, device="gpu0")


def test_generate_accepts_the_input_ids_keyword(pair):
    ids = torch.tensor([[1, 40, 41]])
    out = pair.generate(input_ids=ids, max_new_tokens=3)
    assert out.token_ids == pair.generate(ids, max_new_tokens=3).token_ids
    with pytest.raises(CollmError, match="not both"):
        pair.generate(["hi"], input_ids=ids)


def test_the_default_head_says_once_that_it_never_defers():
    pair = CoLLM(make_llama(0), [make_llama(1)], None, make_tokenizer())
    with pytest.warns(UserWarning, match=r"zero head .* never exceeds threshold 0.5"):
        pair.generate([[1, 40]], max_new_tokens=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pair.generate([[1, 40]], max_new_tokens=2)  # once per pair
        pair.generate([[1, 40]], max_new_tokens=2, threshold=0.4)  # defers: nothing to say


def test_merge_adapter_replaces_only_a_folder_it_wrote(tmp_path):
    from peft import LoraConfig, get_peft_model

    from collm.training.expert import merge_adapter

    tok = make_tokenizer()
    base_dir = save_tiny(make_llama(0), tok, tmp_path / "base")
    get_peft_model(load_model(base_dir)[0], LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CollmError, match="was not written by merge"):
        merge_adapter(tmp_path / "adapter", tmp_path / "mine", base=base_dir)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=base_dir)
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=base_dir)  # its own folder: replaced
    assert load_model(str(tmp_path / "merged"))[1].get_vocab() == tok.get_vocab()


def test_a_request_and_keyword_options_are_one_way_to_ask(pair):
    """generate takes a Request, keyword options replacing its fields, or both: the same tokens."""
    from collm.core.request import Request, Sampling

    request = Request(max_new_tokens=6, threshold=0.3, sampling=Sampling(do_sample=True, temperature=0.7, seed=3))
    by_request = pair.generate("hi", request)
    by_options = pair.generate("hi", max_new_tokens=6, threshold=0.3, do_sample=True, temperature=0.7, seed=3)
    overridden = pair.generate("hi", Request(max_new_tokens=2), max_new_tokens=6, threshold=0.3, do_sample=True,
                               temperature=0.7, seed=3)
    assert by_request.token_ids == by_options.token_ids == overridden.token_ids
    assert pair.request(stop="x").stop == ("x",) and pair.request().threshold == pair.threshold


def test_an_unknown_option_is_one_line(pair):
    with pytest.raises(CollmError) as e:
        pair.generate("hi", max_tokens=4)
    assert "unknown option 'max_tokens': choose from max_new_tokens" in one_line(e)
