"""Frozen weights cast once for autocast, not on every call.

``torch.autocast`` caches its low-precision copy of a weight only for leaves that require gradient; the base model's
weights are frozen, so every forward casts each linear weight again (on a 2-core CPU, about a fifth of the operator
time of a bf16 stage-1 step: benchmarks/train_profile.py). Inside `kept_casts`, each frozen ``nn.Linear`` weight is
replaced for the call by one low-precision copy kept across calls: the same rounding autocast applies, so the same
numbers, without the copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_KEPT = "_personamux_cast"  # attribute of a frozen weight: (its data when cast, its version then, the cast copy)


def cast_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, cast once and kept on ``weight``. Cast again when ``weight`` changed in place (its
    version) or got new data (``weight.data = ...``, as `subnetwork` masks and ``module.to`` do); a change made in
    place through ``.data`` is not seen. The copy is an ordinary tensor even when made under inference mode."""
    kept = getattr(weight, _KEPT, None)
    if (
        kept is None
        or kept[0].data_ptr() != weight.data_ptr()  # kept[0] holds the old data, so its address is not reused
        or kept[1] != weight._version
        or kept[2].dtype != dtype
    ):
        with torch.inference_mode(False):
            kept = (weight.detach(), weight._version, weight.detach().to(dtype))
        setattr(weight, _KEPT, kept)
    return kept[2]


def drop_casts(model: nn.Module) -> None:
    """Free the copies `kept_casts` keeps on ``model``'s weights (the next `kept_casts` block makes them again)."""
    for param in model.parameters():
        if hasattr(param, _KEPT):
            delattr(param, _KEPT)


@contextlib.contextmanager
def kept_casts(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, every frozen float32 ``nn.Linear`` weight of ``model`` (the class itself, not subclasses
    with their own forward) is its kept ``dtype`` copy: run the block under autocast to ``dtype``. Trainable weights
    keep their own (autocast caches those within a call). No-op when ``dtype`` is None.

    The copies stay on the weights across blocks (``dtype``'s share of the linear weights' memory; `drop_casts` frees
    them). The block swaps them into the modules, so it is neither thread-safe nor meant for saving the model."""
    swapped: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        if dtype is not None:
            for module in model.modules():
                weight = module._parameters.get("weight") if type(module) is nn.Linear else None
                if weight is None or weight.requires_grad or weight.dtype != torch.float32:
                    continue
                module._parameters["weight"] = cast_copy(weight, dtype)  # read back by ``module.weight``
                swapped.append((module, weight))
        yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight
