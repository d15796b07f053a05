"""``personamux evaluate``: the paper's comparison from one JSON config plus flags (parser in
`peft_personamux.evaluation.command`, so that ``python examples/evaluate.py`` takes the same flags)."""

from __future__ import annotations

from collections.abc import Sequence

from .common import Command


def evaluate(argv: Sequence[str]) -> int:
    """Reproduce the paper's comparison (Base, ICL, LoRA, SP, Persona-Mux, random W)."""
    from ..evaluation.command import main

    return main(argv)


COMMAND = Command("evaluate", evaluate, None)
