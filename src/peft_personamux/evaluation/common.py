"""What the evaluation's runner and report share: the rows of the result tables and the generations they score."""

from __future__ import annotations

from pathlib import Path

from .config import EvalConfig
from .data import Split

REFERENCE = "reference"  # pseudo-method: the real test lines, scored like generations


def method_keys(config: EvalConfig) -> list[tuple[str, str, str, str]]:
    """(result key, stage, bias-scale key, label) of every row of the result tables, in table order."""
    rows = [
        ("base", "base_icl", "1.0", "Base (text persona + instruction)"),
        ("icl", "base_icl", "1.0", f"ICL ({config.icl_examples} lines)"),
        ("lora", "lora", "1.0", f"LoRA (r={config.lora_r})"),
        ("sp", "sp", "1.0", f"Soft prompt ({config.sp_num_virtual_tokens} tokens)"),
    ]
    for method in ("adam", "fisher"):
        for scale in config.bias_scales:
            suffix = {1.0: "", 0.5: ", half bias", 0.0: ", no bias"}.get(scale, f", bias x{scale:g}")
            rows.append(
                (
                    f"personamux_{method}_bias{scale:g}",
                    f"pm_{method}",
                    str(float(scale)),
                    f"Persona-Mux ({method}){suffix}",
                )
            )
    rows.append(("random_codebook", "random_codebook", "1.0", f"Random codebook ({config.random_codebook_method})"))
    return rows


def collect_generations(stages: dict, split: Split, config: EvalConfig) -> dict[str, dict[str, list[dict]]]:
    """Generations of every method row (and the real test lines as ``reference``), by persona."""
    out: dict[str, dict[str, list[dict]]] = {}
    for key, stage, scale, _ in method_keys(config):
        source = stages[stage][key] if stage == "base_icl" else stages[stage]
        out[key] = source["generations"][scale]
    out[REFERENCE] = {
        p: [{"prompt": r["prompt"], "reference": r["response"], "text": r["response"]} for r in rows]
        for p, rows in ((p, split.rows_of("test", p)[: config.num_generations]) for p in split.personas)
    }
    return out


def file_size(path: Path) -> int:
    """Bytes of ``path`` (what a method stores: adapter files, persona files)."""
    return path.stat().st_size
