"""The cross-validated capture ratio, measured: fits damped as cross-validation picks, scored.

span_scaling.py predicts (quadratic model) that a fit damped by ``lambda / 2 * |change of the mixed tokens|^2``, with
lambda picked per character by 5-fold cross-validation on its own training lines, gains on held-out lines where the
converged fit does not, most of all the free prompt's. This script fits each unseen character (``--personas all``,
the default, or ``every_third``) in each span of ``--spans`` from the fits' start prompt with that penalty
(`fitting.fit_mixtures(prompt_penalty=...)`, L-BFGS, ``STEPS`` iterations) and scores train and held-out lines
exactly (float32). Spans: ``mix64`` the stage-1 codebook's 64 weights (docs/pretrained/stage1_codebook), ``free8``
the 8 free tokens (float32: in bf16 its line search stalls), ``pca64`` 64 weights on the principal directions of
every cached pretraining character's gradient (span_scaling.py's cache) plus the start prompt, ``ship64`` the shipped
codebook (docs/pretrained/compute_codebook.py; its dampings and predictions are computed here with span_scaling.py's
curvature), ``rand64`` 64 weights on span_scaling.py's random codebook (Gaussian codes with the stage-1 codes'
norms, seed 0) plus the start prompt, ``randz64`` the same 64 random codes alone, fitted from the zero mixture (a
random codebook has no pretraining mixtures to start from: the paper's ablation, with these fits; no quadratic
prediction, as the gradient cache is at the start prompt, and rand64's dampings). Only the spans asked for are built
(pca64, and ship64's predictions when they are not saved yet, need span_scaling.py's gradient cache). The 64-weight
spans fit in bf16 like the headroom fits. Run from the repository root after span_scaling.py (on 2 CPU cores about
4.5 minutes per character for a 64-weight span, 9.5 for free8; resumable: each finished fit is saved in
eval_span_scaling/damped_fits.json):

    python docs/results/damped_fits.py --spans ship64
    python docs/results/damped_fits.py --report_only

Writes docs/results/damped_fits.{json,md}: per span, on the characters it has fitted, the measured gains over the
start and over the zero mixture, the predicted ones, and the capture ratio against free8 on the characters both have
(of the mean held-out gains over the start, and over the zero mixture: the issue's definition).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from peft import PeftModel
from span_analysis import SHRINKAGE, STAGE1, as_lines, cell, gradients
from span_scaling import pretraining_gradients, scaling_config
from tqdm.auto import tqdm

from peft_personamux.codebook_init import codebook_from_gradients
from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.contrast import cross_validated_gains, curvature
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import (
    HeadroomSettings,
    free_prompt_model,
    identification,
    per_persona,
    pretraining_mean_mixture,
    row_losses,
    span_model,
)
from peft_personamux.evaluation.methods import codebook_tensors, random_codebook_like, zero_mixtures
from peft_personamux.evaluation.metrics import gain_ratio, summarize
from peft_personamux.evaluation.report import ratio_cell
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.fitting import fit_mixtures

STEPS = 10  # L-BFGS iterations (at most 13 loss evaluations)
SPANS = {  # span_scaling's labels (ship64's predictions are computed here)
    "mix64": "learned (shipped) codebook",
    "free8": "every direction (free 8 tokens)",
    "pca64": "pca, all characters",
    "rand64": "random codebook",
    "randz64": "random codebook from the zero mixture",
    "ship64": "shipped (computed) codebook",
}
OUT = Path("docs/results")
STATE = Path("eval_span_scaling/damped_fits.json")
SHIPPED = Path("src/peft_personamux/pretrained/shakespeare")  # docs/pretrained/compute_codebook.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_headroom100_contrast.json")
    parser.add_argument(
        "--report_only", action="store_true", help="Write the report from the fits saved so far (whole pairs only)."
    )
    parser.add_argument(
        "--spans", nargs="+", default=list(SPANS), choices=list(SPANS), help="Spans to fit (default: all)."
    )
    parser.add_argument(
        "--identify",
        action="store_true",
        help="Score every character's held-out lines under every character's fitted mixture (64-weight spans).",
    )
    parser.add_argument(
        "--personas", choices=("every_third", "all"), default="all", help="Every third unseen character, or all 12."
    )
    args = parser.parse_args()
    scaling = json.loads((OUT / "span_scaling.json").read_text())
    if args.report_only:
        return write_report(json.loads(STATE.read_text()), scaling)
    config = EvalConfig(**{**read_config_file(args.config), "output_dir": "eval_span_analysis"})
    evaluation = Evaluation(config)
    unseen = scaling["personas"]
    personas = unseen if args.personas == "all" else unseen[::3]
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    state["personas"] = [p for p in unseen if p in set(personas) | set(state.get("personas", []))]
    settings = HeadroomSettings.from_config(config)
    base, tokenizer = evaluation.base()
    learned = PeftModel.from_pretrained(copy.deepcopy(base), str(STAGE1))
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
    if any(p not in state.get("zero", {}).get("test", {}) for p in personas):
        zero_mixtures(learned, personas)
        state["zero"] = merge(state.get("zero"), scores(learned, train, test, "zero"))
        save()
    for name in personas:
        learned.set_mixture(name, start)
    if any(p not in state.get("start", {}).get("test", {}) for p in personas):
        state["start"] = merge(state.get("start"), scores(learned, train, test, "start"))
        save()
    exact = dataclasses.replace(settings.fit_options, autocast_dtype=None)  # float32
    offset = torch.cat([torch.zeros(len(start)), torch.ones(1)])  # a span's own codes at 0, the start prompt at 1

    def with_start(codes: torch.Tensor) -> tuple:
        """A 65-code span: ``codes`` plus the start prompt as one more code at weight 1 (as the headroom fits)."""
        model = span_model(base, learned, torch.cat([codes, start_prompt[None]]))
        model.add_personas(personas)
        return model, offset, collate(model, train_rows), collate(model, test_rows), settings.fit_options

    def free8() -> tuple:  # the identity codebook: a mixture is a prompt
        free = free_prompt_model(base, learned, start_prompt.shape[0])
        free.add_personas(personas)
        return free, start_prompt.flatten(), collate(free, train_rows), collate(free, test_rows), exact

    def pca64() -> tuple:
        # the principal directions of every cached pretraining character's gradient (span_scaling.py), whitened like
        # the stage-1 gradient start
        pretrain, _ = pretraining_gradients(scaling_config(args.config))
        code_norm = float(codebook.detach().flatten(1).norm(dim=1).mean())
        pca, _ = codebook_from_gradients(pretrain.persona_means(), len(start), code_norm, seed=0, scale="whiten")
        return with_start(pca)

    def rand64() -> tuple:
        # span_scaling.py's "random codebook": Gaussian codes of the stage-1 codebook's shape and code norms (seed 0)
        return with_start(random_codebook_like(codebook.detach().float(), 0))

    def ship64() -> tuple:
        # the shipped codebook (docs/pretrained/compute_codebook.py): its code 0 is the start prompt, and its mean
        # pretraining mixture, where the library's fits start, is e_0
        shipped = PeftModel.from_pretrained(copy.deepcopy(base), str(SHIPPED))
        shipped.add_personas(personas, exist_ok=True)
        shipped.freeze()
        shipped_start = pretraining_mean_mixture(shipped)
        shipped_codes = codebook_tensors(shipped)[0].detach().float()
        shipped_prompt = torch.einsum("c,ckd->kd", shipped_start, shipped_codes)
        torch.testing.assert_close(shipped_prompt, start_prompt, atol=1e-4, rtol=1e-4)  # the same start as the others
        if "ship64" not in state.setdefault("predicted", {}):
            pretrain, _ = pretraining_gradients(scaling_config(args.config))
            state["predicted"]["ship64"] = shipped_predictions(shipped_codes, pretrain, unseen, config)
            save()
        return shipped, shipped_start, collate(shipped, train_rows), collate(shipped, test_rows), settings.fit_options

    builders = {"mix64": lambda: (learned, start, train, test, settings.fit_options), "free8": free8}

    def randz64() -> tuple:
        model = span_model(base, learned, random_codebook_like(codebook.detach().float(), 0))
        model.add_personas(personas)
        zero = torch.zeros(len(start))
        return model, zero, collate(model, train_rows), collate(model, test_rows), settings.fit_options

    builders |= {"pca64": pca64, "rand64": rand64, "randz64": randz64, "ship64": ship64}
    # label: (model, its start, its training and held-out batches, fit options); only the spans asked for are built
    fits = {label: builders[label]() for label in args.spans}
    dampings = {label: {p: v[1] for p, v in predictions(label, state, scaling).items()} for label in fits}
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
                "mixture": model.get_mixture(name).detach().float().tolist() if label != "free8" else None,
                **{k: float(nll.sum() / tokens.sum()) for k, (nll, tokens) in scored.items()},
            }
            save()
    if args.identify:
        for label, (model, _, _, span_test, _) in fits.items():
            done = state.get(label, {})
            if label == "free8" or label in state.get("identification", {}):
                continue
            if not all(done.get(p, {}).get("mixture") for p in personas):
                print(f"{label}: not every character has a saved mixture; no identification.")
                continue
            for name in personas:
                model.set_mixture(name, torch.tensor(done[name]["mixture"]))
            state.setdefault("identification", {})[label] = identification(
                model, span_test, test_rows, personas, settings.chunk_size
            )
            save()
    write_report(state, scaling)


def merge(old: dict | None, new: dict) -> dict:
    """Per-split persona scores: ``new`` over ``old``."""
    return {split_name: {**(old or {}).get(split_name, {}), **scores} for split_name, scores in new.items()}


def shipped_predictions(codes: torch.Tensor, pretrain, unseen: list[str], config: EvalConfig) -> dict:
    """The quadratic model's cross-validated damped held-out gain and damping per unseen character for the shipped
    codebook, as span_scaling.py computes them for the other spans (same curvature, same cached gradients)."""
    cached = gradients(config)
    if cached["personas"] != unseen:
        raise ValueError("span_analysis.py's cached gradients are of other characters.")
    train, test = as_lines(cached["train"]), as_lines(cached["test"])
    rows = sorted(set(train.persona_ids.tolist()))
    h = test.persona_means()
    damped = cross_validated_gains(codes, curvature(pretrain, SHRINKAGE), train, {r: h[r] for r in rows})
    return {name: list(damped[r]) for name, r in zip(unseen, rows)}


def predictions(label: str, state: dict, scaling: dict) -> dict[str, tuple[float, float]]:
    """Character -> (predicted damped held-out gain over the start, damping over the mean eigenvalue)."""
    if label in state.get("predicted", {}):
        return {p: tuple(v) for p, v in state["predicted"][label].items()}
    if label == "randz64":  # no prediction from the zero mixture (the cached gradients are at the start prompt)
        return {p: (float("nan"), damping) for p, (_, damping) in predictions("rand64", state, scaling).items()}
    stats = scaling["cross_validated"][SPANS[label]]
    return dict(
        zip(scaling["personas"], zip(stats["held_out_gain"]["per_persona"], stats["damping_over_mean_eigenvalue"]))
    )


def write_report(state: dict, scaling: dict) -> None:
    result = report(state, scaling)
    (OUT / "damped_fits.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result)


def report(state: dict, scaling: dict) -> dict:
    """Per span, on the characters it has fitted: measured gains over the start and the zero mixture, predicted gains,
    and its capture ratio against the free prompt on the characters both have."""
    spans = [label for label in SPANS if state.get(label)]
    result: dict = {"planned": state["personas"], "steps": STEPS, "spans": {}}
    for label in spans:
        fits = state[label]
        personas = [p for p in state["personas"] if p in fits]
        predicted = predictions(label, state, scaling)
        stats: dict = {"personas": personas}
        for split_name in ("train", "test"):
            over_start = [state["start"][split_name][p] - fits[p][split_name] for p in personas]
            over_zero = [state["zero"][split_name][p] - fits[p][split_name] for p in personas]
            stats[split_name] = {
                "over_start": {**summarize(over_start), "per_persona": over_start},
                "over_zero": {**summarize(over_zero), "per_persona": over_zero},
            }
        expected = [predicted[p][0] for p in personas]
        stats["predicted_held_out_over_start"] = {**summarize(expected), "per_persona": expected}
        stats["evaluations"] = summarize([len(fits[p]["curve"]) for p in personas])
        stats["damping_over_mean_eigenvalue"] = [fits[p]["damping_over_mean_eigenvalue"] for p in personas]
        result["spans"][label] = stats
    for label in spans:
        if label != "free8" and (ratios := gain_ratios(state, label, "free8", result["spans"][label]["personas"])):
            result["spans"][label]["capture_ratio"] = ratios
    for random_label in ("rand64", "randz64"):
        for label in spans:
            if label in ("free8", "rand64", "randz64"):
                continue
            if ratios := gain_ratios(state, label, random_label, result["spans"][label]["personas"]):
                result["spans"][label].setdefault("ratio_to_random", {})[random_label] = ratios
    for label, found in state.get("identification", {}).items():
        result["spans"][label]["identification"] = {k: found[k] for k in ("accuracy", "chance", "predicted")}
    return result


def gain_ratios(state: dict, label: str, reference: str, personas: list[str]) -> dict | None:
    """Mean held-out gain of ``label`` over that of ``reference``, over the start and over the zero mixture, on the
    characters both have fitted, each with its 95% bootstrap interval over characters (None when there are none)."""
    common = [p for p in personas if p in state.get(reference, {})]
    if not common:
        return None
    ratios: dict = {"personas": len(common)}
    for over in ("start", "zero"):
        mine = {p: state[label][p]["test"] for p in common}
        theirs = {p: state[reference][p]["test"] for p in common}
        found = gain_ratio(state[over]["test"], mine, theirs, common)
        ratios[f"over_{over}"] = found["ratio"]  # None: the reference gains nothing on average
        ratios[f"over_{over}_bootstrap"] = found
    return ratios


def predicted_cell(stats: dict) -> str:
    return "—" if stats["mean"] is None else cell(stats)


def write_markdown(result: dict) -> None:
    lines = [
        "# Damped fits: the cross-validated capture ratio, measured",
        "",
        "Command: `python docs/results/damped_fits.py` (see its docstring). Unseen characters, 100 training and 20 "
        "held-out lines each; every fit starts at the fits' start prompt (the stage-1 codebook's mean pretraining "
        f"mixture; the shipped codebook's own mean mixture is the same prompt), L-BFGS for {result['steps']} "
        "iterations on the mean token loss plus `lambda / 2 * |change of the mixed tokens|^2`, lambda from 5-fold "
        "cross-validation on each character's training lines (quadratic model); the 64-weight spans fitted in bf16 "
        "like the headroom fits, free8 in float32 (bf16 stalls its line search). Scores in float32. Gains in nats per "
        "token, mean ± 95% CI over the characters each span has fitted; predicted: the quadratic model's damped "
        "held-out gain. Spans: mix64 the stage-1 codebook (shipped until the ninth pass), free8 every direction "
        "(8 free tokens), pca64 the principal directions of all pretraining characters' gradients plus the start "
        "prompt (65 codes), rand64 Gaussian codes with the stage-1 codes' norms plus the start prompt (65 codes), "
        "randz64 the same Gaussian codes alone, fitted from the zero mixture (no prediction; rand64's dampings; its "
        "gains over the start are negative by construction: read its gains over the zero mixture), "
        "ship64 the shipped codebook (docs/pretrained/compute_codebook.py: the start prompt and "
        "63 of those directions).",
        "",
        "| span | characters | train gain over the start | held-out gain over the start | predicted held-out gain | "
        "held-out gain over the zero mixture | capture ratio over the zero mixture (over the start), 95% bootstrap "
        "intervals, same characters "
        "| loss evaluations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, stats in result["spans"].items():
        ratio = stats.get("capture_ratio")
        capture = (
            f"{ratio_cell(ratio['over_zero_bootstrap'])} ({ratio_cell(ratio['over_start_bootstrap'])}), "
            f"{ratio['personas']}"
            if ratio
            else "1"
        )
        lines.append(
            f"| {label} | {len(stats['personas'])} | {cell(stats['train']['over_start'])} | "
            f"{cell(stats['test']['over_start'])} | {predicted_cell(stats['predicted_held_out_over_start'])} | "
            f"{cell(stats['test']['over_zero'])} | {capture} | {stats['evaluations']['mean']:.1f} |"
        )
    for label, stats in result["spans"].items():
        for random_label, ratio in stats.get("ratio_to_random", {}).items():
            # randz64 starts at the zero mixture, not the start prompt: only its gain over zero means anything
            over_start = (
                "" if random_label == "randz64" else f"; over the start {ratio_cell(ratio['over_start_bootstrap'])}"
            )
            lines += [
                "",
                f"Ratio to the random codebook {random_label}, {label}: mean held-out gain over the zero mixture "
                f"{ratio_cell(ratio['over_zero_bootstrap'])} {random_label}'s{over_start} (95% bootstrap intervals "
                f"over characters), on the {ratio['personas']} characters both have fitted.",
            ]
    for label, stats in result["spans"].items():
        if "identification" in stats:
            found = stats["identification"]
            hits = round(found["accuracy"] / found["chance"])
            lines += [
                "",
                f"Likelihood identification, {label}: each character's held-out lines scored under every character's "
                f"fitted mixture; the lowest loss names the true character {hits} times of {len(stats['personas'])} "
                f"(accuracy {found['accuracy']:.2f}, chance {found['chance']:.2f}: {hits}x chance).",
            ]
    spans = list(result["spans"])
    lines += [
        "",
        "Per character, held-out gain over the start (measured / predicted) and the damping (x the curvature's mean "
        "eigenvalue); blank where a span has not fitted the character:",
        "",
        "| character | "
        + " | ".join(f"{label} measured | {label} predicted | {label} damping" for label in spans)
        + " |",
        "|---|" + "---|" * 3 * len(spans),
    ]
    for name in result["planned"]:
        cells = []
        for stats in result["spans"].values():
            if name not in stats["personas"]:
                cells += ["", "", ""]
                continue
            i = stats["personas"].index(name)
            measured = stats["test"]["over_start"]["per_persona"][i]
            predicted = stats["predicted_held_out_over_start"]["per_persona"][i]
            cells += [f"{measured:.4f}", f"{predicted:.4f}", f"{stats['damping_over_mean_eigenvalue'][i]:g}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (OUT / "damped_fits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
