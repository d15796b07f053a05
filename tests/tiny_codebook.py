"""A tiny random base model and a Persona-Mux codebook with a few personas, saved as `personamux pretrain` would.

Shared by test_serve.py and test_chat.py. The end-of-turn token's output row is zeroed so that greedy answers run
to their length limit instead of stopping at a random first token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_collator import make_model, make_tokenizer

PERSONAS = [f"play/p{i}" for i in range(8)] + ["other/solo"]


def make_codebook(root: Path, personas: list[str] = PERSONAS, seed: int = 0) -> tuple[Path, Path]:
    """``(model_dir, codebook_dir)`` under ``root``."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=seed)
    torch.manual_seed(seed)
    model.add_personas(personas, mixtures=torch.randn(len(personas), 4) * 2)
    base = model.get_base_model()
    with torch.no_grad():
        base.lm_head.weight[tokenizer.eos_token_id] = 0
    model_dir, codebook_dir = root / "tiny", root / "codebook"
    model.save_pretrained(codebook_dir)
    (codebook_dir / "text_personas.json").write_text(json.dumps({personas[0]: "A grumpy old king."}))
    model.unload().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, codebook_dir
