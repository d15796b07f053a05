"""From stage results to results.json, results.md, generations.json and the plots. Only numbers measured in the run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_json
from ..machine import hardware
from .common import REFERENCE, method_keys
from .config import EvalConfig
from .data import Split
from .data_efficiency import data_efficiency_markdown, plot_data_efficiency, summarize_data_efficiency
from .headroom_report import headroom_markdown, plot_headroom, plot_identification
from .metrics import summarize

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
GENERATIONS_JSON = "generations.json"
PLOTS = {
    "heldout_loss": "heldout_loss.png",
    "bias_scale": "bias_scale.png",
    "fitting_curves": "fitting_curves.png",
}
_METRICS = ("heldout_loss", "judge_loss", "discrimination_caught", "who_said_it")


def _mean(values) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def build_results(
    config: EvalConfig,
    stages: dict,
    split: Split,
    plan: dict[str, dict[str, int]],
    stage_seconds: dict[str, float],
    wall_seconds: float,
    command: str,
) -> dict[str, Any]:
    """Every number of the run, summarised over the unseen personas (mean, std, 95% CI, min, max, n)."""
    personas = split.personas
    judge = stages["judge"]["methods"]
    accuracy = stages["who_said_it"]["accuracy"]
    methods: dict[str, dict] = {}
    for key, stage, scale, label in method_keys(config):
        source = stages[stage][key] if stage == "base_icl" else stages[stage]
        per = {
            p: {
                "heldout_loss": source["heldout_loss"][scale].get(p),
                "judge_loss": _mean(judge[key]["generation_loss"][p]),
                "discrimination_caught": _mean(judge[key]["caught"][p]),
                "who_said_it": accuracy[key].get(p),
                "bytes": source["bytes_per_persona"][p],
            }
            for p in personas
        }
        methods[key] = {
            "label": label,
            **{m: summarize([per[p][m] for p in personas]) for m in _METRICS},
            "empty_generations": sum(not g["text"] for p in personas for g in source["generations"][scale][p]),
            "generations": sum(len(source["generations"][scale][p]) for p in personas),
            "params_global": source["params_global"],
            "params_per_persona": source["params_per_persona"],
            "bytes_global": source["bytes_global"],
            "bytes_per_persona": _mean([per[p]["bytes"] for p in personas]),
            "per_persona": per,
        }
    reference = {
        p: {
            "judge_loss": _mean(judge[REFERENCE]["generation_loss"][p]),
            "discrimination_caught": _mean(judge[REFERENCE]["caught"][p]),
            "who_said_it": accuracy[REFERENCE].get(p),
        }
        for p in personas
    }
    methods[REFERENCE] = {
        "label": "Real test lines (reference)",
        "heldout_loss": summarize([]),
        **{m: summarize([reference[p][m] for p in personas]) for m in _METRICS[1:]},
        "per_persona": reference,
    }
    return {
        "command": command,
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "hardware": hardware(),
        "wall_seconds_this_call": wall_seconds,
        "stage_seconds": stage_seconds,
        "compute_seconds_all_calls": float(sum(stage_seconds.values())),
        "data": split.summary(),
        "plan": plan,
        "chance": {
            "discrimination_caught": 1.0 / (config.discrimination_real_candidates + 1),
            "who_said_it": stages["who_said_it"]["chance"],
        },
        "who_said_it_all_test_lines": summarize(list(accuracy["_all_test_lines"].values())),
        "methods": methods,
        "loss_improvement": _improvements(stages, personas),
        "fitting": _fitting(stages, config, len(personas)),
        "zero_shot": _zero_shot(stages, personas),
        "headroom": (
            {k: v for k, v in stages["headroom"].items() if k not in ("done", "seconds")}
            if "headroom" in stages
            else None
        ),
        "data_efficiency": (
            summarize_data_efficiency(stages["data_efficiency"], personas) if "data_efficiency" in stages else None
        ),
    }


def _without_bookkeeping(stage: dict | None) -> dict | None:
    return None if stage is None else {k: v for k, v in stage.items() if k not in ("done", "seconds")}


def _zero_shot(stages: dict, personas: list[str]) -> dict:
    """Held-out loss at bias 1 of mixtures made without fitting (zero, mean, embedding map) beside fitted ones."""
    stage = stages.get("pm_embedding") or {}
    if "heldout_loss" not in stage:
        return {"skipped": stage.get("skipped", "no pm_embedding stage"), "rows": {}}
    sources = {
        "zero": ("Zero mixture (bias tokens only)", stages["pm_zero"]["test"], stage["distance_to_fitted"]["zero"]),
        "mean_mixture": (
            "Mean of the pretraining mixtures",
            stage["heldout_loss"]["mean_mixture"],
            stage["distance_to_fitted"]["mean_mixture"],
        ),
        "embedding": (
            "Embedding map, zero-shot (no gradient step)",
            stage["heldout_loss"]["embedding"],
            stage["distance_to_fitted"]["embedding"],
        ),
        "personamux_fisher": ("Fitted (fisher)", stages["pm_fisher"]["heldout_loss"]["1.0"], None),
        "personamux_adam": ("Fitted (adam)", stages["pm_adam"]["heldout_loss"]["1.0"], None),
    }
    rows = {}
    for key, (label, losses, distance) in sources.items():
        rows[key] = {
            "label": label,
            "heldout_loss": summarize([losses[p] for p in personas]),
            "distance_to_fitted": summarize([distance[p] for p in personas]) if distance else summarize([]),
            "per_persona": {p: losses[p] for p in personas},
        }
    return {"map": stage["map"], "rows": rows}


def _improvements(stages: dict, personas: list[str]) -> dict[str, dict]:
    """Table 6: loss before fitting minus loss after, on the train lines and on the held-out lines, per persona."""
    zero = stages["pm_zero"]
    sp = stages["sp"]["personas"]
    rows = {
        "sp": (
            "Soft prompt",
            {p: sp[p]["train_loss_before"] - sp[p]["train_loss_after"] for p in personas},
            {p: sp[p]["test_loss_before"] - sp[p]["test_loss_after"] for p in personas},
        )
    }
    for key, stage, label in (
        ("personamux_adam", "pm_adam", "Persona-Mux (adam)"),
        ("personamux_fisher", "pm_fisher", "Persona-Mux (fisher)"),
        ("random_codebook", "random_codebook", "Random codebook"),
    ):
        after = stages[stage]
        rows[key] = (
            label,
            {p: zero["train"][p] - after["train_loss_after"][p] for p in personas},
            {p: zero["test"][p] - after["heldout_loss"]["1.0"][p] for p in personas},
        )
    return {
        key: {
            "label": label,
            "train": summarize(list(train.values())),
            "test": summarize(list(test.values())),
            "per_persona": {p: {"train": train[p], "test": test[p]} for p in personas},
        }
        for key, (label, train, test) in rows.items()
    }


def _fitting(stages: dict, config: EvalConfig, num_personas: int) -> dict[str, dict]:
    """Cost of each trained method: steps, example passes (one example through forward and backward), seconds."""
    out: dict[str, dict] = {}
    lora = stages["lora"]["fit"]
    out["lora"] = {"label": "LoRA (all personas at once)", **lora, "seconds_per_persona": None}
    sp = stages["sp"]["personas"]
    curves = [v["curve"] for v in sp.values()]
    width = min(map(len, curves), default=0)
    out["sp"] = {
        "label": "Soft prompt (one persona at a time)",
        "steps": config.sp_steps,
        "example_passes": int(sum(v["example_passes"] for v in sp.values())),
        "seconds": float(sum(v["seconds"] for v in sp.values())),
        "seconds_per_persona": _mean([v["seconds"] for v in sp.values()]),
        "curve": [float(np.mean([c[i] for c in curves])) for i in range(width)],  # mean over personas
        "curves": {p: v["curve"] for p, v in sp.items()},
    }
    for key, stage, label in (
        ("personamux_adam", "pm_adam", "Persona-Mux adam (all personas at once)"),
        ("personamux_fisher", "pm_fisher", "Persona-Mux fisher (all personas at once)"),
        ("random_codebook", "random_codebook", f"Random codebook {config.random_codebook_method}"),
    ):
        fit = stages[stage]["fit"]
        out[key] = {"label": label, **fit, "seconds_per_persona": fit["seconds"] / num_personas}
    if "codebook" in stages:
        out["codebook_pretraining"] = {
            "label": "Codebook pretraining (stage 1)",
            **{k: v for k, v in stages["codebook"].items() if k not in ("done",)},
        }
    return out


# -- files -----------------------------------------------------------------------------------------------------------


def write_outputs(results: dict, generations: dict, output_dir: Path) -> None:
    write_json(output_dir / RESULTS_JSON, results, indent=1)
    write_json(output_dir / GENERATIONS_JSON, generations, indent=1)
    plots = write_plots(results, output_dir)
    (output_dir / RESULTS_MD).write_text(markdown(results, plots), encoding="utf-8")


def _cell(summary: dict | None, digits: int = 3, percent: bool = False) -> str:
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
            f"| {m['label']} | {_cell(m['heldout_loss'])} | {_cell(m['judge_loss'])} | "
            f"{_cell(m['discrimination_caught'], 1, True)} | {_cell(m['who_said_it'], 1, True)} | "
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
        f"Hardware: {hw.get('gpu', 'cpu')}, {hw['cpu']}, {hw['cpu_cores']} CPUs ({hw['torch_threads']} torch "
        f"threads), {hw['platform']}; torch {hw['torch']}, transformers {hw['transformers']}, peft {hw['peft']}.",
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
        f"{_cell(results['who_said_it_all_test_lines'], 1, True)}).",
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
            f"{_cell(row['test'])} |"
        )
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
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", "## Stage times (s)", "", "| Stage | Seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["stage_seconds"].items()]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)


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
        f"| {row['label']} | {_cell(row['heldout_loss'])} | {_cell(row['distance_to_fitted'])} |"
        for row in zero_shot["rows"].values()
    ]
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
    for key in ("personamux_adam", "personamux_fisher", "random_codebook"):
        row = fitting[key]
        label = f"{row['label']}: {row['example_passes']:,} passes, {row['seconds']:.0f} s"
        pm_ax.plot(range(len(row["curve"])), row["curve"], marker=".", label=label)
    pm_ax.set_xlabel("step (adam: loss before step k+1; fisher: after step k)")
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
