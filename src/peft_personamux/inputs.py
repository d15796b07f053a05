"""Text -> token ids with a persona placeholder -> token ids with room for the soft prompt.

The soft prompt goes where the placeholder is: right after the text persona description. Text carries the
marker ``PERSONA_PLACEHOLDER``; `encode_with_placeholder` turns it into one ``placeholder_token_id``. Before the
model runs, `insert_virtual_tokens` widens that one id into ``num_virtual`` ids (or inserts them first in the row
when a row has none), fixing attention masks and labels, and re-padding rows on the batch's padding side. The
embedding layer then swaps the placeholder ids for the soft-prompt vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PERSONA_PLACEHOLDER = "<|persona|>"
IGNORE_INDEX = -100  # label of tokens the loss skips (prompt, padding, soft prompt)


def encode_with_placeholder(
    tokenizer, text: str, placeholder_token_id: int, add_special_tokens: bool = False
) -> list[int]:
    """Tokenise ``text``; each ``PERSONA_PLACEHOLDER`` marker becomes one ``placeholder_token_id``."""
    parts = text.split(PERSONA_PLACEHOLDER)
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i > 0:
            ids.append(placeholder_token_id)
        if part:
            ids.extend(tokenizer(part, add_special_tokens=add_special_tokens and i == 0)["input_ids"])
    return ids


@dataclass
class Expanded:
    """Model inputs after insertion, and what is needed to map generated sequences back."""

    input_ids: torch.Tensor  # (batch, new_len)
    attention_mask: torch.Tensor  # (batch, new_len)
    labels: torch.Tensor | None  # (batch, new_len), -100 over virtual tokens
    left_padded: bool


def _padding_side(attention_mask: torch.Tensor, default: str) -> bool:
    """True when the batch is left padded."""
    has_pad = bool((attention_mask == 0).any())
    if not has_pad:
        return default == "left"
    left = bool((attention_mask[:, -1] == 1).all())
    right = bool((attention_mask[:, 0] == 1).all())
    if left and not right:
        return True
    if right and not left:
        return False
    return default == "left"


def insert_virtual_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    placeholder_token_id: int,
    num_virtual: int,
    default_padding_side: str = "right",
    pad_token_id: int | None = None,
) -> Expanded:
    """Give every row exactly ``num_virtual`` contiguous placeholder ids.

    Per row, among attended tokens: one placeholder is widened to ``num_virtual``; a row with none gets them first
    (after any left padding); a row that already has a contiguous run of ``num_virtual`` is kept. ``num_virtual=0``
    removes placeholders (adapter disabled). Anything else raises ``ValueError``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    left = _padding_side(attention_mask, default_padding_side)
    rows_ids, rows_labels = [], []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        ids = input_ids[row][keep]
        lab = labels[row][keep] if labels is not None else None
        is_ph = ids == placeholder_token_id
        count = int(is_ph.sum())
        if count == num_virtual and (count == 0 or _is_contiguous(is_ph)):
            new_ids, new_lab = ids, lab
        elif count <= 1:
            at = int(is_ph.nonzero()[0, 0]) if count == 1 else 0
            virtual = ids.new_full((num_virtual,), placeholder_token_id)
            new_ids = torch.cat([ids[:at], virtual, ids[at + count :]])
            if lab is not None:
                new_lab = torch.cat([lab[:at], lab.new_full((num_virtual,), IGNORE_INDEX), lab[at + count :]])
        else:
            raise ValueError(
                f"Row {row} has {count} persona placeholder tokens (id {placeholder_token_id}); expected at most one "
                f"(where the soft prompt goes) or a run of exactly {num_virtual}. Check that the text has a single "
                "PERSONA_PLACEHOLDER and that the placeholder id is not an ordinary token of your data."
            )
        if lab is not None:
            new_lab = torch.where(new_ids == placeholder_token_id, new_lab.new_full((), IGNORE_INDEX), new_lab)
        rows_ids.append(new_ids)
        rows_labels.append(new_lab if lab is not None else None)

    length = max(len(r) for r in rows_ids)
    batch = input_ids.shape[0]
    pad_id = _pad_value(input_ids, attention_mask, placeholder_token_id, pad_token_id)
    out_ids = input_ids.new_full((batch, length), pad_id)
    out_mask = attention_mask.new_zeros((batch, length))
    out_labels = labels.new_full((batch, length), IGNORE_INDEX) if labels is not None else None
    for row, ids in enumerate(rows_ids):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        out_ids[row, span] = ids
        out_mask[row, span] = 1
        if out_labels is not None:
            out_labels[row, span] = rows_labels[row]
    return Expanded(out_ids, out_mask, out_labels, left)


def _pad_value(input_ids, attention_mask, placeholder_token_id: int, pad_token_id: int | None) -> int:
    """A padding id that is never the placeholder (the embedding layer cannot see the attention mask)."""
    if pad_token_id is not None and pad_token_id != placeholder_token_id:
        return pad_token_id
    padded = input_ids[attention_mask == 0]
    padded = padded[padded != placeholder_token_id]
    if padded.numel():
        return int(padded[0])
    return 0 if placeholder_token_id != 0 else 1


def _is_contiguous(mask: torch.Tensor) -> bool:
    idx = mask.nonzero().flatten()
    return bool(idx[-1] - idx[0] + 1 == idx.numel())


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: ``cumsum(mask) - 1``, clamped at 0. Shape (batch, seq_len)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
