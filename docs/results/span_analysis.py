"""How much of each span's gain is the start prompt's? The quadratic model (`peft_personamux.contrast`) on cached
prompt gradients, for every headroom span with and without the start prompt as a code, and for the start alone.

Run from the repository root (about 15 minutes on 2 CPU cores the first time, seconds once the gradients are cached):

    python docs/results/span_analysis.py

Line gradients at the fits' start (the stage-1 codebook's mean pretraining mixture, docs/pretrained/stage1_codebook)
of the config's pretraining
sample (96 characters x 16 lines, bf16 autocast like the fits) and of the 12 unseen characters' training and
held-out lines (float32) are cached in ``eval_span_analysis/span_gradients.pt`` (not committed: 60 MB). The curvature
is the pretraining lines' empirical Fisher (shrinkage 0.2), as in the headroom run's quadratic table. Per span and
character: the predicted converged gain on the training lines and on the held-out lines, and the **signal**,
``h.x / 2`` for the converged step ``x`` (``h``: the held-out lines' gradient), the held-out gain without line noise;
``every direction`` gives the ceiling, ``h.H^-1.g / 2``. Writes docs/results/span_analysis.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from peft import PeftModel

from peft_personamux.codebook_init import codebook_from_gradients
from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.contrast import contrast_codebook, curvature, quadratic_gains
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import HeadroomSettings, pretraining_mean_mixture
from peft_personamux.evaluation.methods import codebook_tensors, random_codebook_like
from peft_personamux.evaluation.metrics import summarize
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.loss import FAST
from peft_personamux.prompt_gradients import LineGradients, prompt_line_gradients

SHRINKAGE = 0.2
OUT = Path("docs/results")
# the stage-1 codebook these analyses start from (shipped until the ninth pass; docs/pretrained/compute_codebook.py)
STAGE1 = Path("docs/pretrained/stage1_codebook")


def start_model(config: EvalConfig):
    """The stage-1 codebook with every pretraining and unseen persona at the fits' start mixture, frozen.

    Returns the evaluation, the model, its collator and the start mixture (num_codes,).
    """
    evaluation = Evaluation(config)
    base, tokenizer = evaluation.base()
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(STAGE1))
    split = evaluation.split
    names = sorted({r["persona"] for r in split.pretrain}) + list(evaluation.personas)
    model.add_personas(names, exist_ok=True)
    model.freeze()
    start = pretraining_mean_mixture(model)
    for name in names:
        model.set_mixture(name, start)
    collator = PersonaMuxCollator.for_model(model, tokenizer, **evaluation.mux_collator_kwargs())
    return evaluation, model, collator, start


def line_gradients(model, collator, rows, options, desc) -> LineGradients:
    """Every row's prompt gradient, batches of 20 rows sorted by persona (a persona's lines keep their order)."""
    rows = sorted(rows, key=lambda r: r["persona"])
    batches = [collator(rows[i : i + 20]) for i in range(0, len(rows), 20)]
    return prompt_line_gradients(model, batches, options, desc=desc)


def gradients(config: EvalConfig) -> dict:
    """Line gradients at the start prompt (cached): pretraining sample, unseen train and held-out lines."""
    cache = Path(config.output_dir) / "span_gradients.pt"
    if cache.is_file():
        return torch.load(cache)
    evaluation, model, collator, start = start_model(config)
    settings = HeadroomSettings.from_config(config)
    split = evaluation.split
    codebook, _ = codebook_tensors(model)
    data = {
        "pretrain": line_gradients(model, collator, split.pretrain, settings.fit_options, "pretraining lines"),
        "train": line_gradients(model, collator, split.train, FAST, "unseen training lines"),
        "test": line_gradients(model, collator, split.test, FAST, "unseen held-out lines"),
        "codebook": codebook.detach().float().clone(),
        "start_prompt": torch.einsum("c,ckd->kd", start, codebook.detach().float()),
        "personas": list(evaluation.personas),
    }
    data = {k: vars(v) if isinstance(v, LineGradients) else v for k, v in data.items()}
    torch.save(data, cache)
    return data


def gains(span: torch.Tensor | None, curv, g: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """Predicted converged train and held-out gains of a fit in ``span`` (None: everywhere), and its signal: with
    ``x = -A^-1 g``, train = g.A^-1.g / 2 and held-out = h.A^-1.g - g.A^-1.g / 2, so (train + held-out) / 2 = h.x / 2
    up to sign."""
    train, test = quadratic_gains(span, curv, g, h)
    return {"train": train, "test": test, "signal": (train + test) / 2}


def as_lines(stored: dict) -> LineGradients:
    return LineGradients(**{k: stored[k] for k in ("gradients", "tokens", "persona_ids")})


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_headroom100_contrast.json")
    args = parser.parse_args()
    config = EvalConfig(**{**read_config_file(args.config), "output_dir": "eval_span_analysis"})
    data = gradients(config)
    pre, train, test = as_lines(data["pretrain"]), as_lines(data["train"]), as_lines(data["test"])
    curv = curvature(pre, SHRINKAGE)
    learned, start = data["codebook"], data["start_prompt"]
    code_norm = float(learned.flatten(1).norm(dim=1).mean())
    n = learned.shape[0]
    codebooks = {
        "learned": learned,
        "random": random_codebook_like(learned, config.seed),
        "pca (whitened)": codebook_from_gradients(pre.persona_means(), n, code_norm, seed=0, scale="whiten")[0],
        "contrast": contrast_codebook(pre, n, code_norm, SHRINKAGE, "whiten", seed=0)[0],
    }
    spans: dict[str, torch.Tensor | None] = {"start prompt alone (1 code)": start[None]}
    for label, codes in codebooks.items():
        spans[f"{label} + start"] = torch.cat([codes.float(), start[None]])
        spans[f"{label}, without the start"] = codes.float()
    spans["every direction (free 8 tokens)"] = None
    personas = data["personas"]
    rows = sorted(set(train.persona_ids.tolist()))  # the unseen personas' table rows, in `personas` order
    train_means, test_means = train.persona_means(), test.persona_means()  # {row: (tokens_per_code, hidden)}
    per = {label: [gains(span, curv, train_means[r], test_means[r]) for r in rows] for label, span in spans.items()}
    result = {
        "config": args.config,
        "pretraining_lines": int(pre.gradients.shape[0]),
        "shrinkage": SHRINKAGE,
        "personas": personas,
        "spans": {
            label: {
                key: {
                    "per_persona": dict(zip(personas, [v[key] for v in values])),
                    **summarize([v[key] for v in values]),
                }
                for key in ("train", "test", "signal")
            }
            for label, values in per.items()
        },  # fmt: skip
    }
    (OUT / "span_analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result)
    return result


def cell(stats: dict) -> str:
    """``mean ± ci95`` of a `summarize` dict (no interval from one value)."""
    spread = "—" if stats["ci95"] is None else f"{stats['ci95']:.4f}"
    return f"{stats['mean']:.4f} ± {spread}"


def write_markdown(result: dict) -> None:
    spans = result["spans"]
    ceiling = spans["every direction (free 8 tokens)"]["signal"]["mean"]
    lines = [
        "# Span analysis: the quadratic model's converged gains, with and without the start prompt",
        "",
        f"Command: `python docs/results/span_analysis.py` (see its docstring). {len(result['personas'])} unseen "
        f"characters, 100 training and 20 held-out lines each; curvature from {result['pretraining_lines']} "
        f"pretraining lines, shrinkage {result['shrinkage']}. Gains over the start prompt in nats per token, mean ± "
        "95% CI over characters. Signal: the held-out gain of the converged fit without line noise; share: of the "
        "ceiling (every direction's signal).",
        "",
        "| span | predicted train gain | predicted held-out gain | signal | share of the ceiling |",
        "|---|---|---|---|---|",
    ]
    for label, s in spans.items():
        lines.append(
            f"| {label} | {cell(s['train'])} | {cell(s['test'])} | {cell(s['signal'])} | "
            f"{s['signal']['mean'] / ceiling:.2f} |"
        )
    (OUT / "span_analysis.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
