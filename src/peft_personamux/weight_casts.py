"""Frozen weights cast once for autocast, not on every call.

``torch.autocast`` caches its low-precision copy of a weight only for leaves that require gradient; the base model's
weights are frozen, so every forward casts each linear weight again (on a 2-core CPU, about a fifth of a bf16 stage-1
step: benchmarks/train_profile.py). Inside `kept_casts`, each frozen ``nn.Linear`` weight is replaced for the call by
one low-precision copy kept across calls: the same rounding autocast applies, so the same numbers, without the copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_KEPT = "_personamux_cast"  # attribute of a frozen weight: (its version when cast, the cast copy)


def cast_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, cast once and kept on ``weight`` while it is not changed in place (a change through
    ``.data`` bypasses the version counter and is not seen: the base model is frozen)."""
    version = weight._version
    kept = getattr(weight, _KEPT, None)
    if kept is None or kept[0] != version or kept[1].dtype != dtype:
        kept = (version, weight.detach().to(dtype))
        setattr(weight, _KEPT, kept)
    return kept[1]


@contextlib.contextmanager
def kept_casts(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, every frozen float32 ``nn.Linear`` weight of ``model`` is its kept ``dtype`` copy (run the
    block under autocast to ``dtype``). Trainable weights keep their own (autocast caches those within a call).
    No-op when ``dtype`` is None. The copies cost ``dtype``'s share of the linear weights' memory."""
    swapped: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        if dtype is not None:
            for module in model.modules():
                weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
                if weight is None or weight.requires_grad or weight.dtype != torch.float32:
                    continue
                module._parameters["weight"] = cast_copy(weight, dtype)  # read back by ``module.weight``
                swapped.append((module, weight))
        yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight
