"""A served codebook: the base model with a Persona-Mux adapter, its persona files and how it was prompted.

``personamux chat`` and ``personamux serve`` load a codebook folder written by ``personamux pretrain`` (or the
shipped Shakespeare one) the same way: the base model, the adapter, every persona file, and the instruction and
text personas recorded beside them, so that prompts are formatted as in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .files import PRETRAIN_INFO_NAME, TEXT_PERSONAS_NAME, is_codebook_dir, read_json
from .models import load_base_model, shakespeare_codebook_dir
from .persona_files import list_persona_files
from .prompting import DEFAULT_INSTRUCTION

logger = logging.getLogger(__name__)


@dataclass
class CodebookInfo:
    """How the codebook's personas were prompted in training."""

    directory: Path
    instruction: str = DEFAULT_INSTRUCTION
    text_personas: dict[str, str] = field(default_factory=dict)  # persona -> description


def resolve_codebook_dir(path: str | None, shipped: Path | None = None) -> Path:
    """``path``, or the shipped codebook (``shipped``, default the Shakespeare one), when it holds an adapter; else
    ``FileNotFoundError`` that says what to pass, or how to make the shipped one."""
    directory = Path(path) if path else shipped or shakespeare_codebook_dir()
    if not is_codebook_dir(directory):
        hint = (
            "The shipped Shakespeare codebook is not in this installation yet: make one with `personamux pretrain "
            f"--output_dir {directory}`, or run `personamux demo --from-scratch`."
            if path is None
            else "Pass --codebook with a folder written by `personamux pretrain` (adapter_config.json, "
            "adapter_model.safetensors, personas/)."
        )
        raise FileNotFoundError(f"No Persona-Mux codebook in {directory}. {hint}")
    return directory


def read_codebook_info(directory: str | Path) -> CodebookInfo:
    directory = Path(directory)
    info, texts = read_json(directory / PRETRAIN_INFO_NAME), read_json(directory / TEXT_PERSONAS_NAME)
    return CodebookInfo(directory, info.get("instruction") or DEFAULT_INSTRUCTION, dict(texts))


def load_codebook_model(directory: str | Path, model_name_or_path: str | None = None, dtype: str = "auto"):
    """``(model, tokenizer)``: the base model with the codebook's adapter and every persona file registered."""
    from peft import PeftModel

    import peft_personamux  # noqa: F401  (registers the method with peft)

    base, tokenizer = load_base_model(model_name_or_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(directory))
    model.eval()
    for name in list_persona_files(directory):
        model.load_persona(name, activate=False)
    logger.info("Codebook %s: %d personas.", directory, len(model.personas))
    return model, tokenizer
