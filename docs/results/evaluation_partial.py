"""Held-out loss of the rows an evaluation run has finished so far, paired by character (a run still going, or
interrupted before its report).

    python docs/results/evaluation_partial.py docs/results/core100 docs/results/core100/partial \
        --damped docs/results/damped_fits_state.json

reads ``<run dir>/stages/*.json`` and writes ``<prefix>.md`` and ``<prefix>.json``: every finished row's held-out
loss (mean ± 95% CI over the unseen characters) and each Persona-Mux row against each reference, persona by persona
(`metrics.paired_difference`, `metrics.gain_ratio`), as the finished run's report does, the zero mixture among the
fits; and each finished fit's cost and training curve. ``--damped`` adds the damped
fits of docs/results/damped_fits.py (shipped codebook and free 8-token prompt), after checking that they scored the
same held-out lines: their zero-mixture losses must equal the run's. The headroom and data-efficiency stages are
reported as far as they have got (both save each finished row). Running `personamux evaluate` again with the same
config continues the run; its own results.md replaces this report at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft_personamux.evaluation.data_efficiency import data_efficiency_markdown, summarize_data_efficiency
from peft_personamux.evaluation.headroom import summarize_headroom
from peft_personamux.evaluation.headroom_report import headroom_markdown
from peft_personamux.evaluation.metrics import gain_ratio, paired_difference, summarize
from peft_personamux.evaluation.report import paired_markdown, ratio_cell, summary_cell
from peft_personamux.files import read_json, write_json

PM_STAGES = {
    "pm_adam": "Persona-Mux (adam)",
    "pm_fisher": "Persona-Mux (fisher)",
    "pm_lbfgs": "Persona-Mux (lbfgs from mean)",
}
DAMPED = {"ship64": "Persona-Mux, damped fit (shipped codebook)", "free8": "8 free tokens after the bias, damped fit"}
REFERENCES = ("zero", "random_codebook", "sp", "lora", "base")


def finished_rows(stages: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Held-out loss per character of every finished row (bias 1), and each row's label."""
    rows, labels = {}, {}

    def add(key: str, label: str, losses: dict[str, float]) -> None:
        rows[key], labels[key] = losses, label

    base_icl = read_json(stages / "base_icl.json")
    if base_icl.get("done"):
        add("base", "Base", base_icl["base"]["heldout_loss"]["1.0"])
        add("icl", "ICL", base_icl["icl"]["heldout_loss"]["1.0"])
    lora = read_json(stages / "lora.json")
    if lora.get("done"):
        add("lora", "LoRA", lora["heldout_loss"]["1.0"])
    sp = read_json(stages / "sp.json")
    if sp.get("done"):
        add("sp", "Soft prompt", {p: v["test_loss_after"] for p, v in sp["personas"].items()})
    zero = read_json(stages / "pm_zero.json")
    if zero.get("done"):
        add("zero", "Zero mixture (bias tokens only)", zero["test"])
    for stage, label in {**PM_STAGES, "random_codebook": "Random codebook"}.items():
        found = read_json(stages / f"{stage}.json")
        if found.get("done"):
            add(
                stage.removeprefix("pm_") if stage != "random_codebook" else stage, label, found["heldout_loss"]["1.0"]
            )
    return rows, labels


