"""collm.backends.prepack: oneDNN-prepacked CPU linear layers, exact in tokens and owned by no model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS_ID, PAD_ID, make_llama
from helpers import NEW, PROMPTS, random_head


def test_prepacked_cpu_layers_compute_the_same_and_follow_weight_changes():
    """collm.backends.prepack: the large layers switch to oneDNN inside the block and back after it (also after an
    error); outputs match the default kernels to float32 rounding; a weight written in place is repacked."""
    from collm.backends.prepack import MIN_PARAMS, prepacked

    model = make_llama(0, hidden=512)
    big = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= MIN_PARAMS]
    ids = torch.tensor([PROMPTS[0]])
    layer, x = big[0], torch.randn(3, 512)
    with torch.inference_mode():
        reference = model(ids).logits
        with prepacked([model]) as switched:
            assert switched == len(big) > 0
            assert torch.allclose(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
            assert torch.allclose(layer(x), F.linear(x, layer.weight), rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                layer.weight.mul_(-2)
            assert torch.allclose(layer(x), F.linear(x, layer.weight), rtol=1e-4, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in big)
    with pytest.raises(RuntimeError, match="boom"), prepacked([model, model]):  # the same model twice, too
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in big)


def test_two_engines_prepacking_the_same_models_do_not_undo_each_other():
    """Overlapping blocks (two CoLLM objects over one model, in two threads) keep the switch until the last
    one exits; the first to exit does not put the other back on the default kernels."""
    from collm.backends.prepack import MIN_PARAMS, prepacked

    model = make_llama(0, hidden=512)
    big = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= MIN_PARAMS]
    first = prepacked([model])
    assert first.__enter__() == len(big)
    with prepacked([model]) as switched:
        assert switched == len(big)
    assert all("forward" in m.__dict__ for m in big)  # the first block is still open: still switched
    first.__exit__(None, None, None)
    assert all("forward" not in m.__dict__ for m in big)


def test_prepacking_is_skipped_where_the_copies_would_not_fit(monkeypatch):
    import collm.backends.prepack

    model = make_llama(0, hidden=512)
    need = sum(m.weight.nbytes for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.weight.numel() >= collm.backends.prepack.MIN_PARAMS)
    monkeypatch.setattr(collm.backends.prepack, "_physical_memory",
                        lambda: int(need / collm.backends.prepack.MEMORY_SHARE) - 1)
    with collm.backends.prepack.prepacked([model]) as switched:
        assert switched == 0
    monkeypatch.setattr(collm.backends.prepack, "_physical_memory",
                        lambda: int(need / collm.backends.prepack.MEMORY_SHARE) + 1)
    with collm.backends.prepack.prepacked([model]) as switched:
        assert switched > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_decoding_writes_what_the_default_kernels_write(dtype):
    """float32 and (where the CPU has native bfloat16 kernels) bfloat16 layers are prepacked; either way the
    tokens and their sources are the default kernels'."""
    from collm.backends.prepack import MIN_PARAMS, PACKED
    from collm.decoding.decode import Sampling, decode

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bfloat16 kernels: bfloat16 layers are not prepacked")
    base, expert = make_llama(0, hidden=512).to(dtype), make_llama(1, hidden=512).to(dtype)
    head = random_head(base.config.hidden_size, scale=0.3, seed=5)
    args = dict(max_new_tokens=NEW, threshold=0.5, sampling=Sampling(), eos_ids=(EOS_ID,), pad_id=PAD_ID,
                vocab=base.config.vocab_size)
    default = decode(base, [expert], head, PROMPTS, prepack=False, **args)
    big = [m for model in (base, expert) for m in model.modules()
           if isinstance(m, torch.nn.Linear) and m.weight.numel() >= MIN_PARAMS]
    assert big and not any(m in PACKED for m in big)
    packed = decode(base, [expert], head, PROMPTS, prepack=True, **args)
    assert all(m in PACKED for m in big)  # every large layer ran on its packed weight
    assert not any(k.startswith("_collm") or k == "forward" for m in big for k in vars(m))  # nothing left on them
    assert (packed.token_ids, packed.sources) == (default.token_ids, default.sources)
    assert 0 < default.stats["deferred_tokens"] < default.stats["new_tokens"]
