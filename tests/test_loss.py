"""`loss.response_nll`: every shortcut gives the plain path's loss and gradients; `token_nll` against hand values."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHS, batch_for, mux

from peft_personamux.loss import (
    PLAIN,
    LossOptions,
    PrefixCache,
    choose_attention,
    choose_autocast,
    mean_response_loss,
    response_nll,
    token_nll,
)

FAST_OPTIONS = [
    LossOptions(labels_only=True, prefix_cache=False),
    LossOptions(labels_only=False, prefix_cache=True),
    LossOptions(labels_only=True, prefix_cache=True),
    LossOptions(labels_only=True, prefix_cache=True, attention="eager"),
    LossOptions(labels_only=True, prefix_cache=True, attention="sdpa"),
]


def test_token_nll_matches_a_hand_computed_value():
    # vocabulary of 2, constant logits [0, ln 3]: p(token 1) = 3/4, p(token 0) = 1/4
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3])  # (1, 3, 2)
    labels = torch.tensor([[-100, 1, 0]])  # position 0 predicts label 1, position 1 predicts label 0
    nll = token_nll(logits, labels)
    assert nll.shape == (1, 2)
    assert nll[0, 0].item() == pytest.approx(-math.log(0.75))
    assert nll[0, 1].item() == pytest.approx(-math.log(0.25))
    assert token_nll(logits, torch.tensor([[-100, -100, -100]])).sum().item() == 0.0


def loss_and_grads(model, batch, options, cache=None):
    model.zero_grad()
    loss = mean_response_loss(model, batch, options=options, prefix_cache=cache)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", FAST_OPTIONS, ids=["labels_only", "prefix", "both", "eager", "sdpa"])
def test_fast_paths_give_the_plain_loss_and_gradients(arch, options):
    model = mux(arch)  # eval mode: GPT-2's dropout would make two passes differ
    batch = batch_for(model)
    plain_loss, plain_grads = loss_and_grads(model, batch, PLAIN)
    loss, grads = loss_and_grads(model, batch, options, PrefixCache())
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert set(grads) == set(plain_grads) and len(grads) == 3  # codebook, bias, mixture table
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_path_equals_the_models_own_loss(arch):
    model = mux(arch)
    batch = batch_for(model)
    out = model(**batch)  # transformers' own causal-LM loss: the mean over label tokens
    assert mean_response_loss(model, batch, options=PLAIN).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_per_row_values_and_mixture_override():
    model = mux("llama")
    batch = batch_for(model)
    plain, tokens = response_nll(model, batch, options=PLAIN)
    fast, fast_tokens = response_nll(model, batch, prefix_cache=PrefixCache())
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert fast_tokens.tolist() == tokens.tolist() == (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    # a per-row mixture override equal to the table gives the same numbers; a different one does not
    table = model.base_model.model.get_input_embeddings().personamux_mixture["default"].detach()
    same, _ = response_nll(model, batch, mixtures=table[batch["persona_ids"]])
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)
    other, _ = response_nll(model, batch, mixtures=torch.zeros_like(table[batch["persona_ids"]]))
    assert not torch.allclose(other, plain)


def test_prefix_cache_reuses_entries_and_stays_bounded():
    model = mux("llama")
    batch = batch_for(model)
    cache = PrefixCache(max_entries=1)
    response_nll(model, batch, prefix_cache=cache)
    assert len(cache) == 1 and cache.misses >= 2  # two distinct prefixes, only one kept
    cache = PrefixCache()
    response_nll(model, batch, prefix_cache=cache)
    misses = cache.misses
    response_nll(model, batch, prefix_cache=cache)
    assert cache.misses == misses and cache.hits > 0
    with pytest.raises(ValueError, match="max_entries"):
        PrefixCache(0)


def test_bias_scale_zero_and_rows_without_prefix():
    model = mux("qwen2")
    batch = batch_for(model, with_prefix=(False, False, False, False))  # nothing to cache: plain body
    plain, _ = response_nll(model, batch, bias_scale=0.0, options=PLAIN)
    fast, _ = response_nll(model, batch, bias_scale=0.0)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_float32():
    model = mux("llama")
    batch = batch_for(model)
    plain = mean_response_loss(model, batch, options=PLAIN)
    bf16 = mean_response_loss(model, batch, options=LossOptions(autocast_dtype=torch.bfloat16))
    assert bf16.item() == pytest.approx(plain.item(), rel=2e-2)


def test_choose_autocast_modes():
    assert choose_autocast("cpu", "no") is None
    assert choose_autocast("cpu", "bf16") is torch.bfloat16
    assert choose_autocast("cpu", "auto") in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        choose_autocast("cpu", "fp8")


def test_attention_switch_is_per_call_and_restored():
    model = mux("llama")
    config = model.base_model.model.config
    before = config._attn_implementation
    other = "eager" if before != "eager" else "sdpa"
    seen = []
    layer = model.base_model.model.model.layers[0].self_attn
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    try:
        response_nll(model, batch_for(model), options=LossOptions(attention=other))
    finally:
        handle.remove()
    assert seen and set(seen) == {other}  # every pass (prefixes and rows) ran with the requested implementation
    assert config._attn_implementation == before  # and the model is as it was


def test_choose_attention_modes():
    assert choose_attention("cpu", torch.bfloat16) == "eager"
    assert choose_attention("cpu", None) is None  # float32: SDPA is the faster one
    assert choose_attention("cpu", torch.bfloat16, "model") is None
    assert choose_attention("cpu", None, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="`attention` must be one of .*got 'flash'"):
        choose_attention("cpu", None, "flash")
