"""Rendering of the evaluation: results.json, generations.json, results.md (tables) and the plots. Only numbers
measured in the run (`results.build_results` assembles them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import write_json
from ..machine import features_label
from .common import REFERENCE
from .data_efficiency import data_efficiency_markdown, plot_data_efficiency
from .headroom_report import headroom_markdown, plot_headroom, plot_identification
from .metrics import ratio_cell

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
GENERATIONS_JSON = "generations.json"
PLOTS = {
    "heldout_loss": "heldout_loss.png",
    "bias_scale": "bias_scale.png",
    "fitting_curves": "fitting_curves.png",
}
# -- files -----------------------------------------------------------------------------------------------------------


def write_outputs(results: dict, generations: dict, output_dir: Path) -> None:
    write_json(output_dir / RESULTS_JSON, results, indent=1)
    write_json(output_dir / GENERATIONS_JSON, generations, indent=1)
    plots = write_plots(results, output_dir)
    (output_dir / RESULTS_MD).write_text(markdown(results, plots), encoding="utf-8")


def summary_cell(summary: dict | None, digits: int = 3, percent: bool = False) -> str:
    """``mean ± half-width of the 95% CI`` of a `metrics.summarize` dict (— without a mean)."""
    if not summary or summary.get("mean") is None:
        return "—"
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    text = f"{summary['mean'] * scale:.{digits}f}{unit}"
    if summary.get("ci95") is not None:
        text += f" ± {summary['ci95'] * scale:.{digits}f}"
    return text


def _int(value) -> str:
    return "—" if value is None else f"{int(round(value)):,}"


def main_table(results: dict) -> list[str]:
    """Method x metric: the markdown rows of the main table."""
    lines = [
        "| Method | Held-out loss ↓ | Judge loss | Caught as fake ↓ | Who-said-it ↑ | Params global "
        "| Params / persona | Bytes / persona | Empty gens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["methods"].values():
        lines.append(
            f"| {m['label']} | {summary_cell(m['heldout_loss'])} | {summary_cell(m['judge_loss'])} | "
            f"{summary_cell(m['discrimination_caught'], 1, True)} | {summary_cell(m['who_said_it'], 1, True)} | "
            f"{_int(m.get('params_global'))} | {_int(m.get('params_per_persona'))} | "
            f"{_int(m.get('bytes_per_persona'))} | "
            f"{m['empty_generations'] if 'empty_generations' in m else '—'}"
            f"{'/' + str(m['generations']) if 'generations' in m else ''} |"
        )
    return lines


def markdown(results: dict, plots: dict[str, str]) -> str:
    config = results["config"]
    data = results["data"]
    hw = results["hardware"]
    n = len(data["unseen_personas"])
    lines = [
        "# Persona-Mux evaluation",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Wall time of this call: {results['wall_seconds_this_call']:.1f} s; compute over all calls (stages, cached "
        f"ones included): {results['compute_seconds_all_calls']:.1f} s.",
        f"Hardware: {hw.get('gpu', 'cpu')}, {hw['cpu']} ({features_label(hw)}), {hw['cpu_cores']} CPUs "
        f"({hw['torch_threads']} torch threads), {hw['platform']}; torch {hw['torch']}, transformers "
        f"{hw['transformers']}, peft {hw['peft']}.",
        "",
        f"Split: {n} unseen personas ({', '.join(data['unseen_personas'])}), "
        f"{sum(data['train_lines'].values())} train and {sum(data['test_lines'].values())} held-out lines; "
        f"{data['pretrain_personas']} pretraining personas, {data['pretrain_lines']} pretraining lines used by LoRA "
        "and codebook pretraining.",
        "",
        f"Each cell: mean over the {n} unseen personas ± half-width of the 95% Student-t confidence interval (std, "
        "min and max are in results.json). Judge: "
        f"`{config['judge_model']}`; chance of catching the fake: "
        f"{100 * results['chance']['discrimination_caught']:.0f}%; who-said-it chance: "
        f"{100 * results['chance']['who_said_it']:.1f}% (classifier on all real held-out lines: "
        f"{summary_cell(results['who_said_it_all_test_lines'], 1, True)}).",
        "",
        "## Methods (paper Tables 2, 4, 5, 7)",
        "",
        *main_table(results),
        "",
        "## Loss improvement during fitting (paper Table 6)",
        "",
        "Loss before fitting (zero mixture / initial prompt) minus loss after, per persona.",
        "",
        "| Method | Train mean | Train std | Train max | Train min | Held-out mean ± 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["loss_improvement"].values():
        t = row["train"]
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {row['label']} | {fmt(t['mean'])} | {fmt(t['std'])} | {fmt(t['max'])} | {fmt(t['min'])} | "
            f"{summary_cell(row['test'])} |"
        )
    lines += paired_markdown(results.get("paired") or {}, config["random_codebook_method"])
    lines += [
        "",
        "## Fitting cost",
        "",
        "An example pass is one training example through forward and backward (a forward-only pass counts as one).",
        "",
        "| Method | Steps | Example passes | Seconds | Seconds / persona | Train loss first → last step |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["fitting"].values():
        curve = row.get("curve") or []
        losses = f"{curve[0]:.3f} → {curve[-1]:.3f}" if curve else "—"
        per = row.get("seconds_per_persona")
        lines.append(
            f"| {row['label']} | {_int(row.get('steps'))} | {_int(row.get('example_passes'))} | "
            f"{row['seconds']:.1f} | {'—' if per is None else f'{per:.1f}'} | {losses} |"
        )
    lines += _zero_shot_markdown(results.get("zero_shot") or {})
    if results.get("headroom"):
        lines += ["", "## Headroom and likelihood identification", "", *headroom_markdown(results["headroom"])]
    if results.get("data_efficiency"):
        lines += ["", "## Data efficiency (held-out loss)", "", *data_efficiency_markdown(results["data_efficiency"])]
    if results.get("subnetwork"):
        lines += ["", "## Persona subnetworks (masks, no training)", "", *subnetwork_markdown(results["subnetwork"])]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", "## Stage times (s)", "", "| Stage | Seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["stage_seconds"].items()]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)


def paired_markdown(paired: dict, random_method: str | None) -> list[str]:
    """Persona-Mux against each reference, persona by persona (results.json ``paired``)."""
    if not paired:
        return []
    references = next(iter(paired.values()))["minus"]
    like_for_like = (
        f" The random codebook is fitted with {random_method}: the like-for-like ratio is the {random_method} fit's."
        if random_method
        else ""
    )
    lines = [
        "",
        "## Persona-Mux against each reference, paired by persona",
        "",
        "Held-out loss of the fit (bias 1) minus the reference's, per persona: mean ± 95% CI, and on how many "
        "personas the fit is lower. Gain over random: the fit's mean gain over the zero mixture divided by the "
        "random codebook's, with its 95% bootstrap interval over personas (∞: some resamples' random codebook gains "
        f"nothing).{like_for_like}",
        "",
        "| Fit | " + " | ".join(f"− {r['label']}" for r in references.values()) + " | Gain over random |",
        "|---|" + "---|" * (len(references) + 1),
    ]
    for row in paired.values():
        cells = [f"{summary_cell(d, 4)} ({d['lower']}/{d['n']})" for d in row["minus"].values()]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {ratio_cell(row['gain_over_random'])} |")
    return lines


def _zero_shot_markdown(zero_shot: dict) -> list[str]:
    if not zero_shot.get("rows"):
        return ["", "## Zero-shot personas from an embedding", "", f"Skipped: {zero_shot.get('skipped', '—')}."]
    info = zero_shot["map"]
    lines = [
        "",
        "## Zero-shot personas from an embedding",
        "",
        f"A ridge map (`persona_embedding.EmbeddingMap`) from an embedding of a persona (mean-pooled base-model "
        f"states of {info['lines_per_persona']} of its lines, {info['embedding_dim']} dims) to its mixture, fitted on "
        f"the codebook's {info['personas']} pretraining personas; penalty {info['alpha']:.3g} chosen by exact "
        f"leave-one-out error: {info['loo_error']:.4f} vs {info['mean_loo_error']:.4f} for the mean mixture (no "
        "embedding). Held-out loss at bias 1; distance = ||m - m_fisher|| (L2) to the fisher-fitted mixture (the "
        f"pretraining mixtures have a mean norm of {info['pretraining_mixture_norm']:.3f}).",
        "",
        "| Mixture | Held-out loss ↓ | L2 distance to fitted (fisher) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row['label']} | {summary_cell(row['heldout_loss'])} | {summary_cell(row['distance_to_fitted'])} |"
        for row in zero_shot["rows"].values()
    ]
    return lines


def subnetwork_markdown(sub: dict) -> list[str]:
    """Identification, own-mask advantage, general-text loss and cost of every subnetwork row."""
    lines = [
        "Each unseen persona's held-out lines scored under every persona's mask (with its mixture, for the combined "
        f"rows): identification accuracy against chance {100 * sub['chance']:.1f}%, and the own-mask advantage (mean "
        "loss under the other personas' masks minus under its own: near 0 means a pruned model, not a persona). "
        f"General text: loss on a fixed non-Shakespeare text (base model {sub['general_loss_base']:.3f}). Seconds: "
        f"calibration forward passes ({summary_cell(sub['calibration_seconds'], 2)} s per persona) plus building "
        "the mask.",
        "",
        "| Row | Identification | Own-mask advantage | General-text loss ↓ | Seconds / persona | Bytes / persona |",
        "|---|---|---|---|---|---|",
    ]
    for row in sub["rows"].values():
        lines.append(
            f"| {row['label']} | {100 * row['identification_accuracy']:.1f}% | "
            f"{summary_cell(row['own_mask_advantage'])} | "
            f"{summary_cell(row['general_loss'])} | {summary_cell(row['seconds_per_persona'], 2)} | "
            f"{_int(row['bytes_per_persona'])} |"
        )
    return lines


def write_plots(results: dict, output_dir: Path) -> dict[str, str]:
    """Held-out loss per method, bias-scale trade-off, fitting curves. Returns name -> file name."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the user's backend alone

    methods = {k: m for k, m in results["methods"].items() if m["heldout_loss"]["mean"] is not None}
    written: dict[str, str] = {}

    fig = Figure(figsize=(7, 0.4 * len(methods) + 1.5))
    ax = fig.subplots()
    labels = [m["label"] for m in methods.values()]
    means = [m["heldout_loss"]["mean"] for m in methods.values()]
    errors = [m["heldout_loss"]["ci95"] or 0.0 for m in methods.values()]
    ax.barh(range(len(labels)), means, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("held-out token loss (mean over unseen personas, 95% CI)")
    if means:
        low = min(m - e for m, e in zip(means, errors))
        high = max(m + e for m, e in zip(means, errors))
        margin = 0.1 * (high - low) + 1e-3
        ax.set_xlim(low - margin, high + margin)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(output_dir / PLOTS["heldout_loss"], dpi=100, bbox_inches="tight")
    written["heldout_loss"] = PLOTS["heldout_loss"]

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    scales = results["config"]["bias_scales"]
    for method, color, offset in (("adam", "tab:red", (4, 4)), ("fisher", "tab:purple", (4, -10))):
        points = [results["methods"][f"personamux_{method}_bias{s:g}"] for s in scales]
        xs = [p["judge_loss"]["mean"] for p in points]
        ys = [p["who_said_it"]["mean"] for p in points]
        if any(x is None for x in xs) or any(y is None for y in ys):
            continue
        ax.plot(xs, ys, marker="o", color=color, label=f"Persona-Mux ({method})")
        for s, x, y in zip(scales, xs, ys):
            ax.annotate(f"bias {s:g}", (x, y), textcoords="offset points", xytext=offset, fontsize=7, color=color)
    for key, marker in (
        ("base", "s"),
        ("icl", "D"),
        ("lora", "^"),
        ("sp", "v"),
        ("random_codebook", "x"),
        (REFERENCE, "*"),
    ):
        m = results["methods"][key]
        if m["judge_loss"]["mean"] is not None and m["who_said_it"]["mean"] is not None:
            ax.scatter(m["judge_loss"]["mean"], m["who_said_it"]["mean"], marker=marker, s=50, label=m["label"])
    ax.axhline(results["chance"]["who_said_it"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("judge loss of generations (lower = less surprising)")
    ax.set_ylabel("who-said-it accuracy of generations")
    ax.set_title("Bias scale: fluency vs persona")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(output_dir / PLOTS["bias_scale"], dpi=100, bbox_inches="tight")
    written["bias_scale"] = PLOTS["bias_scale"]

    fig = Figure(figsize=(15, 4))
    pm_ax, sp_ax, lora_ax = fig.subplots(1, 3)
    fitting = results["fitting"]
    for key in ("personamux_adam", "personamux_fisher", "personamux_lbfgs", "random_codebook"):
        if key not in fitting:
            continue
        row = fitting[key]
        label = f"{row['label']}: {row['example_passes']:,} passes, {row['seconds']:.0f} s"
        pm_ax.plot(range(len(row["curve"])), row["curve"], marker=".", label=label)
    pm_ax.set_xlabel("step (adam: loss before step k+1; fisher: after step k; lbfgs: loss evaluation k)")
    pm_ax.set_ylabel("mean train token loss, all unseen personas")
    pm_ax.set_title("Persona-Mux: fitting the mixture weights")
    curves = list(fitting["sp"]["curves"].values())
    for curve in curves:
        sp_ax.plot(curve, color="tab:green", alpha=0.25)
    if curves:
        width = min(map(len, curves))
        sp_ax.plot(np.mean([c[:width] for c in curves], axis=0), color="tab:green", label="mean over personas")
    sp_ax.set_xlabel("full-batch step")
    sp_ax.set_ylabel("train token loss of one persona")
    sp_ax.set_title(f"Soft prompt: {fitting['sp']['example_passes']:,} passes, {fitting['sp']['seconds']:.0f} s")
    lora_ax.plot(fitting["lora"]["curve"], color="tab:orange", label="mini-batch loss")
    lora_ax.set_xlabel("step")
    lora_ax.set_ylabel("train token loss (batch)")
    lora_ax.set_title(f"LoRA: {fitting['lora']['example_passes']:,} passes, {fitting['lora']['seconds']:.0f} s")
    for ax in (pm_ax, sp_ax, lora_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.savefig(output_dir / PLOTS["fitting_curves"], dpi=100, bbox_inches="tight")
    written["fitting_curves"] = PLOTS["fitting_curves"]
    if results.get("headroom"):
        written["headroom_curves"] = Path(plot_headroom(results["headroom"], output_dir / "headroom_curves.png")).name
        path = plot_identification(results["headroom"], output_dir / "identification.png")
        written["identification"] = Path(path).name
    if results.get("data_efficiency"):
        path = plot_data_efficiency(results["data_efficiency"], output_dir / "data_efficiency.png")
        written["data_efficiency"] = Path(path).name
    return written