def fitting(stages: Path) -> dict[str, dict]:
    """Cost and training curve of every finished fit: example passes per second, the mean training loss over
    characters before each step and after the last, and the range over characters of the last step's drop."""
    out = {}
    sp = read_json(stages / "sp.json")
    if sp.get("done"):
        found = list(sp["personas"].values())
        out["sp"] = {
            "label": "Soft prompt (one character at a time)",
            "example_passes": sum(v["example_passes"] for v in found),
            "seconds": sum(v["seconds"] for v in found),
            "curves": [v["curve"] for v in found],
            "after": [v["train_loss_after"] for v in found],
        }
    for stage, label in {**PM_STAGES, "random_codebook": "Random codebook"}.items():
        found = read_json(stages / f"{stage}.json")
        if found.get("done") and "curves" in found["fit"]:
            personas = list(found["fit"]["curves"])
            out[stage] = {
                "label": label,
                "example_passes": found["fit"]["example_passes"],
                "seconds": found["fit"]["seconds"],
                "curves": [found["fit"]["curves"][p] for p in personas],
                "after": [found["train_loss_after"][p] for p in personas],
            }
    for row in out.values():
        curves, after = row.pop("curves"), row["after"]
        width = min(map(len, curves))
        row["passes_per_second"] = row["example_passes"] / row["seconds"]
        row["mean_before_each_step"] = [sum(c[i] for c in curves) / len(curves) for i in range(width)]
        row["mean_after"] = sum(after) / len(after)
        drops = [c[-1] - a for c, a in zip(curves, after)]  # the last step's own drop, per character
        row["last_step_drop"] = {"min": min(drops), "max": max(drops)}
    return out


