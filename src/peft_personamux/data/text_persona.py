"""Text personas: a two-sentence description of each persona, written by a causal LM from a few of its lines.

Descriptions are cached in a JSON file ``{persona: description}``: existing entries are reused, only missing
personas are generated, and the file is rewritten atomically after each one, so an interrupted run resumes. The
cache is keyed by persona name only; delete the file (or its entries) to regenerate with another model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..files import write_json
from .common import column, normalize_whitespace
from .errors import DataFormatError

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Here are lines spoken by {name}:\n{lines}\n\nDescribe {name}'s personality in two sentences."


def persona_display_name(persona: str) -> str:
    """``"macbeth/lady_macbeth"`` -> ``"Lady Macbeth"``."""
    return persona.rsplit("/", 1)[-1].replace("_", " ").title()


def sample_lines(responses: list[str], num_lines: int) -> list[str]:
    """``num_lines`` responses spread evenly over the persona's examples (deterministic; all if fewer)."""
    if len(responses) <= num_lines:
        return list(responses)
    return [responses[i] for i in np.linspace(0, len(responses) - 1, num_lines).round().astype(int)]


def build_prompt(persona: str, lines: list[str]) -> str:
    """The instruction shown to the describing model."""
    return PROMPT_TEMPLATE.format(name=persona_display_name(persona), lines="\n".join(f"- {line}" for line in lines))


def _load_cache(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    expected = "a JSON object {persona: description} (delete the file to regenerate it)"
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, expected, e.msg) from e
    if not isinstance(cache, dict) or not all(isinstance(v, str) for v in cache.values()):
        raise DataFormatError(path, 1, expected, type(cache).__name__)
    return cache


@torch.inference_mode()
def _generate(model, tokenizer, prompt: str, generation_config: GenerationConfig) -> str:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    output = model.generate(**inputs, generation_config=generation_config)  # (1, prompt_len + new_tokens)
    return normalize_whitespace(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def describe_personas(
    model,
    tokenizer,
    ds: Dataset,
    cache_path: str | os.PathLike,
    num_lines: int = 6,
    max_new_tokens: int = 64,
    personas: list[str] | None = None,
) -> dict[str, str]:
    """Return ``{persona: description}`` for ``personas`` (default: all in ``ds``), generating only uncached ones.

    Each description is the greedy continuation of `PROMPT_TEMPLATE` filled with ``num_lines`` of the persona's
    responses, wrapped in the tokenizer's chat template when it has one.
    """
    for name, value in [("num_lines", num_lines), ("max_new_tokens", max_new_tokens)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    responses: dict[str, list[str]] = {}
    for persona, response in zip(column(ds, "persona"), column(ds, "response")):
        responses.setdefault(persona, []).append(response)
    wanted = sorted(responses) if personas is None else list(dict.fromkeys(personas))
    unknown = [p for p in wanted if p not in responses]
    if unknown:
        raise ValueError(f"Personas {unknown[:5]} are not in the dataset; pick `personas` from its 'persona' column.")

    path = Path(cache_path)
    cache = _load_cache(path)
    missing = [p for p in wanted if p not in cache]
    logger.info("Text personas: %d cached in %s, %d to generate.", len(wanted) - len(missing), path, len(missing))
    if missing:
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        was_training = model.training
        model.eval()  # no dropout: the same model gives the same descriptions
        try:
            for persona in tqdm(missing, desc="Describing personas"):
                prompt = build_prompt(persona, sample_lines(responses[persona], num_lines))
                cache[persona] = _generate(model, tokenizer, prompt, generation_config)
                if not cache[persona]:
                    logger.warning("The model wrote an empty description for %s.", persona)
                write_json(path, cache, sort_keys=True)
        finally:
            model.train(was_training)
    return {p: cache[p] for p in wanted}
