"""The data-efficiency curve on the 100-line evaluation's split, and the learned/random gain ratio per size.

configs/eval_core100.json left the data-efficiency stage out (too long for one session beside the rest). This script
runs that stage (`evaluation.data_efficiency.run_data_efficiency`) on the same split, codebook and fits at the sizes
below 100, and takes the 100-line points from the finished run (docs/results/core100/stages): each row is fitted as
its row in the run is (Persona-Mux: L-BFGS from the mean pretraining mixture, ``lbfgs_steps`` per character;
random codebook: ``random_codebook_method`` from zero; SP: ``sp_steps`` of Adam), on the first n of each character's
100 training lines, and scored on the same 20 held-out lines. Before anything is fitted, the zero mixture's held-out
losses are checked against the run's (the same lines and codebook, or the script stops), as is the config's
fingerprint.

Run from the repository root (on 2 CPU cores about an hour; resumable: each finished row and size is saved in
docs/results/data_efficiency_core100_state.json):

    python docs/results/data_efficiency_core100.py
    python docs/results/data_efficiency_core100.py --report_only

Writes docs/results/data_efficiency_core100.{md,json,png} and data_efficiency_core100_paired.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.data_efficiency import (
    data_efficiency_markdown,
    data_efficiency_rows,
    plot_data_efficiency,
    plot_size_curves,
    run_data_efficiency,
    summarize_data_efficiency,
)
from peft_personamux.evaluation.metrics import paired_difference
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.files import write_json

HERE = Path(__file__).resolve().parent
RUN = HERE / "core100"
STATE = HERE / "data_efficiency_core100_state.json"
OUT = HERE / "data_efficiency_core100"
# the run's rows at 100 lines: stage file, key in the data-efficiency result
RUN_ROWS = {"pm_lbfgs": "personamux_lbfgs", "random_codebook": "random_codebook", "sp": "sp"}


def run_points(stages: Path) -> dict:
    """The run's held-out losses per character at its ``num_train`` lines, keyed as the data-efficiency stage keys
    them, and its zero mixture."""
    out = {"zero": json.loads((stages / "pm_zero.json").read_text())["test"]}
    for stage, key in RUN_ROWS.items():
        out[key] = json.loads((stages / f"{stage}.json").read_text())["heldout_loss"]["1.0"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/eval_core100.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--fits", nargs="+", default=["lbfgs", "random"], help="data_efficiency_fits names.")
    parser.add_argument("--output_dir", default="eval_core100", help="The evaluation's working folder (caches).")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    config = EvalConfig(**{**read_config_file(args.config), "output_dir": args.output_dir})
    if not args.report_only:
        ran_with = json.loads((RUN / "stages" / "config_fingerprint.json").read_text())["fingerprint"]
        if config.fingerprint() != ran_with:
            raise SystemExit(f"{args.config} is not the config {RUN} ran with (fingerprint {ran_with}).")
        if state and (state.get("config_fingerprint") != config.fingerprint() or state.get("fits") != args.fits):
            raise SystemExit(f"{STATE} was made with another config or --fits: move it away to start again.")
        evaluation = Evaluation(config)
        ran = run_points(RUN / "stages")
        if "zero" not in state.get("curve", {}):
            curve = run_data_efficiency(evaluation, [], ())  # the zero mixture only
            worst = max(abs(curve["zero"][p] - ran["zero"][p]) for p in evaluation.personas)
            if worst > 1e-4:
                raise SystemExit(f"The zero mixture scores {worst:.2e} away from the run's: not the same lines.")
            state = {"config_fingerprint": config.fingerprint(), "fits": args.fits, "curve": curve}
            STATE.write_text(json.dumps(state, indent=1) + "\n")

        def save(partial: dict) -> None:
            state["curve"] = partial
            STATE.write_text(json.dumps(state, indent=1) + "\n")

        save(run_data_efficiency(evaluation, args.sizes, args.fits, partial=state["curve"], save=save))
    write_report(state, EvalConfig(**read_config_file(args.config)))


def write_report(state: dict, config: EvalConfig) -> None:
    curve, ran = dict(state["curve"]), run_points(RUN / "stages")
    personas = sorted(ran["zero"])
    for key in RUN_ROWS.values():  # the run's 100-line points
        curve.setdefault(key, {})[str(config.num_train)] = ran[key]
    curve["sizes"] = sorted({*curve["sizes"], config.num_train})
    summary = summarize_data_efficiency(curve, personas)
    plot = plot_data_efficiency(summary, OUT.with_suffix(".png"))
    gains = {
        key: {
            n: paired_difference(curve[key][n], curve["zero"], personas)
            for n in map(str, curve["sizes"])
            if n in curve[key]
        }
        for key in ("personamux_lbfgs", "random_codebook", "sp")
        if key in curve
    }
    paired = plot_paired(gains, curve["sizes"], HERE / (OUT.name + "_paired.png"))
    write_json(
        OUT.with_suffix(".json"),
        {"config": dataclasses.asdict(config), "curve": curve, "summary": summary, "minus_zero": gains},
        indent=1,
    )
    lines = [
        "# Data efficiency on the 100-line evaluation's split",
        "",
        "`python docs/results/data_efficiency_core100.py` (the 100-line points are the finished run's, "
        "docs/results/core100). Held-out loss, mean ± 95% CI over the 12 unseen characters, after fitting on the "
        "first n training lines of each:",
        "",
        *data_efficiency_markdown(summary),
        "",
        "A ratio is — where the random codebook gains nothing over the zero mixture on average (no ratio to take). "
        f"SP is the run's: {config.sp_steps} Adam steps at lr {config.sp_lr} from random vocabulary rows, not "
        "converged (docs/results/converged_sp.md fits it further at 100 lines).",
        "",
        "Fit minus the zero mixture, per character (mean ± 95% CI; fit lower on k of 12):",
        "",
        "| training lines | " + " | ".join(map(str, curve["sizes"])) + " |",
        "|---|" + "---|" * len(curve["sizes"]),
    ]
    labels = {key: label for key, label in data_efficiency_rows(curve)}
    for key, by_size in gains.items():
        cells = []
        for n in map(str, curve["sizes"]):
            d = by_size.get(n)
            cells.append("n/a" if d is None else f"{d['mean']:+.3f} ± {d['ci95']:.3f} ({d['lower']})")
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    lines += ["", f"![data efficiency]({Path(plot).name})", "", f"![paired gains]({Path(paired).name})"]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_paired(gains: dict, sizes: list[int], path: Path) -> str:
    """Persona-Mux's and the random codebook's held-out loss minus the zero mixture's, paired per character."""
    rows = {"personamux_lbfgs": "Persona-Mux, L-BFGS from the mean", "random_codebook": "random codebook"}
    series = {label: gains[key] for key, label in rows.items() if key in gains}
    return plot_size_curves(series, sizes, "held-out loss - zero mixture's (paired)", path, reference=0.0)


if __name__ == "__main__":
    main()
