"""The training loss curve, with the stage switches marked."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

STAGE_KEY = "personamux_stage"  # log_history entries that mark a stage switch


def plot_loss_curve(log_history: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str | None:
    """Plot training (and eval) loss against the step, with stage switches as vertical lines. Returns the path."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone, renders with Agg

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        logger.info("No loss was logged (fewer steps than logging_steps?); no loss curve written.")
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    for entry in log_history:
        if STAGE_KEY in entry and entry["step"] > 0:
            ax.axvline(entry["step"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                entry[STAGE_KEY],
                (entry["step"], 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(3, 0),
                textcoords="offset points",
                va="top",
                fontsize=8,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token loss")
    ax.set_title(title or "Persona-Mux training")
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
