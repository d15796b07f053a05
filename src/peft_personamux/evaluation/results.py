"""From stage results to what results.json holds: per method and persona, the summaries the report renders."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..machine import hardware
from .common import PM_LABELS, REFERENCE, method_keys, method_source, pm_methods
from .config import EvalConfig
from .data import Split
from .data_efficiency import summarize_data_efficiency
from .metrics import gain_ratio, paired_difference, summarize

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
        source = method_source(stages, stage, key)
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
        "loss_improvement": _improvements(stages, config, personas),
        "paired": _paired(methods, stages, config, personas),
        "fitting": _fitting(stages, config, len(personas)),
        "zero_shot": _zero_shot(stages, personas),
        "headroom": (
            {k: v for k, v in stages["headroom"].items() if k not in ("done", "seconds")}
            if "headroom" in stages
            else None
        ),
        "subnetwork": _subnetwork(stages, config, personas) if "subnetwork" in stages else None,
        "data_efficiency": (
            summarize_data_efficiency(stages["data_efficiency"], personas) if "data_efficiency" in stages else None
        ),
    }


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
    if "pm_lbfgs" in stages:
        sources["personamux_lbfgs"] = ("Fitted (lbfgs from mean)", stages["pm_lbfgs"]["heldout_loss"]["1.0"], None)
    rows = {}
    for key, (label, losses, distance) in sources.items():
        rows[key] = {
            "label": label,
            "heldout_loss": summarize([losses[p] for p in personas]),
            "distance_to_fitted": summarize([distance[p] for p in personas]) if distance else summarize([]),
            "per_persona": {p: losses[p] for p in personas},
        }
    return {"map": stage["map"], "rows": rows}


_PAIRED_REFERENCES = {
    "zero": "Zero mixture (bias tokens only)",
    "random_codebook": "Random codebook",
    "sp": "Soft prompt",
    "lora": "LoRA",
    "base": "Base",
}


def _paired(methods: dict, stages: dict, config: EvalConfig, personas: list[str]) -> dict[str, dict]:
    """Each Persona-Mux fit (bias 1) against each reference, persona by persona: held-out loss minus the reference's
    (mean, 95% CI, on how many personas it is lower), and its gain over the zero mixture as a multiple of the random
    codebook's (the paper's Table 6 ratio)."""
    losses = {"zero": {p: stages["pm_zero"]["test"][p] for p in personas}}  # the zero mixture is no table row
    for key in _PAIRED_REFERENCES.keys() - {"zero"}:
        losses[key] = {p: methods[key]["per_persona"][p]["heldout_loss"] for p in personas}
    out = {}
    for method in pm_methods(config):
        key = f"personamux_{method}_bias1"
        if key not in methods:  # bias_scales without full bias
            continue
        mine = {p: methods[key]["per_persona"][p]["heldout_loss"] for p in personas}
        out[f"personamux_{method}"] = {
            "label": f"Persona-Mux ({PM_LABELS[method]})",
            "minus": {
                ref: {"label": _PAIRED_REFERENCES[ref], **paired_difference(mine, losses[ref], personas)}
                for ref in _PAIRED_REFERENCES
            },
            "gain_over_random": gain_ratio(losses["zero"], mine, losses["random_codebook"], personas),
        }
    return out


def _improvements(stages: dict, config: EvalConfig, personas: list[str]) -> dict[str, dict]:
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
    fits = [(f"personamux_{m}", f"pm_{m}", f"Persona-Mux ({PM_LABELS[m]})") for m in pm_methods(config)]
    for key, stage, label in (*fits, ("random_codebook", "random_codebook", "Random codebook")):
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
    how = {"adam": "all personas at once", "fisher": "all personas at once", "lbfgs": "one persona at a time"}
    fits = [(f"personamux_{m}", f"pm_{m}", f"Persona-Mux {PM_LABELS[m]} ({how[m]})") for m in pm_methods(config)]
    for key, stage, label in (
        *fits,
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


def _subnetwork(stages: dict, config: EvalConfig, personas: list[str]) -> dict:
    """Per subnetwork row: likelihood identification, own-mask advantage, general-text loss and calibration cost."""
    stage = stages["subnetwork"]
    rows = {}
    for key, name, _, label in method_keys(config):
        if name != "subnetwork":
            continue
        entry, ident = stage["methods"][key], stage["identification"][key]
        rows[key] = {
            "label": label,
            "identification_accuracy": ident["accuracy"],
            "own_mask_advantage": summarize(ident["own_mask_advantage"]),
            "general_loss": summarize([entry["general_loss"][p] for p in personas]),
            "seconds_per_persona": summarize([entry["seconds_per_persona"][p] for p in personas]),
            "bytes_per_persona": _mean([entry["bytes_per_persona"][p] for p in personas]),
        }
    return {
        "chance": 1.0 / len(personas),
        "general_loss_base": stage["general"]["base"],
        "calibration_seconds": summarize([stage["statistics_seconds"][p] for p in personas]),
        "rows": rows,
        "identification": stage["identification"],
    }
