"""Key/value-cache plumbing of the response loss: the text before the soft prompt.

`PrefixCache` / `split_prefix`: the tokens before the soft prompt (chat template's system turn, text persona) depend
on no trained weight; their key/value states are computed once without gradient and each row's rest runs on top of
them. `shared_prompt` builds on these helpers to run a persona's soft prompt once for many rows.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict

import torch
from torch import nn

from .inputs import IGNORE_INDEX


def autocast(device, dtype):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class PrefixCache:
    """Key/value states of prompt prefixes (the tokens before the soft prompt), computed once without gradient.

    Entries are per token sequence and dtype, at most ``max_entries`` (least recently used dropped). Valid only
    while the base model's weights do not change, which is the case for Persona-Mux (they are frozen).
    """

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError(f"`max_entries` must be a positive integer, got {max_entries!r}.")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, body: nn.Module, ids: tuple[int, ...], device, autocast_dtype) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (key, value), each (1, kv_heads, len(ids), head_dim), of ``ids`` run through ``body``."""
        key = (ids, str(device), str(autocast_dtype))
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        with torch.no_grad(), autocast(device, autocast_dtype):
            out = body(input_ids=torch.tensor([ids], device=device), use_cache=True)
        entry = cache_tensors(output_cache(out))
        self._entries[key] = entry
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry


def prompt_starts(input_ids: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """Index of each row's first soft-prompt position (rows,); rows are right padded after insertion."""
    is_ph = input_ids == placeholder_id
    return torch.where(is_ph.any(-1), is_ph.int().argmax(-1), torch.zeros_like(is_ph[:, 0], dtype=torch.long))


def rest_of_rows(input_ids, labels, attention_mask, starts: torch.Tensor, pad_id: int = 0):
    """Each row from ``starts[row]`` to its last real token, right padded: ids, labels and mask (rows, rest)."""
    rows, device = input_ids.shape[0], input_ids.device
    lengths = attention_mask.sum(-1)
    rest_len = int((lengths - starts).max())
    ids = torch.full((rows, rest_len), pad_id, dtype=input_ids.dtype, device=device)
    rest_labels = torch.full((rows, rest_len), IGNORE_INDEX, dtype=labels.dtype, device=device)
    mask = torch.zeros(rows, rest_len, dtype=attention_mask.dtype, device=device)
    for r, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        ids[r, : n - s], rest_labels[r, : n - s], mask[r, : n - s] = input_ids[r, s:n], labels[r, s:n], 1
    return ids, rest_labels, mask


def split_prefix(body, cache: PrefixCache, input_ids, attention_mask, labels, starts, autocast_dtype):
    """Cut each row at its soft prompt: the prefix comes from ``cache``, the rest is returned to run.

    Prefixes of different lengths are left padded in the key/value states (masked out), so every row's suffix
    starts at its own position ``starts[row]``.
    """
    rows, device = input_ids.shape[0], input_ids.device
    starts_list = starts.tolist()
    prefixes = [
        cache.get(body, tuple(input_ids[r, :s].tolist()), device, autocast_dtype) if s > 0 else None
        for r, s in enumerate(starts_list)
    ]
    prefix_len = max(starts_list)
    padding = input_ids[attention_mask == 0]
    pad_id = int(padding[0]) if padding.numel() else 0  # the batch's own pad id (masked out either way)
    # (rows, suffix) each, right padded
    new_ids, new_labels, suffix_mask = rest_of_rows(input_ids, labels, attention_mask, starts, pad_id)
    suffix_len = new_ids.shape[1]
    prefix_mask = torch.zeros(rows, prefix_len, dtype=attention_mask.dtype, device=device)  # left padded
    for r, s in enumerate(starts_list):
        prefix_mask[r, prefix_len - s :] = 1
    positions = starts[:, None] + torch.arange(suffix_len, device=device)  # (rows, suffix)
    reference = next(p for p in prefixes if p is not None)
    layers = []
    for layer, (key_ref, value_ref) in enumerate(reference):
        shape = (rows, key_ref.shape[1], prefix_len, key_ref.shape[3])  # (rows, kv_heads, prefix, head_dim)
        keys, values = key_ref.new_zeros(shape), value_ref.new_zeros(shape)
        for r, (s, entry) in enumerate(zip(starts_list, prefixes)):
            if entry is not None:
                keys[r, :, prefix_len - s :], values[r, :, prefix_len - s :] = entry[layer]
        layers.append((keys, values))
    kwargs = {cache_kwarg(body): make_cache(layers), "position_ids": positions, "use_cache": True}
    return new_ids, torch.cat([prefix_mask, suffix_mask], dim=1), new_labels, kwargs


def cache_kwarg(body: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever the model's forward takes."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache
