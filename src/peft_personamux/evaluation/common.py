"""What the evaluation's runner and report share: the rows of the result tables and the generations they score."""

from __future__ import annotations

from pathlib import Path

from .config import EvalConfig
from .data import Split

REFERENCE = "reference"  # pseudo-method: the real test lines, scored like generations
SUBNETWORK_VARIANTS = ("weight_mask", "channel_mask", "channel_mask+soft_prompt")  # rows of the subnetwork stage
_SUBNETWORK_LABELS = {
    "weight_mask": "Weight mask (faithful subnetwork)",
    "channel_mask": "Channel mask (servable subnetwork)",
    "channel_mask+soft_prompt": "Channel mask + Persona-Mux (fisher)",
}


def subnetwork_key(variant: str, sparsity: float) -> str:
    """Result key of one subnetwork row, e.g. ``channel_mask@0.3``."""
    return f"{variant}@{sparsity:g}"


PM_LABELS = {"adam": "adam", "fisher": "fisher", "lbfgs": "lbfgs from mean"}


def pm_methods(config: EvalConfig) -> tuple[str, ...]:
    """The Persona-Mux fits of a run: the paper's Adam and the Fisher fit from zero, and (``lbfgs_steps`` > 0) each
    persona fitted on its own with L-BFGS from the mean pretraining mixture."""
    return ("adam", "fisher") + (("lbfgs",) if config.lbfgs_steps else ())


def method_keys(config: EvalConfig) -> list[tuple[str, str, str, str]]:
    """(result key, stage, bias-scale key, label) of every row of the result tables, in table order."""
    rows = [
        ("base", "base_icl", "1.0", "Base (text persona + instruction)"),
        ("icl", "base_icl", "1.0", f"ICL ({config.icl_examples} lines)"),
        ("lora", "lora", "1.0", f"LoRA (r={config.lora_r})"),
        ("sp", "sp", "1.0", f"Soft prompt ({config.sp_num_virtual_tokens} tokens)"),
    ]
    for method in pm_methods(config):
        for scale in config.bias_scales:
            suffix = {1.0: "", 0.5: ", half bias", 0.0: ", no bias"}.get(scale, f", bias x{scale:g}")
            rows.append(
                (
                    f"personamux_{method}_bias{scale:g}",
                    f"pm_{method}",
                    str(float(scale)),
                    f"Persona-Mux ({PM_LABELS[method]}){suffix}",
                )
            )
    rows.append(("random_codebook", "random_codebook", "1.0", f"Random codebook ({config.random_codebook_method})"))
    for sparsity in config.subnetwork_sparsities:
        for variant in SUBNETWORK_VARIANTS:
            rows.append(
                (
                    subnetwork_key(variant, sparsity),
                    "subnetwork",
                    "1.0",
                    f"{_SUBNETWORK_LABELS[variant]}, sparsity {sparsity:g}",
                )
            )
    return rows


def method_source(stages: dict, stage: str, key: str) -> dict:
    """The stage entry holding row ``key``'s numbers (its heldout_loss, generations, bytes, params)."""
    if stage == "base_icl":
        return stages[stage][key]
    if stage == "subnetwork":
        return stages[stage]["methods"][key]
    return stages[stage]


def collect_generations(stages: dict, split: Split, config: EvalConfig) -> dict[str, dict[str, list[dict]]]:
    """Generations of every method row (and the real test lines as ``reference``), by persona."""
    out: dict[str, dict[str, list[dict]]] = {}
    for key, stage, scale, _ in method_keys(config):
        source = method_source(stages, stage, key)
        out[key] = source["generations"][scale]
    out[REFERENCE] = {
        p: [{"prompt": r["prompt"], "reference": r["response"], "text": r["response"]} for r in rows]
        for p, rows in ((p, split.rows_of("test", p)[: config.num_generations]) for p in split.personas)
    }
    return out


def file_size(path: Path) -> int:
    """Bytes of ``path`` (what a method stores: adapter files, persona files)."""
    return path.stat().st_size
