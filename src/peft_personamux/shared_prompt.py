"""Rows that share a prefix and a persona share the soft prompt's forward, and the template text after it.

`split_shared_prompt` runs each (prefix, persona) group's head once with gradient: the soft prompt's virtual tokens
and the tokens every row of the group has right after them (the chat template's system turn and instruction,
`shared_run_lengths`). The rows' rest runs on top of the head's key/value states (their gradients sum back to it),
right padded or packed into lines of one group's rows each (`line_layout` picks by FLOPs). A batch of many lines of one
persona (stage 2, persona-grouped stage-1 batches) so runs its 20 virtual tokens and its template text once.
"""

from __future__ import annotations

import contextlib
import heapq
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .compiled_layers import eager_body
from .inputs import IGNORE_INDEX
from .kv_cache import (
    PrefixCache,
    autocast,
    cache_kwarg,
    cache_tensors,
    make_cache,
    output_cache,
    rest_of_rows,
    split_prefix,
)


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
    *,
    common: list[int] | None = None,
    pack: str | None = None,
    always_pack: bool = False,
    run: Callable = eager_body,
):
    """Run each group's head once: its prefix (from ``cache``), the ``width`` virtual tokens and the ``common[g]``
    tokens all its rows have after them (with gradient, under ``prompt_request(representatives)``); return the rows'
    rest (ids, mask, labels), the forward kwargs that put their group's key/value states before it, and the row of
    each rest position (None: rest row r is row r).

    ``pack``: the attention implementation ("eager" or "sdpa") when the rows of a group may run packed into lines,
    end to end without padding between them, under a 4D mask that lets each row see its group's head and its own
    earlier tokens only; they do when that costs fewer FLOPs than right-padded rows (`line_layout`: packing drops
    the padding but lets each token's attention span its whole line, so a long group runs as several lines), or
    always with ``always_pack``. None: every row its own padded line. ``run(body, ids, mask, **kwargs)``: how the
    heads' forward runs (`compiled_layers.run_body` compiles it; default eager).

    Each row's virtual tokens sit at ``starts[row]:starts[row] + width`` and nothing there, in its group's common
    run or at the next position is a label (`can_share_prompt`, `shared_run_lengths`), so the rest's loss is the
    row's whole loss (and, packed, no row's first token is predicted from the row before it).
    """
    device = input_ids.device
    common = [0] * len(representatives) if common is None else common
    # 1. the groups: prefix (cached, no gradient) + virtual tokens and common run (with gradient), one row each
    reps = torch.tensor(representatives, device=device)
    rep_starts = starts[reps]  # (groups,)
    head_len = max(s + width + c for s, c in zip(rep_starts.tolist(), common))
    head_ids = torch.zeros(len(representatives), head_len, dtype=input_ids.dtype, device=device)
    head_mask = torch.zeros_like(head_ids, dtype=attention_mask.dtype)  # (groups, prefix + width + run), right padded
    for g, (r, s) in enumerate(zip(representatives, rep_starts.tolist())):
        end = s + width + common[g]
        head_ids[g, :end], head_mask[g, :end] = input_ids[r, :end], 1
    kwargs: dict = {"use_cache": True}
    if bool((rep_starts > 0).any()):
        head_labels = torch.full_like(head_ids, IGNORE_INDEX)
        head_ids, head_mask, _, kwargs = split_prefix(
            body, cache, head_ids, head_mask, head_labels, rep_starts, autocast_dtype
        )  # head_ids (groups, width + run); head_mask (groups, prefix + width + run), prefixes left padded
    with prompt_request(representatives), autocast(device, autocast_dtype):
        out = run(body, head_ids, head_mask, **kwargs)
    head_layers = cache_tensors(output_cache(out))  # per layer (groups, kv_heads, prefix + width + run, head_dim)
    # 2. the rows' rest, after their group's key/value states (index_select: the gradients sum back per group)
    runs = torch.tensor(common, device=device, dtype=starts.dtype).index_select(0, group_of_row)  # (rows,)
    skip = starts + width + runs  # (rows,) first position after the group's head
    lengths = attention_mask.sum(-1)
    layout = None if pack is None else line_layout(body, lengths - skip, group_of_row, head_mask.shape[1], always_pack)
    if layout is not None:
        group_of_line = torch.tensor([int(group_of_row[line[0]]) for line in layout], device=device)  # (lines,)
        packed = _pack_rest(input_ids, labels, skip, lengths, layout, head_mask.index_select(0, group_of_line))
        ids, mask, rest_labels, positions, row_of = packed
        if pack == "eager":  # additive, like transformers' own eager masks
            dtype = body.get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        layers = [(k.index_select(0, group_of_line), v.index_select(0, group_of_line)) for k, v in head_layers]
        kwargs = {cache_kwarg(body): make_cache(layers), "position_ids": positions, "use_cache": True}
        return ids, mask, rest_labels, kwargs, row_of
    rest_ids, rest_labels, rest_mask = rest_of_rows(input_ids, labels, attention_mask, skip)  # (rows, rest)
    rest_len = rest_ids.shape[1]
    layers = [(k.index_select(0, group_of_row), v.index_select(0, group_of_row)) for k, v in head_layers]
    positions = skip[:, None] + torch.arange(rest_len, device=device)  # (rows, rest)
    mask = torch.cat([head_mask.index_select(0, group_of_row), rest_mask], dim=1)
    kwargs = {cache_kwarg(body): make_cache(layers), "position_ids": positions, "use_cache": True}
    return rest_ids, mask, rest_labels, kwargs, None


