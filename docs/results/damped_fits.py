"""The cross-validated capture ratio, measured: fits damped as span_scaling.py's cross-validation picked, scored.

span_scaling.py predicts (quadratic model) that a fit damped by ``lambda / 2 * |change of the mixed tokens|^2``, with
lambda picked per character by 5-fold cross-validation on its own training lines, gains on held-out lines where the
converged fit does not, most of all the free prompt's. This script fits, for every third unseen character (4 of 12),
the learned codebook's 64 weights, the 8 free tokens and 64 weights on the principal directions of every cached
pretraining character's gradient (span_scaling.py's cache) from the fits' start prompt with that penalty
(`fitting.fit_mixtures(prompt_penalty=...)`, L-BFGS, ``STEPS`` iterations; mix64 in bf16 like the headroom fits,
free8 in float32, where its line search stalls in bf16) and scores
train and held-out lines exactly (float32). Run from the repository root after span_scaling.py (about 75 minutes on
2 CPU cores; resumable: each finished fit is saved):

    python docs/results/damped_fits.py

Writes docs/results/damped_fits.{json,md} with the measured gains over the start, the predicted ones, and the capture
ratio (mix64 / free8, of the mean held-out gains over the start; and over the zero mixture, the issue's definition).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from peft import PeftModel
from span_analysis import cell
from span_scaling import pretraining_gradients, scaling_config
from tqdm.auto import tqdm

from peft_personamux.codebook_init import codebook_from_gradients
from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import (
    HeadroomSettings,
    free_prompt_model,
    per_persona,
    pretraining_mean_mixture,
    row_losses,
    span_model,
)
from peft_personamux.evaluation.methods import codebook_tensors, zero_mixtures
from peft_personamux.evaluation.metrics import summarize
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.fitting import fit_mixtures

STEPS = 10  # L-BFGS iterations (at most 13 loss evaluations)
SPANS = {  # span_scaling's labels
    "mix64": "learned (shipped) codebook",
    "free8": "every direction (free 8 tokens)",
    "pca64": "pca, all characters",
}
OUT = Path("docs/results")
STATE = Path("eval_span_scaling/damped_fits.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_headroom100_contrast.json")
    parser.add_argument(
        "--report_only", action="store_true", help="Write the report from the fits saved so far (whole pairs only)."
    )
    args = parser.parse_args()
    scaling = json.loads((OUT / "span_scaling.json").read_text())
    if args.report_only:
        return write_report(json.loads(STATE.read_text()), scaling)
    config = EvalConfig(**{**read_config_file(args.config), "output_dir": "eval_span_analysis"})
    evaluation = Evaluation(config)
    unseen = scaling["personas"]
    personas = unseen[::3]  # 4 of 12: an hour of fitting on 2 cores
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    state.setdefault("personas", personas)
    if state["personas"] != personas:
        raise ValueError(f"{STATE} holds fits of other characters: remove it to start again.")
    settings = HeadroomSettings.from_config(config)
    base, tokenizer = evaluation.base()
    learned = PeftModel.from_pretrained(copy.deepcopy(base), str(evaluation.codebook_dir))
    learned.add_personas(personas, exist_ok=True)
    learned.freeze()
    split = evaluation.split
    train_rows = [r for r in split.train if r["persona"] in personas]
    test_rows = [r for r in split.test if r["persona"] in personas]

    def save() -> None:
        STATE.write_text(json.dumps(state, indent=1) + "\n")

    def collate(model, rows) -> dict:
        return PersonaMuxCollator.for_model(model, tokenizer, **evaluation.mux_collator_kwargs())(list(rows))

    def scores(model, train, test, label) -> dict:
        return {
            split_name: per_persona(rows, *row_losses(model, batch, settings.chunk_size, desc=f"score {label}"))
            for split_name, rows, batch in (("train", train_rows, train), ("test", test_rows, test))
        }

    codebook, _ = codebook_tensors(learned)
    start = pretraining_mean_mixture(learned)
    start_prompt = torch.einsum("c,ckd->kd", start, codebook.detach().float())  # (tokens_per_code, hidden)
    train, test = collate(learned, train_rows), collate(learned, test_rows)
    if "zero" not in state:
        zero_mixtures(learned, personas)
        state["zero"] = scores(learned, train, test, "zero")
        save()
    for name in personas:
        learned.set_mixture(name, start)
    if "start" not in state:
        state["start"] = scores(learned, train, test, "start")
        save()
    free = free_prompt_model(base, learned, start_prompt.shape[0])  # the identity codebook: a mixture is a prompt
    free.add_personas(personas)
    exact = dataclasses.replace(settings.fit_options, autocast_dtype=None)  # float32
    # the principal directions of every cached pretraining character's gradient (span_scaling.py), whitened like the
    # stage-1 gradient start, with the start prompt as one more code at weight 1 (as the headroom fits)
    pretrain, _ = pretraining_gradients(scaling_config(args.config))
    code_norm = float(codebook.detach().flatten(1).norm(dim=1).mean())
    pca, _ = codebook_from_gradients(pretrain.persona_means(), len(start), code_norm, seed=0, scale="whiten")
    pca_model = span_model(base, learned, torch.cat([pca, start_prompt[None]]))
    pca_model.add_personas(personas)
    offset = torch.cat([torch.zeros(len(start)), torch.ones(1)])
    fits = {  # label: (model, its start, its training and held-out batches, fit options)
        "mix64": (learned, start, train, test, settings.fit_options),
        "free8": (free, start_prompt.flatten(), collate(free, train_rows), collate(free, test_rows), exact),
        "pca64": (
            pca_model,
            offset,
            collate(pca_model, train_rows),
            collate(pca_model, test_rows),
            settings.fit_options,
        ),
    }
    dampings = {  # label -> character -> cross-validated damping, in units of the curvature's mean eigenvalue
        label: dict(zip(unseen, scaling["cross_validated"][span]["damping_over_mean_eigenvalue"]))
        for label, span in SPANS.items()
    }
    for name in tqdm(personas, desc="damped fits"):  # persona by persona: an interrupted run keeps whole sets
        for label, (model, model_start, span_train, span_test, options) in fits.items():
            done = state.setdefault(label, {})
            if name in done:
                continue
            row = model.persona_index(name)
            factor = dampings[label][name]
            penalty = factor * scaling["mean_eigenvalue"]
            model.set_mixture(name, model_start)
            keep = span_train["persona_ids"] == row
            out = fit_mixtures(
                model,
                {k: v[keep] for k, v in span_train.items()},
                method="lbfgs",
                steps=STEPS,
                chunk_size=settings.chunk_size,
                bias_scale=1.0,
                progress=False,
                options=options,
                prompt_penalty=penalty,
            )
            scored = {
                split_name: row_losses(
                    model, {k: v[batch["persona_ids"] == row] for k, v in batch.items()}, settings.chunk_size
                )
                for split_name, batch in (("train", span_train), ("test", span_test))
            }  # summed NLL and tokens per line, exact float32
            done[name] = {
                "penalty": penalty,
                "damping_over_mean_eigenvalue": factor,
                "curve": out.persona_curves[row],
                "objective": out.losses,
                "seconds": out.seconds,
                **{k: float(nll.sum() / tokens.sum()) for k, (nll, tokens) in scored.items()},
            }
            save()
    write_report(state, scaling)


def write_report(state: dict, scaling: dict) -> None:
    result = report(state, scaling)
    (OUT / "damped_fits.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result)


def report(state: dict, scaling: dict) -> dict:
    """Measured gains over the start and the zero mixture, predicted gains, capture ratios."""
    spans = [label for label in SPANS if label in state]
    personas = [p for p in state["personas"] if all(p in state[label] for label in spans)]  # whole sets
    unseen = scaling["personas"]
    result: dict = {"personas": personas, "planned": state["personas"], "steps": STEPS, "spans": {}}
    for label in spans:
        span, fits = SPANS[label], state[label]
        predicted = dict(zip(unseen, scaling["cross_validated"][span]["held_out_gain"]["per_persona"]))
        stats = {}
        for split_name in ("train", "test"):
            over_start = [state["start"][split_name][p] - fits[p][split_name] for p in personas]
            over_zero = [state["zero"][split_name][p] - fits[p][split_name] for p in personas]
            stats[split_name] = {
                "over_start": {**summarize(over_start), "per_persona": over_start},
                "over_zero": {**summarize(over_zero), "per_persona": over_zero},
            }
        expected = [predicted[p] for p in personas]
        stats["predicted_held_out_over_start"] = {**summarize(expected), "per_persona": expected}
        stats["evaluations"] = summarize([len(fits[p]["curve"]) for p in personas])
        stats["damping_over_mean_eigenvalue"] = [fits[p]["damping_over_mean_eigenvalue"] for p in personas]
        result["spans"][label] = stats
    mix, free = result["spans"]["mix64"]["test"], result["spans"]["free8"]["test"]
    result["capture_ratio_over_start"] = mix["over_start"]["mean"] / free["over_start"]["mean"]
    result["capture_ratio_over_zero"] = mix["over_zero"]["mean"] / free["over_zero"]["mean"]
    if "pca64" in result["spans"]:
        pca = result["spans"]["pca64"]["test"]
        result["pca64_capture_ratio_over_start"] = pca["over_start"]["mean"] / free["over_start"]["mean"]
        result["pca64_capture_ratio_over_zero"] = pca["over_zero"]["mean"] / free["over_zero"]["mean"]
    return result


def write_markdown(result: dict) -> None:
    lines = [
        "# Damped fits: the cross-validated capture ratio, measured",
        "",
        f"Command: `python docs/results/damped_fits.py` (see its docstring). {len(result['personas'])} unseen "
        f"characters ({', '.join(result['personas'])}"
        + (
            f"; {len(result['planned'])} planned, the run was stopped early"
            if result["planned"] != result["personas"]
            else ""
        )
        + "), 100 training and 20 held-out lines each; every fit starts "
        f"at the fits' start prompt (the shipped codebook's mean pretraining mixture), L-BFGS for {result['steps']} "
        "iterations on the mean token loss plus `lambda / 2 * |change of the mixed tokens|^2`, lambda from "
        "span_scaling.py's 5-fold cross-validation on each character's training lines; mix64 fitted in bf16 like "
        "the headroom fits, free8 in float32 (bf16 stalls its line search). Scores in float32. Gains in nats per "
        "token, mean ± 95% CI over characters; predicted: the quadratic model's damped held-out gain.",
        "",
        "| span | train gain over the start | held-out gain over the start | predicted held-out gain | "
        "held-out gain over the zero mixture | loss evaluations |",
        "|---|---|---|---|---|---|",
    ]
    for label, stats in result["spans"].items():
        lines.append(
            f"| {label} | {cell(stats['train']['over_start'])} | {cell(stats['test']['over_start'])} | "
            f"{cell(stats['predicted_held_out_over_start'])} | {cell(stats['test']['over_zero'])} | "
            f"{stats['evaluations']['mean']:.1f} |"
        )
    lines += [
        "",
        "Per character, held-out gain over the start (measured / predicted) and the damping (x the curvature's mean "
        "eigenvalue):",
        "",
        "| character | "
        + " | ".join(f"{label} measured | {label} predicted | {label} damping" for label in SPANS)
        + " |",
        "|---|" + "---|" * 3 * len(SPANS),
    ]
    for i, name in enumerate(result["personas"]):
        cells = []
        for stats in result["spans"].values():
            measured = stats["test"]["over_start"]["per_persona"][i]
            predicted = stats["predicted_held_out_over_start"]["per_persona"][i]
            cells += [f"{measured:.4f}", f"{predicted:.4f}", f"{stats['damping_over_mean_eigenvalue'][i]:g}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Capture ratio (mix64 / free8, mean held-out gains): {result['capture_ratio_over_start']:.2f} over the "
        f"start, {result['capture_ratio_over_zero']:.2f} over the zero mixture (the issue's (zero - mix64) / "
        "(zero - free8))."
        + (
            f" pca64: {result['pca64_capture_ratio_over_start']:.2f} over the start, "
            f"{result['pca64_capture_ratio_over_zero']:.2f} over the zero mixture."
            if "pca64" in result["spans"]
            else ""
        ),
    ]
    (OUT / "damped_fits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
