"""Data efficiency: held-out loss after fitting on the first n training lines of each character, for several n.

Every row is fitted on nested subsets (the first n lines of the same training split) with the fit of its row in the
evaluation: Persona-Mux with Fisher steps from zero (``fisher``) and with L-BFGS from the mean pretraining mixture
(``lbfgs``), the random codebook (``random``, for the learned/random gain ratio per size) and the 8-token soft prompt
(SP). The zero mixture needs no lines and is the reference line. Sizes above the split's ``num_train`` are skipped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .methods import SoftPrompts, encode_rows, persona_losses, zero_mixtures
from .metrics import gain_ratio, ratio_cell, summarize

logger = logging.getLogger(__name__)

# config name of a fit -> (key in the stage's result, label); "personamux" is the Fisher row's key since the start
FIT_ROWS = {
    "fisher": ("personamux", "Persona-Mux, Fisher from zero (64 weights)"),
    "lbfgs": ("personamux_lbfgs", "Persona-Mux, L-BFGS from the mean (64 weights)"),
    "random": ("random_codebook", "Random codebook (64 weights)"),
}
SP_ROW = ("sp", "Soft prompt (8 tokens)")


def first_lines(rows: Sequence[dict], personas: Sequence[str], n: int) -> list[dict]:
    """The first ``n`` rows of every persona, in the split's order (subsets are nested across n)."""
    kept, seen = [], dict.fromkeys(personas, 0)
    for row in rows:
        if seen.get(row["persona"], n) < n:
            kept.append(row)
            seen[row["persona"]] += 1
    return kept


def run_data_efficiency(
    evaluation,
    sizes: Sequence[int],
    fits: Sequence[str] = ("fisher",),
    partial: dict | None = None,
    save: Callable[[dict], None] | None = None,
    fitted: dict[str, dict[str, float]] | None = None,
) -> dict:
    """Per size: held-out loss per persona of each fit in ``fits`` (`FIT_ROWS`) and of SP; the zero mixture once.
    ``evaluation`` is a `runner.Evaluation` (models, split, formats). Each finished (row, size) is passed to ``save``
    and skipped when ``partial`` already holds it, so an interrupted curve continues where it stopped. ``fitted``
    holds rows (by key) already fitted the same way on every training line, the evaluation's own rows: at the size
    that is every line they are taken, not fitted again."""
    config, split, personas = evaluation.config, evaluation.split, evaluation.personas
    sizes = sorted({n for n in sizes if n <= config.num_train})
    out: dict = dict(partial or {})
    out["sizes"] = sizes
    keep = save or (lambda _: None)
    wanted = {FIT_ROWS[fit][0] for fit in fits} | {SP_ROW[0]}
    for n in sizes:  # a size that takes every training line of every persona is the evaluation's own split
        if len(first_lines(split.train, personas, n)) < len(split.train):
            continue
        for key, losses in (fitted or {}).items():
            if key in wanted and str(n) not in out.get(key, {}):
                out.setdefault(key, {})[str(n)] = dict(losses)
                logger.info("data efficiency: %s on %d lines is the evaluation's own row (every line)", key, n)
    model = evaluation.personamux()
    if "zero" not in out:
        zero_mixtures(model, personas)
        out["zero"] = evaluation.pm_losses(split.test, 1.0)
        keep(out)
    collator = evaluation.mux_collator(model)
    for fit in fits:
        key, label = FIT_ROWS[fit]
        method = config.random_codebook_method if fit == "random" else fit
        for n in sizes:
            if str(n) in out.get(key, {}):
                continue
            logger.info("data efficiency: %s on %d lines per character", label, n)
            with evaluation.random_codebook(model) if fit == "random" else contextlib.nullcontext():
                zero_mixtures(model, personas)
                rows = first_lines(split.train, personas, n)
                batch = {k: v.to(evaluation.device) for k, v in collator(rows).items()}
                evaluation.fit_unseen(model, batch, method)
                out.setdefault(key, {})[str(n)] = evaluation.pm_losses(split.test, 1.0)
            keep(out)
    zero_mixtures(model, personas)
    todo = [n for n in sizes if str(n) not in out.get("sp", {})]
    if todo:
        base, tokenizer = evaluation.base()
        prompts = SoftPrompts(base, config)
        nv = prompts.num_virtual_tokens
        for n in todo:
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
            out.setdefault("sp", {})[str(n)] = losses
            keep(out)
        del prompts
    return out


