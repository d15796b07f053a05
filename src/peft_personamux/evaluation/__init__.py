"""Evaluation harness: Base, ICL, LoRA, soft prompts and Persona-Mux (adam, fisher, bias scales, random codebook)
trained and scored on one split, as in the paper's Tables 2 and 4-7. See docs/evaluation.md.

Entry points: `run_evaluation(config) -> dict` (what results.json holds) and `main(argv)` (``personamux evaluate``).
"""

from .command import main
from .config import EvalConfig, load_config
from .judge import Judge
from .metrics import (
    WhoSaidIt,
    discrimination_context,
    discrimination_trial,
    generated_is_caught,
    pick_fake,
    summarize,
)
from .runner import run_evaluation

__all__ = [
    "EvalConfig",
    "Judge",
    "WhoSaidIt",
    "discrimination_context",
    "discrimination_trial",
    "generated_is_caught",
    "load_config",
    "main",
    "pick_fake",
    "run_evaluation",
    "summarize",
]
