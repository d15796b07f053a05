"""Decoder layers compiled by ``torch.compile`` for training.

With bf16 autocast on a CPU with bf16 matrix units (AMX), the matrix multiplies of a SmolLM2-135M step take under
half its operator time; the rest is element-wise work (norms, rotary embedding, activations, casts) that eager mode
runs one operator at a time (benchmarks/train_profile.py). Inductor fuses it. Each decoder layer is compiled in place
(``nn.Module.compile``), so parameter names, the state dict, saving and the adapter are unchanged; the embeddings,
the soft prompt and the head stay eager. The first steps compile (minutes on 2 cores); shapes are dynamic, so
length-grouped batches of other lengths do not compile again.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (a peft model or a transformers causal LM): its ``nn.ModuleList`` with
    ``config.num_hidden_layers`` entries (``model.layers`` in Llama and Qwen2, ``transformer.h`` in GPT-2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    count = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    if count is None:
        raise ValueError(
            f"{type(base).__name__} has no `config.num_hidden_layers`: compiled layers need a transformers model."
        )
    raise ValueError(f"Found no list of {count} decoder layers in {type(base).__name__}.")


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile each decoder layer of ``model`` in place (inductor, dynamic shapes); the number newly compiled.
    Idempotent: layers compiled before are left as they are."""
    import torch._dynamo

    layers = decoder_layers(model)
    # each layer's own ``layer_idx`` (a Python int) specialises its graph: one compile per layer and kind of input
    # (with and without a prefix's key/value cache, packed rows); the default limit of 8 would leave most layers eager
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len(layers))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * len(layers))
    fresh = [layer for layer in layers if getattr(layer, "_compiled_call_impl", None) is None]
    for layer in fresh:
        layer.compile(dynamic=True)
    if fresh:
        logger.info(
            "Compiled %d decoder layers (torch.compile, dynamic shapes); the first steps compile them.", len(fresh)
        )
    return len(fresh)
