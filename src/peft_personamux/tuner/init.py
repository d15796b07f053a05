"""Initial values of the codebook ``W`` and the bias tokens ``b``, and the default placeholder id."""

from __future__ import annotations

import torch
from torch import nn

from .config import PersonaMuxConfig, PersonaMuxInit, safe_tokenizer_kwargs


def default_placeholder_id(model: nn.Module, vocab_size: int) -> int:
    """The largest vocabulary id that is not a special token the model uses for bos/eos/padding."""
    special: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(cfg, key, None)
            special.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return next(i for i in range(vocab_size - 1, -1, -1) if i not in special)


def init_rows(init: PersonaMuxInit, rows: int, embedding: nn.Module, config: PersonaMuxConfig) -> torch.Tensor:
    """``rows`` initial vectors (rows, hidden) in the space the embedding layer outputs."""
    weight = embedding.weight
    vocab_size = weight.shape[0]
    device = weight.device
    with torch.no_grad():
        if init is PersonaMuxInit.TEXT:
            from transformers import AutoTokenizer

            kwargs = safe_tokenizer_kwargs(config.tokenizer_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"`init_text` {config.init_text!r} has no tokens.")
            ids = torch.tensor((ids * (rows // len(ids) + 1))[:rows], device=device)
            return embedding(ids).float()
        if init is PersonaMuxInit.SAMPLE_VOCAB:
            return embedding(torch.randint(0, vocab_size, (rows,), device=device)).float()
        sample = embedding(torch.randint(0, vocab_size, (min(vocab_size, 4096),), device=device)).float()
        std = sample.std().item() * config.init_std_scale
        return torch.randn(rows, weight.shape[1], device=device) * std  # (rows, hidden)
