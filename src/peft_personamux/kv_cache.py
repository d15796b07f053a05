"""Key/value-cache plumbing of the response loss: the text before the soft prompt and the soft prompt itself.

* `PrefixCache` / `split_prefix`: the tokens before the soft prompt (chat template's system turn, text persona)
  depend on no trained weight; their key/value states are computed once without gradient and each row's rest runs
  on top of them.
* `split_shared_prompt`: rows that share a prefix and a persona share the soft prompt's key/value states too; they
  are computed once per (prefix, persona) with gradient and broadcast to the rows (their gradients sum back), so a
  batch of many lines of one persona (stage 2, persona-grouped stage-1 batches) runs its 20 virtual tokens once.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable

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


def split_prefix(body, cache: PrefixCache, input_ids, attention_mask, labels, starts, autocast_dtype):
    """Cut each row at its soft prompt: the prefix comes from ``cache``, the rest is returned to run.

    Prefixes of different lengths are left padded in the key/value states (masked out), so every row's suffix
    starts at its own position ``starts[row]``.
    """
    rows, device = input_ids.shape[0], input_ids.device
    lengths = attention_mask.sum(-1)
    starts_list, lengths_list = starts.tolist(), lengths.tolist()
    prefixes = [
        cache.get(body, tuple(input_ids[r, :s].tolist()), device, autocast_dtype) if s > 0 else None
        for r, s in enumerate(starts_list)
    ]
    prefix_len = max(starts_list)
    suffix_len = max(n - s for n, s in zip(lengths_list, starts_list))
    padding = input_ids[attention_mask == 0]
    pad_id = int(padding[0]) if padding.numel() else 0  # the batch's own pad id (masked out either way)
    new_ids = torch.full((rows, suffix_len), pad_id, dtype=input_ids.dtype, device=device)  # (rows, suffix)
    new_labels = torch.full((rows, suffix_len), IGNORE_INDEX, dtype=labels.dtype, device=device)
    suffix_mask = torch.zeros(rows, suffix_len, dtype=attention_mask.dtype, device=device)
    prefix_mask = torch.zeros(rows, prefix_len, dtype=attention_mask.dtype, device=device)  # left padded
    for r, (s, n) in enumerate(zip(starts_list, lengths_list)):
        new_ids[r, : n - s] = input_ids[r, s:n]
        new_labels[r, : n - s] = labels[r, s:n]
        suffix_mask[r, : n - s] = 1
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


def prompt_groups(
    input_ids: torch.Tensor, starts: torch.Tensor, persona_ids: torch.Tensor, mixtures: torch.Tensor | None
) -> tuple[list[int], torch.Tensor]:
    """Rows with the same prefix and persona (and mixture override, when given): one representative row per group
    and each row's group index (rows,)."""
    keys: dict[tuple, int] = {}
    representatives, group_of_row = [], []
    for r, s in enumerate(starts.tolist()):
        key = (tuple(input_ids[r, :s].tolist()), int(persona_ids[r]))
        if mixtures is not None:
            key += (tuple(mixtures[r].detach().float().tolist()),)
        if key not in keys:
            keys[key] = len(representatives)
            representatives.append(r)
        group_of_row.append(keys[key])
    return representatives, torch.tensor(group_of_row, device=input_ids.device)


def split_shared_prompt(
    body: nn.Module,
    cache: PrefixCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    starts: torch.Tensor,
    width: int,
    representatives: list[int],
    group_of_row: torch.Tensor,
    prompt_request: Callable[[list[int]], contextlib.AbstractContextManager],
    autocast_dtype: torch.dtype | None,
):
    """Run each group's prefix and soft prompt once (the prefix from ``cache``, the ``width`` virtual tokens with
    gradient, under ``prompt_request(representatives)``); return the rows' rest (ids, mask, labels) and the forward
    kwargs that put their group's key/value states before it.

    Each row's virtual tokens sit at ``starts[row]:starts[row] + width`` and nothing there or at the next position
    is a label (`can_share_prompt`), so the rest's loss is the row's whole loss.
    """
    device = input_ids.device
    # 1. the groups: prefix (cached, no gradient) + virtual tokens (with gradient), one row each
    reps = torch.tensor(representatives, device=device)
    rep_starts = starts[reps]  # (groups,)
    head_len = int(rep_starts.max()) + width
    head_ids = torch.zeros(len(representatives), head_len, dtype=input_ids.dtype, device=device)
    head_mask = torch.zeros_like(head_ids, dtype=attention_mask.dtype)  # (groups, prefix + width), right padded
    for g, (r, s) in enumerate(zip(representatives, rep_starts.tolist())):
        head_ids[g, : s + width], head_mask[g, : s + width] = input_ids[r, : s + width], 1
    kwargs: dict = {"use_cache": True}
    if bool((rep_starts > 0).any()):
        head_labels = torch.full_like(head_ids, IGNORE_INDEX)
        head_ids, head_mask, _, kwargs = split_prefix(
            body, cache, head_ids, head_mask, head_labels, rep_starts, autocast_dtype
        )  # head_ids (groups, width); head_mask (groups, prefix + width), prefixes left padded
    with prompt_request(representatives), autocast(device, autocast_dtype):
        out = body(input_ids=head_ids, attention_mask=head_mask, **kwargs)
    head_layers = cache_tensors(output_cache(out))  # per layer (groups, kv_heads, prefix + width, head_dim)
    # 2. the rows' rest, after their group's key/value states (index_select: the gradients sum back per group)
    rows = input_ids.shape[0]
    skip = starts + width  # (rows,) first position after the virtual tokens
    lengths = attention_mask.sum(-1)
    rest_len = int((lengths - skip).max())
    rest_ids = torch.zeros(rows, rest_len, dtype=input_ids.dtype, device=device)
    rest_labels = torch.full((rows, rest_len), IGNORE_INDEX, dtype=labels.dtype, device=device)
    rest_mask = torch.zeros(rows, rest_len, dtype=attention_mask.dtype, device=device)  # (rows, rest), right padded
    for r, (s, n) in enumerate(zip(skip.tolist(), lengths.tolist())):
        rest_ids[r, : n - s], rest_labels[r, : n - s], rest_mask[r, : n - s] = input_ids[r, s:n], labels[r, s:n], 1
    layers = [(k.index_select(0, group_of_row), v.index_select(0, group_of_row)) for k, v in head_layers]
    positions = skip[:, None] + torch.arange(rest_len, device=device)  # (rows, rest)
    mask = torch.cat([head_mask.index_select(0, group_of_row), rest_mask], dim=1)
    kwargs = {cache_kwarg(body): make_cache(layers), "position_ids": positions, "use_cache": True}
    return rest_ids, mask, rest_labels, kwargs


def can_share_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    starts: torch.Tensor,
    width: int,
    placeholder_id: int,
) -> bool:
    """True when every row has its ``width`` virtual tokens at ``starts``, no label there or right after them, and
    at least one token after them (what `split_shared_prompt` needs)."""
    if width < 1:
        return False
    offsets = starts[:, None] + torch.arange(width + 1, device=starts.device)  # (rows, width + 1)
    if int(offsets.max()) >= input_ids.shape[1] or bool((attention_mask.sum(-1) <= starts + width).any()):
        return False
    virtual = input_ids.gather(1, offsets[:, :width]) == placeholder_id
    return bool(virtual.all()) and bool((labels.gather(1, offsets) == IGNORE_INDEX).all())
