"""Data efficiency: held-out loss after fitting on the first n training lines of each character, for several n.

Persona-Mux (64 weights, Fisher fit from zero on the learned codebook) and the 8-token soft prompt (SP) are fitted
on nested subsets (the first n lines of the same training split); the zero mixture needs no lines and is the
reference line. Sizes above the split's ``num_train`` are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .methods import SoftPrompts, encode_rows, persona_losses, zero_mixtures
from .metrics import summarize

logger = logging.getLogger(__name__)


def first_lines(rows: Sequence[dict], personas: Sequence[str], n: int) -> list[dict]:
    """The first ``n`` rows of every persona, in the split's order (subsets are nested across n)."""
    kept, seen = [], dict.fromkeys(personas, 0)
    for row in rows:
        if seen.get(row["persona"], n) < n:
            kept.append(row)
            seen[row["persona"]] += 1
    return kept


def run_data_efficiency(evaluation, sizes: Sequence[int]) -> dict:
    """Per size: held-out loss per persona of Persona-Mux and SP; the zero mixture once. ``evaluation`` is a
    `runner.Evaluation` (models, split, formats)."""
    from ..fitting import fit_mixtures

    config, split, personas = evaluation.config, evaluation.split, evaluation.personas
    sizes = sorted({n for n in sizes if n <= config.num_train})
    model = evaluation.personamux()
    zero_mixtures(model, personas)
    out: dict = {"sizes": sizes, "zero": evaluation.pm_losses(split.test, 1.0), "personamux": {}, "sp": {}}
    collator = evaluation.mux_collator(model)
    for n in sizes:
        rows = first_lines(split.train, personas, n)
        zero_mixtures(model, personas)
        batch = {k: v.to(evaluation.device) for k, v in collator(rows).items()}
        fit_mixtures(
            model,
            batch,
            method="fisher",
            steps=config.fisher_steps,
            damping=config.fisher_damping,
            chunk_size=config.fit_chunk_size,
            bias_scale=1.0,
        )
        out["personamux"][str(n)] = evaluation.pm_losses(split.test, 1.0)
    zero_mixtures(model, personas)
    base, tokenizer = evaluation.base()
    prompts = SoftPrompts(base, config)
    nv = prompts.num_virtual_tokens
    for n in sizes:
        losses = {}
        for persona in tqdm(personas, desc=f"data efficiency: SP on {n} lines"):
            formats = evaluation.plain_formats([persona])
            train = first_lines(split.rows_of("train", persona), [persona], n)
            seed = SoftPrompts.seed_for(config, persona)
            prompts.fit(encode_rows(tokenizer, train, formats, evaluation.placeholder_id, config), seed)
            test = split.rows_of("test", persona)
            losses.update(
                persona_losses(prompts.model, tokenizer, test, formats, evaluation.placeholder_id, config, nv)
            )
        out["sp"][str(n)] = losses
    del prompts
    return out


def summarize_data_efficiency(stage: dict, personas: Sequence[str]) -> dict:
    """Mean held-out loss (95% CI) per method and size."""
    return {
        "sizes": stage["sizes"],
        "zero": summarize([stage["zero"].get(p) for p in personas]),
        **{
            method: {n: summarize([stage[method][n].get(p) for p in personas]) for n in stage[method]}
            for method in ("personamux", "sp")
        },
    }


def data_efficiency_markdown(summary: dict) -> list[str]:
    def cell(s: dict) -> str:
        return "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['ci95'] or 0:.3f}"

    sizes = [str(n) for n in summary["sizes"]]
    lines = ["| training lines | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    lines.append("| Persona-Mux (64 weights) | " + " | ".join(cell(summary["personamux"][n]) for n in sizes) + " |")
    lines.append("| Soft prompt (8 tokens) | " + " | ".join(cell(summary["sp"][n]) for n in sizes) + " |")
    lines.append("| Zero mixture (no lines) | " + " | ".join(cell(summary["zero"]) for _ in sizes) + " |")
    return lines


def plot_data_efficiency(summary: dict, path: str | Path) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    sizes = summary["sizes"]
    for method, label in (("personamux", "Persona-Mux (64 weights)"), ("sp", "soft prompt (8 tokens)")):
        means = [summary[method][str(n)]["mean"] for n in sizes]
        errors = [summary[method][str(n)]["ci95"] or 0.0 for n in sizes]
        ax.errorbar(sizes, means, yerr=errors, marker="o", capsize=3, label=label)
    if summary["zero"]["mean"] is not None:
        ax.axhline(summary["zero"]["mean"], color="grey", linestyle="--", label="zero mixture")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("training lines per character")
    ax.set_ylabel("held-out token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)