# data-efficiency key -> the evaluation stage that fits the same row on every training line
_STAGE_OF_ROW = {
    "personamux": "pm_fisher",
    "personamux_lbfgs": "pm_lbfgs",
    "random_codebook": "random_codebook",
    "sp": "sp",
}


def fitted_rows(stages: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Held-out losses (bias scale 1) of the evaluation's finished rows that the curve fits the same way, by key."""
    return {key: stages[stage]["heldout_loss"]["1.0"] for key, stage in _STAGE_OF_ROW.items() if stage in stages}


def data_efficiency_rows(stage: dict) -> list[tuple[str, str]]:
    """(key, label) of every fitted row ``stage`` holds, in `FIT_ROWS` order, SP last."""
    return [row for row in (*FIT_ROWS.values(), SP_ROW) if row[0] in stage]


def summarize_data_efficiency(stage: dict, personas: Sequence[str]) -> dict:
    """Mean held-out loss (95% CI) per row and size; with a random-codebook row, each Persona-Mux row's gain over
    the zero mixture divided by the random codebook's, per size (`metrics.gain_ratio`)."""
    out = {"sizes": stage["sizes"], "zero": summarize([stage["zero"].get(p) for p in personas])}
    for key, _ in data_efficiency_rows(stage):
        out[key] = {n: summarize([stage[key][n].get(p) for p in personas]) for n in stage[key]}
    if "random_codebook" in stage:
        out["gain_over_random"] = {
            key: {
                n: gain_ratio(stage["zero"], stage[key][n], stage["random_codebook"][n], personas)
                for n in stage[key]
                if n in stage["random_codebook"]
            }
            for key in ("personamux", "personamux_lbfgs")
            if key in stage
        }
    return out


def data_efficiency_markdown(summary: dict) -> list[str]:
    def cell(s: dict) -> str:
        return "n/a" if s is None or s["mean"] is None else f"{s['mean']:.3f} ± {s['ci95'] or 0:.3f}"

    sizes = [str(n) for n in summary["sizes"]]
    lines = ["| training lines | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for key, label in data_efficiency_rows(summary):
        lines.append(f"| {label} | " + " | ".join(cell(summary[key].get(n)) for n in sizes) + " |")
    lines.append("| Zero mixture (no lines) | " + " | ".join(cell(summary["zero"]) for _ in sizes) + " |")
    for key, by_size in summary.get("gain_over_random", {}).items():
        label = dict(FIT_ROWS.values())[key]
        cells = [ratio_cell(by_size[n]) if n in by_size else "n/a" for n in sizes]
        lines.append(f"| {label}: gain / random codebook's gain | " + " | ".join(cells) + " |")
    return lines


def plot_data_efficiency(summary: dict, path: str | Path) -> str:
    series = {label: summary[key] for key, label in data_efficiency_rows(summary)}
    zero = summary["zero"]["mean"]
    return plot_size_curves(series, summary["sizes"], "held-out token loss", path, reference=zero)


def plot_size_curves(
    series: dict[str, dict[str, dict]], sizes: Sequence[int], ylabel: str, path: str | Path, reference: float | None
) -> str:
    """One line per label of ``series`` (size as str -> {"mean", "ci95"}) over training lines (log axis), with 95% CI
    bars, and the zero mixture's level ``reference`` as a dashed line (None: none)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for label, by_size in series.items():
        shown = [n for n in sizes if str(n) in by_size]
        means = [by_size[str(n)]["mean"] for n in shown]
        errors = [by_size[str(n)]["ci95"] or 0.0 for n in shown]
        ax.errorbar(shown, means, yerr=errors, marker="o", capsize=3, label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label="zero mixture")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("training lines per character")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)
