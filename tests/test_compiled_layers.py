"""`compiled_layers`: decoder layers compiled in place give the eager loss and gradients and keep the state dict;
the compiled head (`LossOptions.compiled_head`) and the decoder body compiled as one region
(`LossOptions.compiled_body`) give the eager path's."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, mux, needs_compiler, shared_batch_for
from torch import nn

import peft_personamux.compiled_layers as compiled_layers_module
import peft_personamux.loss as loss_module
from peft_personamux.compiled_layers import (
    compile_decoder_layers,
    compiled_decoder_layers,
    decoder_layers,
    eager_decoder_layers,
    resumed_layers,
    run_body,
)
from peft_personamux.loss import LossOptions, PrefixCache, mean_response_loss


def loss_and_grads(model, batch, options):
    model.zero_grad()
    loss = mean_response_loss(model, batch, options=options, prefix_cache=PrefixCache())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close_to_eager(loss, grads, want_loss, want, autocast) -> None:
    """A compiled path's loss and gradients against the eager path's: to float rounding in float32; under bf16
    autocast, fused element-wise work rounds differently from eager's operator-by-operator bf16."""
    assert set(grads) == set(want)
    if autocast is None:
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    else:
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-2)
        for name, grad in grads.items():
            error = (grad - want[name]).norm() / want[name].norm()
            assert error < 0.05, (name, error.item())


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_finds_each_architectures_layer_list(arch):
    model = mux(arch)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.get_base_model().config.num_hidden_layers


def test_decoder_layers_refuses_a_model_without_them():
    with pytest.raises(ValueError, match="Linear has no `config.num_hidden_layers`"):
        decoder_layers(nn.Linear(2, 2))
    model = mux("llama")
    model.get_base_model().config.num_hidden_layers = 7
    with pytest.raises(ValueError, match="no list of 7 decoder layers in LlamaForCausalLM"):
        decoder_layers(model)


@needs_compiler
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16 autocast"])
def test_compiled_layers_give_the_eager_loss_and_gradients_and_the_same_state_dict(autocast):
    eager = mux("llama")
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    assert len(compile_decoder_layers(compiled)) == len(decoder_layers(compiled))
    assert compile_decoder_layers(compiled) == []  # idempotent
    assert list(compiled.state_dict()) == keys
    batch = shared_batch_for(eager)
    options = LossOptions(labels_only=True, prefix_cache=True, shared_prompt=True, autocast_dtype=autocast)
    want_loss, want = loss_and_grads(eager, batch, options)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    for call in range(2):
        loss, grads = loss_and_grads(compiled, batch, options)
        if call == 0:
            made = graphs["unique_graphs"]
            assert made >= len(decoder_layers(compiled))  # the layers ran compiled, not eager
        assert graphs["unique_graphs"] == made  # the second call reuses the graphs
        assert_close_to_eager(loss, grads, want_loss, want, autocast)


def test_compiled_block_restores_eager_layers_and_leaves_earlier_compiles():
    model = mux("llama")
    layers = decoder_layers(model)
    layers[0].compile(dynamic=True)  # compiled before the block: stays compiled
    with compiled_decoder_layers(model) as fresh:
        assert len(fresh) == len(layers) - 1
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert layers[0]._compiled_call_impl is not None
    assert all(layer._compiled_call_impl is None for layer in layers[1:])


@needs_compiler
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16 autocast"])
def test_compiled_head_gives_the_eager_heads_loss_and_gradients(autocast):
    model = mux("llama")
    batch = shared_batch_for(model)
    eager = LossOptions(autocast_dtype=autocast)
    want_loss, want = loss_and_grads(model, batch, eager)
    loss_module._compiled_head_nll.cache_clear()  # a fresh compiled function, counted below
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    for call in range(2):
        loss, grads = loss_and_grads(model, batch, LossOptions(autocast_dtype=autocast, compiled_head=True))
        if call == 0:
            made = graphs["unique_graphs"]
            assert made >= 1  # the head ran compiled, not eager
        assert graphs["unique_graphs"] == made  # the second call reuses its graph
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
        assert set(grads) == set(want)
        for name, grad in grads.items():  # bf16: the same logits, the softmax's float32 rounding fused
            torch.testing.assert_close(grad, want[name], rtol=1e-3 if autocast else 1e-4, atol=1e-6, msg=name)