_PAIR_COST: weakref.WeakKeyDictionary[nn.Module, float | None] = weakref.WeakKeyDictionary()


def _pair_cost(body: nn.Module) -> float | None:
    """FLOPs of one attention (query, key) pair, 4 x hidden (scores and weighted sum), in units of one token's pass
    through the decoder layers' weights (2 FLOPs per weight); None when the config does not say. Once per body."""
    if body not in _PAIR_COST:
        config = body.config
        layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
        cost = None
        if layers and hidden:
            # the embedding module's parameters (with Persona-Mux's codebook, bias and persona table when it wraps
            # it) are not weights a token meets in the layers
            embeddings = sum(p.numel() for p in body.get_input_embeddings().parameters())
            per_layer = (sum(p.numel() for p in body.parameters()) - embeddings) / layers  # weights one token meets
            cost = 4 * hidden / (2 * per_layer)
        _PAIR_COST[body] = cost
    return _PAIR_COST[body]


def _layout_cost(pair: float, lines: int, line_len: int, past: int) -> float:
    """Forward FLOPs of ``lines`` lines of ``line_len`` tokens after ``past`` head positions (`_pair_cost` units)."""
    return lines * line_len * (1 + pair * (past + line_len))


def _lines_of(spans: list[int], members: list[int], count: int) -> list[list[int]]:
    """``members`` (rows of one group) dealt into ``count`` lines, longest row first into the shortest line."""
    lines: list[list[int]] = [[] for _ in range(count)]
    heap = [(0, i) for i in range(count)]  # (tokens so far, line)
    for r in sorted(members, key=lambda r: -spans[r]):
        total, i = heapq.heappop(heap)
        lines[i].append(r)
        heapq.heappush(heap, (total + spans[r], i))
    return [sorted(line) for line in lines if line]


