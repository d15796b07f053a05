"""Serving with an existing engine: input embeddings with the soft prompt in place (e.g. vLLM ``prompt_embeds``)."""

from __future__ import annotations

import torch

from .tuner.model import as_tuner, persona_method


@persona_method
@torch.no_grad()
def export_prompt_embeds(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    persona_ids=None,
    bias_scale: float | None = None,
) -> list[torch.Tensor]:
    """Per row, the input embeddings the model itself would see, soft prompt included.

    Returns a list (one entry per row, padding removed) of ``(seq_len_i, hidden)`` tensors in the model's dtype:
    the form vLLM accepts as ``{"prompt_embeds": tensor}`` when started with ``enable_prompt_embeds=True``.
    ``seq_len_i`` is the row's real length plus the virtual tokens (minus the placeholder, when there is one).
    """
    tuner = as_tuner(model)
    prepared = tuner.prepare(input_ids, attention_mask, None, persona_ids, bias_scale, "left")
    with tuner.prompt_request(prepared.persona_ids, prepared.bias_scale):  # adapter disabled: plain embeddings
        embeds = tuner.model.get_input_embeddings()(prepared.input_ids)  # (batch, seq, hidden)
    mask = prepared.attention_mask.bool()
    return [embeds[row][mask[row]] for row in range(embeds.shape[0])]


def to_base64(prompt_embeds: torch.Tensor) -> str:
    """Encode one ``(seq_len, hidden)`` tensor as vLLM's OpenAI-compatible server expects in ``prompt_embeds``.

    The server decodes base64 of a ``torch.save``-d tensor (``vllm serve ... --enable-prompt-embeds``).
    """
    import base64
    import io

    if prompt_embeds.dim() != 2:
        raise ValueError(f"prompt_embeds must be (seq_len, hidden), got shape {tuple(prompt_embeds.shape)}.")
    buffer = io.BytesIO()
    torch.save(prompt_embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