def add_damped(rows: dict, labels: dict, state_path: Path, personas: list[str]) -> float:
    """Add the damped fits' rows; returns the largest difference between their zero-mixture losses and the run's."""
    state = read_json(state_path)
    if "zero" not in rows:
        raise SystemExit("The run has no finished pm_zero stage: nothing to check the damped fits' lines against.")
    gap = max(abs(state["zero"]["test"][p] - rows["zero"][p]) for p in personas)
    if gap > 1e-3:
        raise SystemExit(f"The damped fits scored other lines (zero-mixture losses differ by up to {gap:.4f}).")
    for span, label in DAMPED.items():
        if all(p in state.get(span, {}) for p in personas):
            rows[f"damped_{span}"], labels[f"damped_{span}"] = {p: state[span][p]["test"] for p in personas}, label
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("prefix", type=Path, help="writes <prefix>.md and <prefix>.json")
    parser.add_argument("--damped", type=Path, default=None, help="damped_fits.py's state file")
    args = parser.parse_args()
    stages = args.run_dir / "stages"
    data = read_json(stages / "data.json")
    if not data:
        raise SystemExit(f"{stages}/data.json does not exist or is empty: the run has not started.")
    personas = data["unseen_personas"]
    rows, labels = finished_rows(stages)
    gap = add_damped(rows, labels, args.damped, personas) if args.damped else None
    fits = [k for k in rows if k in ("zero", "adam", "fisher", "lbfgs", "damped_ship64")]  # zero: bias tokens only
    references = [r for r in (*REFERENCES, "damped_free8") if r in rows]
    no_ratio = {"ratio": None, "ci_low": None, "ci_high": None, "n": 0, "unbounded_share": None}
    paired = {  # the shape of results.json's `paired`, so that the run's own renderer draws the table
        fit: {
            "label": labels[fit],
            "minus": {r: {"label": labels[r], **paired_difference(rows[fit], rows[r], personas)} for r in references},
            "gain_over_random": (
                gain_ratio(rows["zero"], rows[fit], rows["random_codebook"], personas)
                if fit != "zero" and "zero" in rows and "random_codebook" in rows
                else no_ratio
            ),
        }
        for fit in fits
    }
    capture = {  # the capture ratio: (zero - fit) / (zero - free8), with its bootstrap interval
        fit: {"label": labels[fit], **gain_ratio(rows["zero"], rows[fit], rows["damped_free8"], personas)}
        for fit in fits
        if fit != "zero" and "zero" in rows and "damped_free8" in rows
    }
    # the damped free prompt's gain over the zero mixture as a multiple of the random codebook's: an 8-token codebook
    # spans a part of the free prompt's directions, so (if the damped fit is near its own optimum) its gain can pass
    # the free prompt's only where the smaller span overfits less
    ceiling = (
        gain_ratio(rows["zero"], rows["damped_free8"], rows["random_codebook"], personas)
        if {"zero", "damped_free8", "random_codebook"} <= set(rows)
        else None
    )
    random_method = read_json(stages / "random_codebook.json").get("fit", {}).get("method")
    out = {
        "command": "python docs/results/evaluation_partial.py "
        + " ".join([str(args.run_dir), str(args.prefix)] + ([f"--damped {args.damped}"] if args.damped else [])),
        "personas": personas,
        "heldout_loss": {
            k: {"label": labels[k], **summarize([v[p] for p in personas]), "per_persona": v} for k, v in rows.items()
        },
        "paired": paired,
        "capture_ratio": capture,
        "free8_gain_over_random": ceiling,
        "fitting": fitting(stages),
        "damped_zero_gap": gap,
    }
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Evaluation so far: `{args.run_dir}`",
        "",
        f"Command: `{out['command']}`. Rows whose stage has finished; held-out loss at bias 1, mean ± 95% CI over "
        f"{len(personas)} unseen characters.",
        "",
        "| Row | Held-out loss |",
        "|---|---|",
        *(f"| {labels[k]} | {summary_cell(out['heldout_loss'][k])} |" for k in rows),
    ]
    if gap is not None:
        lines += ["", f"Damped fits' zero-mixture losses equal the run's within {gap:.1e}: the same lines and tokens."]
    lines += paired_markdown(paired, random_method)
    if capture:
        lines += [
            "",
            "Capture ratio of each fit: its mean held-out gain over the zero mixture divided by the damped free "
            "prompt's (8 free tokens after the bias), 95% bootstrap interval over characters.",
            "",
            "| Fit | Capture ratio |",
            "|---|---|",
            *(f"| {row['label']} | {ratio_cell(row)} |" for row in capture.values()),
        ]
    if ceiling:
        lines += [
            "",
            "The damped free prompt's gain over the zero mixture is "
            f"{ratio_cell(ceiling)} the random codebook's ({random_method} fit). An 8-token codebook spans a part of "
            "the free prompt's directions, so its gain over random can pass this only where its smaller span "
            "overfits less on held-out lines (the damped fit is 10 L-BFGS iterations, not shown to be at its "
            "optimum).",
        ]
    if out["fitting"]:
        lines += [
            "",
            "## Fitting",
            "",
            "Training loss: mean over characters before each step, and after the last; the last step's own drop, "
            "smallest and largest over characters.",
            "",
            "| Fit | Example passes | Seconds | Passes / s | Mean training loss before each step → after "
            "| Last step's drop |",
            "|---|---|---|---|---|---|",
        ]
        for row in out["fitting"].values():
            curve = " → ".join(f"{v:.3f}" for v in [*row["mean_before_each_step"], row["mean_after"]])
            drop = row["last_step_drop"]
            lines.append(
                f"| {row['label']} | {row['example_passes']} | {row['seconds']:.0f} | "
                f"{row['passes_per_second']:.2f} | {curve} | {drop['min']:.3f} to {drop['max']:.3f} |"
            )
    lines += later_stages(stages, personas, out)
    write_json(args.prefix.with_suffix(".json"), out)
    args.prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def later_stages(stages: Path, personas: list[str], out: dict) -> list[str]:
    """The headroom and data-efficiency stages' rows finished so far (each keeps its partial result), into ``out``
    and as markdown."""
    lines = []
    headroom = read_json(stages / "headroom.json")
    if "zero" in headroom:
        state = "finished" if headroom.get("done") else "still running: the rows fitted so far"
        headroom["summary"] = summarize_headroom(headroom)
        out["headroom"] = headroom["summary"]
        lines += ["", f"## Headroom ({state})", "", *headroom_markdown(headroom)]
    curve = read_json(stages / "data_efficiency.json")
    if "zero" in curve:
        state = "finished" if curve.get("done") else "still running: the rows and sizes fitted so far"
        out["data_efficiency"] = summarize_data_efficiency(curve, personas)
        lines += ["", f"## Data efficiency ({state})", "", *data_efficiency_markdown(out["data_efficiency"])]
    return lines


if __name__ == "__main__":
    main()
