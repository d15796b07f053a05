"""Decoder layers compiled by ``torch.compile`` for training.

With bf16 autocast on a CPU with bf16 matrix units (AMX), matrix multiplies take under half of the operator time of a
SmolLM2-135M stage-1 step; the rest is element-wise work (norms, rotary embedding, activations, casts) that eager mode
runs one operator at a time (benchmarks/results/train_profile_xeon_amx.md). Inductor fuses it. Each decoder layer is
compiled in place (``nn.Module.compile``), so parameter names, the state dict, saving and the adapter are unchanged;
the embeddings and the soft prompt stay eager (training's ``compile_layers`` also compiles the output head and its
cross entropy: `loss.LossOptions.compiled_head`). `run_body` compiles instead the whole body after the embeddings as
one region (``compile_scope='body'``). The first step compiles (minutes on 2 cores); shapes are
dynamic, so length-grouped batches of other lengths need no new graphs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (a peft model or a transformers causal LM): the ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules (``model.layers`` in Llama and Qwen2, ``transformer.h`` in GPT-2), those of a
    class the model names in ``_no_split_modules`` first."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    count = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    if not count:
        raise ValueError(
            f"{type(base).__name__} has no `config.num_hidden_layers` (got {count!r}): compiled layers need a "
            "transformers decoder."
        )
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    named = set(getattr(base, "_no_split_modules", None) or ())
    lists.sort(key=lambda m: type(m[0]).__name__ not in named)  # stable: the model's order otherwise
    if not lists:
        raise ValueError(
            f"Found no list of {count} decoder layers in {type(base).__name__}; train without `compile_layers`."
        )
    return lists[0]


def compile_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Compile each decoder layer of ``model`` in place (inductor, dynamic shapes); the layers newly compiled (those
    compiled before are left as they are). Raises torch._dynamo's recompile limits for the whole process: every layer
    is its own cache entry of one code object, and each kind of call (training, evaluation, a prefix's key/value
    cache) adds one per layer; past the limit a layer would run eager without an error."""
    import torch._dynamo

    layers = decoder_layers(model)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * len(layers))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * len(layers))
    fresh = [layer for layer in layers if getattr(layer, "_compiled_call_impl", None) is None]
    for layer in fresh:
        layer.compile(dynamic=True)
    if fresh:
        logger.info("Compiled %d decoder layers (torch.compile, dynamic shapes); the first step compiles.", len(fresh))
    return fresh


@contextlib.contextmanager
def compiled_decoder_layers(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, ``model``'s decoder layers run compiled (`compile_decoder_layers`); after it, the layers
    this block compiled run eager again (inductor keeps its graphs on disk, so a later block compiles faster)."""
    fresh = compile_decoder_layers(model)
    try:
        yield fresh
    finally:
        for layer in fresh:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the module's own __call__ again


@contextlib.contextmanager
def eager_decoder_layers(model: nn.Module) -> Iterator[list[tuple[nn.Module, Callable]]]:
    """Within the block, ``model``'s compiled decoder layers run eager; compiled again after it. Yields the suspended
    (layer, compiled call) pairs, which `resumed_layers` switches back on for a part of the block. A no-op for a model
    without decoder layers."""
    try:
        layers = list(decoder_layers(model))
    except ValueError:
        layers = []
    kept = [(layer, layer._compiled_call_impl) for layer in layers if getattr(layer, "_compiled_call_impl", None)]
    for layer, _ in kept:
        layer._compiled_call_impl = None
    try:
        yield kept
    finally:
        for layer, compiled in kept:
            layer._compiled_call_impl = compiled


@contextlib.contextmanager
def resumed_layers(suspended: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Within the block, the layers `eager_decoder_layers` suspended run compiled again (eager after it)."""
    for layer, compiled in suspended:
        layer._compiled_call_impl = compiled
    try:
        yield
    finally:
        for layer, _ in suspended:
            layer._compiled_call_impl = None


def eager_body(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """``body(input_ids=..., attention_mask=..., **kwargs)``: `run_body`'s eager counterpart, with its signature."""
    return body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def run_body(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """``body(input_ids=..., attention_mask=..., **kwargs)`` of a decoder body (LlamaModel, GPT2Model, ...), its
    input embeddings eager (the tuner's soft prompt goes in there, with data-dependent indexing) and everything after
    them (masks, positions, every layer, the final norm) as one torch.compile region (dynamic shapes): one guard
    check per call instead of one per layer (`LossOptions.compiled_body`)."""
    embeds = body.get_input_embeddings()(input_ids)  # (rows, seq, hidden)
    return _compiled_body()(body, embeds, attention_mask, kwargs)


def _body_from_embeddings(body: nn.Module, embeds: torch.Tensor, attention_mask, kwargs: dict):
    return body(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


@functools.cache
def _compiled_body():
    """`_body_from_embeddings` under torch.compile, made once (its graphs are keyed by the body and the call)."""
    import torch._dynamo

    # one cache entry per kind of call and body (the groups' heads, packed and unpacked rows, each model in a process)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(_body_from_embeddings, dynamic=True)