def test_compiled_head_needs_the_labels_only_head():
    with pytest.raises(ValueError, match="`compiled_head=True` compiles the labels-only head"):
        LossOptions(labels_only=False, compiled_head=True)


@needs_compiler
def test_compiled_head_handles_a_bias_and_no_gradient():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).requires_grad_(False)
    hidden = torch.randn(2, 7, 16, requires_grad=True)  # (lines, seq, hidden)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # no label there
    keep = labels[:, 1:] != -100
    want = loss_module._labels_only_nll(head, hidden, labels, keep, compiled=False)
    (want_grad,) = torch.autograd.grad(want.sum(), hidden)
    got = loss_module._labels_only_nll(head, hidden, labels, keep, compiled=True)
    (got_grad,) = torch.autograd.grad(got.sum(), hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(loss_module._labels_only_nll(head, hidden, labels, keep, compiled=True), want)


def test_eager_decoder_layers_runs_compiled_layers_eager_within_the_block():
    model = mux("llama")
    layers = decoder_layers(model)
    with compiled_decoder_layers(model):
        compiled = [layer._compiled_call_impl for layer in layers]
        with eager_decoder_layers(model):
            assert all(layer._compiled_call_impl is None for layer in layers)
        assert [layer._compiled_call_impl for layer in layers] == compiled
    with eager_decoder_layers(nn.Linear(2, 2)):  # no decoder layers: nothing to do
        pass


def test_resumed_layers_switches_suspended_layers_back_on_within_its_block():
    model = mux("llama")
    layers = decoder_layers(model)
    with compiled_decoder_layers(model), eager_decoder_layers(model) as suspended:
        assert len(suspended) == len(layers) and all(layer._compiled_call_impl is None for layer in layers)
        with resumed_layers(suspended):
            assert all(layer._compiled_call_impl is not None for layer in layers)
        assert all(layer._compiled_call_impl is None for layer in layers)
    with resumed_layers(()):  # nothing suspended (training without compile_layers): nothing to do
        pass


@needs_compiler
@pytest.mark.parametrize(
    "arch, autocast", [("llama", None), ("llama", torch.bfloat16), ("gpt2", None)], ids=["llama", "llama-bf16", "gpt2"]
)
def test_compiled_body_gives_the_eager_loss_and_gradients_as_one_region_per_call(arch, autocast):
    model = mux(arch)
    batch = shared_batch_for(model)  # shared prompts: the groups' heads and the rows' rest, two body calls
    want_loss, want = loss_and_grads(model, batch, LossOptions(autocast_dtype=autocast))
    compiled_layers_module._compiled_body.cache_clear()  # a fresh compiled function, counted below
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for _ in range(2):
        loss, grads = loss_and_grads(model, batch, LossOptions(autocast_dtype=autocast, compiled_body=True))
        # one graph per kind of body call, whatever the number of layers; nothing left eager between layers
        assert counters["stats"]["unique_graphs"] - graphs == 2
        assert sum(counters["graph_break"].values()) == breaks
        assert_close_to_eager(loss, grads, want_loss, want, autocast)


@needs_compiler
def test_run_body_matches_the_bodys_own_forward():
    model = mux("llama")
    body = model.get_base_model().model
    ids = shared_batch_for(model)["input_ids"][:, :5]  # no placeholder in the first tokens
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = body(input_ids=ids, attention_mask=mask).last_hidden_state
        got = run_body(body, ids, mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_body_needs_the_labels_only_path_and_is_ignored_under_activation_checkpointing(caplog):
    with pytest.raises(ValueError, match="`compiled_body=True` compiles the labels-only path"):
        LossOptions(labels_only=False, compiled_body=True)
    assert LossOptions(compiled_body=True, compiled_head=True).eager() == LossOptions()
    model = mux("llama")
    model.get_base_model().gradient_checkpointing_enable()
    batch = shared_batch_for(model)
    want = mean_response_loss(model, batch, options=LossOptions())
    loss_module._warn_once.cache_clear()  # warned afresh, whatever ran before
    with caplog.at_level("WARNING"):
        got = mean_response_loss(model, batch, options=LossOptions(compiled_body=True))  # eager: no compiler needed
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert "`compiled_body` is ignored under activation checkpointing" in caplog.text