def line_layout(
    body: nn.Module, spans: torch.Tensor, group_of_row: torch.Tensor, past: int, always: bool = False
) -> list[list[int]] | None:
    """The rows of each group packed into lines (row indices per line; every line holds rows of one group), or
    None when one padded line per row costs the fewest forward FLOPs (`_pair_cost`) and ``always`` is off.

    Packing drops the padding between rows but lets each token's attention span its whole line, so long groups
    (stage 2's full batch of a persona's lines) run as several balanced lines of a few rows each rather than one:
    every group is split into ``ceil(rows / m)`` balanced lines for the ``m`` rows per line (a power of two, or
    the largest group's rows) that costs least.
    """
    pair = _pair_cost(body)
    if pair is None and not always:
        return None
    pair = pair or 0.0
    lengths = spans.tolist()
    groups: dict[int, list[int]] = {}
    for r, g in enumerate(group_of_row.tolist()):
        groups.setdefault(g, []).append(r)
    padded = _layout_cost(pair, len(lengths), max(lengths), past)
    largest = max(map(len, groups.values()))
    # rows per line: powers of two and the largest group (one row per line is the padded layout, run unpacked)
    candidates = sorted({*(2**i for i in range(1, largest.bit_length())), largest} - ({1} if not always else set()))
    best, best_cost = None, float("inf")
    for per_line in candidates:
        layout = [
            line for members in groups.values() for line in _lines_of(lengths, members, -(-len(members) // per_line))
        ]
        line_len = max(sum(lengths[r] for r in line) for line in layout)
        cost = _layout_cost(pair, len(layout), line_len, past)
        if cost < best_cost:
            best, best_cost = layout, cost
    return best if always or best_cost < padded else None


def _pack_rest(input_ids, labels, skip, lengths, layout: list[list[int]], head_mask):
    """The rows' tokens from ``skip`` on, end to end in the lines of ``layout`` (row indices per line; ``head_mask``
    (lines, head) is each line's group's). Returns ids, a boolean 4D mask (lines, 1, line, head + line) that lets
    each token see its group's head and its own row's earlier tokens, labels, position ids and the row of each
    position (-1: padding), all but the mask (lines, line)."""
    device, lines = input_ids.device, len(layout)
    spans = (lengths - skip).tolist()  # (rows,) tokens each row runs
    line_len = max(sum(spans[r] for r in members) for members in layout)
    ids = torch.zeros(lines, line_len, dtype=input_ids.dtype, device=device)
    rest_labels = torch.full((lines, line_len), IGNORE_INDEX, dtype=labels.dtype, device=device)
    positions = torch.zeros(lines, line_len, dtype=torch.long, device=device)
    row_of = torch.full((lines, line_len), -1, dtype=torch.long, device=device)
    for g, members in enumerate(layout):
        at = 0
        for r in members:
            s, n = int(skip[r]), int(lengths[r])
            ids[g, at : at + n - s], rest_labels[g, at : at + n - s] = input_ids[r, s:n], labels[r, s:n]
            positions[g, at : at + n - s] = torch.arange(s, n, device=device)
            row_of[g, at : at + n - s] = r
            at += n - s
    own_row = (row_of[:, :, None] == row_of[:, None, :]) & (row_of[:, :, None] >= 0)  # (lines, line, line)
    causal = torch.ones(line_len, line_len, dtype=torch.bool, device=device).tril()
    head = head_mask.bool()[:, None, :].expand(-1, line_len, -1)  # (lines, line, head); padding sees it too (no NaN)
    mask = torch.cat([head, own_row & causal], dim=-1)[:, None]  # (lines, 1, line, head + line)
    return ids, mask, rest_labels, positions, row_of


def shared_run_lengths(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    starts: torch.Tensor,
    width: int,
    group_of_row: torch.Tensor,
) -> list[int]:
    """Per group, how many tokens right after the virtual tokens all its rows share and `split_shared_prompt` may
    run once: none of them (nor the token after them) is a label, and every row keeps at least one token to run.

    Rows of one group share their prefix, so their virtual tokens start at the same position. A group of one row
    runs all it can in the head too: that pads the few groups' heads rather than every row's rest.
    """
    lengths = attention_mask.sum(-1)
    out = []
    for g in range(int(group_of_row.max()) + 1):
        rows = (group_of_row == g).nonzero()[:, 0]
        begin = int(starts[rows[0]]) + width
        limit = int(lengths[rows].min()) - begin - 1  # each row keeps >= 1 token after the run
        if limit < 1:
            out.append(0)
            continue
        ids = input_ids[rows, begin : begin + limit]  # (group rows, limit)
        same = (ids == ids[:1]).all(0)  # (limit,)
        free = (labels[rows, begin : begin + limit + 1] == IGNORE_INDEX).all(0)  # (limit + 1,)
        leading_same = int(same.int().cumprod(0).sum())
        leading_free = int(free.int().cumprod(0).sum())
        out.append(max(0, min(leading_same, leading_free - 1)))
    return out


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
