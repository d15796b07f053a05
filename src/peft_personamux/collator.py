"""Prompt text -> token ids with one placeholder, labels on the response only, and padded batches.

`PersonaMuxCollator` turns dataset rows (``persona``, ``prompt``, ``response``; optional ``text_persona`` or an
integer ``persona_ids``) into ``input_ids``, ``attention_mask``, ``labels`` and ``persona_ids`` for a
Persona-Mux model. Rows are right padded; `build_generation_inputs` left pads prompts for ``generate``. The model
widens the single placeholder id into the soft prompt itself (``peft_personamux.inputs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .inputs import IGNORE_INDEX, encode_with_placeholder
from .prompting import DEFAULT_INSTRUCTION, format_example, has_chat_template

logger = logging.getLogger(__name__)

_MAX_TRUNCATION_ROUNDS = 16  # decode/re-encode may shift token counts by a few; each round cuts at least one


@dataclass
class EncodedExample:
    input_ids: list[int]  # prompt then response
    labels: list[int]  # IGNORE_INDEX over the prompt, token ids over the response


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(
    tokenizer,
    prompt: str,
    placeholder_token_id: int,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = None,
    use_chat_template: bool | None = None,
) -> list[int]:
    """Token ids of the formatted prompt, at most ``max_prompt_tokens`` long (the placeholder counts as one).

    Too long a prompt is cut in its longer text part first, until both parts are as long, then in both evenly: the
    start of ``prompt`` goes (the end is what the response answers) and the end of the text persona (down to one
    token, so that the placeholder keeps its place). The template, the placeholder and the instruction are never
    cut; if they alone exceed the limit, a warning is logged and the ids are returned.
    """
    _check_limit("max_prompt_tokens", max_prompt_tokens)
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    # a chat template writes its own special tokens (bos included); the plain format lets the tokenizer add them
    add_special = not use_chat_template

    def encode(prompt_text: str, persona_text: str | None) -> list[int]:
        formatted = format_example(tokenizer, prompt_text, None, persona_text, instruction, use_chat_template)
        return encode_with_placeholder(tokenizer, formatted.prompt, placeholder_token_id, add_special)

    ids = encode(prompt, text_persona)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return ids
    prompt_ids = _tokens(tokenizer, prompt)
    persona_ids = _tokens(tokenizer, text_persona.strip()) if text_persona and text_persona.strip() else []
    for _ in range(_MAX_TRUNCATION_ROUNDS):
        over = len(ids) - max_prompt_tokens
        if over <= 0:
            return ids
        keep_prompt, keep_persona = _share(
            len(prompt_ids), len(persona_ids), len(prompt_ids) + len(persona_ids) - over
        )
        keep_persona = max(keep_persona, min(1, len(persona_ids)))  # the placeholder stays after the persona
        if (keep_prompt, keep_persona) == (len(prompt_ids), len(persona_ids)):
            break  # nothing left to cut
        prompt_ids, persona_ids = prompt_ids[len(prompt_ids) - keep_prompt :], persona_ids[:keep_persona]
        prompt = tokenizer.decode(prompt_ids)
        text_persona = tokenizer.decode(persona_ids) if persona_ids else None
        ids = encode(prompt, text_persona)
    if len(ids) > max_prompt_tokens:
        logger.warning(
            "A prompt has %d tokens after truncating its text, over max_prompt_tokens=%d: the chat template and the "
            "instruction alone are that long. Raise max_prompt_tokens.",
            len(ids),
            max_prompt_tokens,
        )
    return ids


def _share(first: int, second: int, total: int) -> tuple[int, int]:
    """Lengths to keep of two parts so that they sum to ``total``, cutting the longer part first."""
    total = max(total, 0)
    if total >= first + second:
        return first, second
    short = min(first, second)
    if total >= 2 * short:  # cutting the longer part alone is enough
        return (total - short, short) if first >= second else (short, total - short)
    return total - total // 2, total // 2  # both parts cut to the same length (the first keeps the odd token)


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    placeholder_token_id: int,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    use_chat_template: bool | None = None,
) -> EncodedExample:
    """Prompt and response ids with labels on the response only. A response over the limit loses its end."""
    _check_limit("max_response_tokens", max_response_tokens)
    prompt_ids = encode_prompt(
        tokenizer, prompt, placeholder_token_id, text_persona, instruction, max_prompt_tokens, use_chat_template
    )
    formatted = format_example(tokenizer, prompt, response, text_persona, instruction, use_chat_template)
    response_ids = _tokens(tokenizer, formatted.response)[:max_response_tokens]
    return EncodedExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def _pad_id(tokenizer, placeholder_token_id: int) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0, 1):
        if candidate is not None and candidate != placeholder_token_id:
            return candidate
    raise AssertionError("unreachable: 0 and 1 cannot both be the placeholder")


def _pad(rows: Sequence[list[int]], value: int, length: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)  # (batch, length)
    for i, row in enumerate(rows):
        if row:
            span = slice(length - len(row), length) if left else slice(0, len(row))
            out[i, span] = torch.tensor(row, dtype=torch.long)
    return out


def _padded_length(rows: Sequence[list[int]], multiple: int | None) -> int:
    length = max((len(r) for r in rows), default=0)
    if multiple:
        length = -(-length // multiple) * multiple
    return length


@dataclass
class PersonaMuxCollator:
    """Collate persona dataset rows into right-padded training batches.

    Each row needs ``prompt``, ``response`` and either ``persona`` (a name looked up with ``persona_index``) or
    ``persona_ids`` (a table row). A row's ``text_persona`` field, or ``text_personas[persona]``, adds a text
    description before the placeholder. Build one for a model with `PersonaMuxCollator.for_model`.
    """

    tokenizer: Any
    placeholder_token_id: int
    persona_index: Callable[[str], int] | Mapping[str, int] | None = None  # e.g. model.persona_index
    text_personas: Mapping[str, str] | None = None  # persona name -> text description
    instruction: str = DEFAULT_INSTRUCTION
    max_prompt_tokens: int | None = 256  # the prompt's start is cut first, never the placeholder
    max_response_tokens: int | None = 128  # labels beyond this are dropped
    use_chat_template: bool | None = None  # None: the tokenizer's chat template when it has one
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        _check_limit("max_prompt_tokens", self.max_prompt_tokens)
        _check_limit("max_response_tokens", self.max_response_tokens)
        _check_limit("pad_to_multiple_of", self.pad_to_multiple_of)
        if not isinstance(self.placeholder_token_id, int) or self.placeholder_token_id < 0:
            raise ValueError(f"`placeholder_token_id` must be a vocabulary id, got {self.placeholder_token_id!r}.")

    @classmethod
    def for_model(cls, model, tokenizer, **kwargs) -> PersonaMuxCollator:
        """A collator using ``model``'s placeholder id and persona table (a PeftModel or the tuner)."""
        config = model.adapter_config()
        kwargs.setdefault("persona_index", model.persona_index)
        return cls(tokenizer=tokenizer, placeholder_token_id=config.placeholder_token_id, **kwargs)

    def text_persona(self, feature: Mapping[str, Any]) -> str | None:
        text = feature.get("text_persona")
        if text is None and self.text_personas is not None and "persona" in feature:
            text = self.text_personas.get(feature["persona"])
        return text or None

    def persona_row(self, feature: Mapping[str, Any]) -> int:
        if feature.get("persona_ids") is not None:
            return int(feature["persona_ids"])
        name = feature.get("persona")
        if name is None:
            raise ValueError(f"A row has neither `persona` nor `persona_ids`: keys {sorted(feature)}.")
        if self.persona_index is None:
            raise ValueError(
                "Rows name their persona, but the collator has no `persona_index`: pass "
                "`persona_index=model.persona_index`, or use PersonaMuxCollator.for_model(model, tokenizer)."
            )
        if callable(self.persona_index):
            return int(self.persona_index(name))
        try:
            return int(self.persona_index[name])
        except KeyError:
            raise KeyError(f"Persona {name!r} is not in the collator's `persona_index` mapping.") from None

    def encode(self, feature: Mapping[str, Any]) -> EncodedExample:
        missing = [k for k in ("prompt", "response") if k not in feature]
        if missing:
            raise ValueError(f"A row lacks {missing}; rows need `prompt` and `response` (keys: {sorted(feature)}).")
        return encode_example(
            self.tokenizer,
            feature["prompt"] or "",
            feature["response"] or "",
            self.placeholder_token_id,
            self.text_persona(feature),
            self.instruction,
            self.max_prompt_tokens,
            self.max_response_tokens,
            self.use_chat_template,
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(f) for f in features]
        length = _padded_length([e.input_ids for e in encoded], self.pad_to_multiple_of)
        pad_id = _pad_id(self.tokenizer, self.placeholder_token_id)
        return {
            "input_ids": _pad([e.input_ids for e in encoded], pad_id, length, left=False),  # (batch, length)
            "attention_mask": _pad([[1] * len(e.input_ids) for e in encoded], 0, length, left=False),
            "labels": _pad([e.labels for e in encoded], IGNORE_INDEX, length, left=False),
            "persona_ids": torch.tensor([self.persona_row(f) for f in features], dtype=torch.long),  # (batch,)
        }


def build_generation_inputs(
    tokenizer,
    prompts: str | Sequence[str],
    text_personas: str | Sequence[str | None] | None,
    placeholder_token_id: int,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = None,
    use_chat_template: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for ``model.generate`` (same format as training).

    ``text_personas`` is one description for every prompt, one per prompt, or None.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if text_personas is None or isinstance(text_personas, str):
        text_personas = [text_personas] * len(prompts)
    if len(text_personas) != len(prompts):
        raise ValueError(f"Got {len(text_personas)} text personas for {len(prompts)} prompts.")
    rows = [
        encode_prompt(tokenizer, p, placeholder_token_id, t, instruction, max_prompt_tokens, use_chat_template)
        for p, t in zip(prompts, text_personas)
    ]
    length = _padded_length(rows, None)
    return {
        "input_ids": _pad(rows, _pad_id(tokenizer, placeholder_token_id), length, left=True),  # (batch, length)
        "attention_mask": _pad([[1] * len(r) for r in rows], 0, length, left=True),
    }
