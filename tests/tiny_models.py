"""Tiny random causal LMs built from a config in code (no hub)."""

from __future__ import annotations

import torch

VOCAB = 128
ARCHS = ["llama", "qwen2", "gpt2"]
DTYPES = [torch.float32, torch.bfloat16]


def make_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 2-layer, 32-wide random model of the given family."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    else:  # pragma: no cover
        raise ValueError(arch)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()
