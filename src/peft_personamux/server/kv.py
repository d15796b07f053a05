"""Key/value caches of a running batch: rows padded on the left, joined, dropped; and the per-persona prefix LRU.

A batch's cache is a list over layers of ``(keys, values)``, each ``(batch, kv_heads, length, head_dim)``, with an
attention mask ``(batch, length)`` that is 0 over padding. Positions are passed explicitly, so a row's padding may
sit anywhere (between its cached prefix and its own text too) and rows of different lengths share one tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (batch, kv_heads, length, head_dim) keys and values


def kv_from_cache(cache) -> KV:
    """The tensors of a transformers ``DynamicCache`` (full attention layers only)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Expected a transformers DynamicCache, got {type(cache).__name__}.")
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError("The server's batch cache supports full-attention models only (no sliding-window layers).")
    return [(layer.keys, layer.values) for layer in layers]


def to_cache(kv: KV) -> DynamicCache:
    return DynamicCache(ddp_cache_data=kv)


def kv_length(kv: KV) -> int:
    return kv[0][0].shape[2]


def pad_left(kv: KV, mask: torch.Tensor, amount: int) -> tuple[KV, torch.Tensor]:
    """Add ``amount`` masked positions before every row."""
    if amount <= 0:
        return kv, mask
    padded = []
    for keys, values in kv:
        zeros = keys.new_zeros(keys.shape[0], keys.shape[1], amount, keys.shape[3])
        padded.append((torch.cat([zeros, keys], dim=2), torch.cat([zeros.to(values.dtype), values], dim=2)))
    return padded, torch.cat([mask.new_zeros(mask.shape[0], amount), mask], dim=1)


def concat_rows(parts: list[tuple[KV, torch.Tensor]]) -> tuple[KV, torch.Tensor]:
    """Join batches along the batch dimension, padding the shorter ones on the left."""
    length = max(kv_length(kv) for kv, _ in parts)
    parts = [pad_left(kv, mask, length - kv_length(kv)) for kv, mask in parts]
    layers = len(parts[0][0])
    kv = [
        (torch.cat([p[0][i][0] for p in parts], dim=0), torch.cat([p[0][i][1] for p in parts], dim=0))
        for i in range(layers)
    ]
    return kv, torch.cat([mask for _, mask in parts], dim=0)


def select_rows(kv: KV, mask: torch.Tensor, rows: list[int]) -> tuple[KV, torch.Tensor]:
    """Keep ``rows``, and drop leading positions that are padding in every kept row."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in kv]
    return kv, mask[:, start:]


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class PrefixCache:
    """Least-recently-used map of prefix key/value tensors (one row each), bounded by entry count."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"`capacity` must be >= 0 (0 disables the prefix cache), got {capacity}.")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, KV] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> KV | None:
        kv = self._entries.get(key)
        if kv is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return kv

    def put(self, key: Hashable, kv: KV) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = kv
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def drop(self, persona: str | None) -> None:
        """Forget every entry of ``persona`` (keys start with the persona name)."""
        for key in [k for k in self._entries if k[0] == persona]:
            del self._entries[key]

    def nbytes(self) -> int:
        return sum(kv_bytes(kv) for kv in self._entries.values())
