"""Would more pretraining characters, or more lines each, give a codebook that carries unseen characters?

The quadratic model (`peft_personamux.contrast`) on cached prompt gradients, as in span_analysis.py, with the
codebook built from subsets of the whole pretraining split: N characters (random draws) x L lines each. Run from the
repository root (about 30 minutes on 2 CPU cores for the gradients, resumable; about 10 once they are cached):

    python docs/results/span_scaling.py

Line gradients at the fits' start (the stage-1 codebook's mean pretraining mixture, docs/pretrained/stage1_codebook)
of every pretraining character
with at least ``min_lines`` lines, ``LINES`` random lines each (bf16 autocast like the fits), are cached by chunks of
characters in ``eval_span_scaling/`` (not committed); the 12 unseen characters' gradients are span_analysis.py's
(``eval_span_analysis/span_gradients.pt``, computed first when missing). Every span is scored under one curvature,
the empirical Fisher of all the cached pretraining lines (shrinkage 0.2), so that rows differ by their span only.

Per (N, L): the whitened principal directions of the N characters' mean gradients (the stage-1 gradient start) and
the contrast codebook of their lines, 64 codes each; the predicted converged held-out gain over the start on the
unseen characters, the signal and its share of the ceiling, and the ratio to a random codebook's. Also the
**cross-validated capture ratio**: each fit damped (``x = -(A + lambda)^-1 g``, the quadratic model's early stopping)
by the damping that 5-fold cross-validation on the character's own training lines picks, then (span gain) / (free
8 tokens' gain) on held-out lines. Writes docs/results/span_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from span_analysis import SHRINKAGE, as_lines, cell, gradients, line_gradients, start_model
from tqdm.auto import tqdm

from peft_personamux.codebook_init import codebook_from_gradients
from peft_personamux.contrast import contrast_codebook, cross_validated_gains, curvature, quadratic_gain_rows
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import HeadroomSettings
from peft_personamux.evaluation.methods import random_codebook_like
from peft_personamux.evaluation.metrics import summarize
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.prompt_gradients import LineGradients

NUM_CODES = 64
COUNTS = (12, 24, 48, 96)  # pretraining characters per codebook, and all of them
LINE_COUNTS = (4, 8, 16, 40)  # lines per character
DRAWS = 3  # random subsets per (characters, lines)
RANDOM_DRAWS = 5
LINES = 40  # lines per pretraining character (min_lines is 40: every character gives as many)
CHUNK = 16  # characters per cached chunk
CACHE = Path("eval_span_scaling")
OUT = Path("docs/results")


def scaling_config(config_path: str) -> EvalConfig:
    """The span analysis config with the whole pretraining split, ``LINES`` lines per character."""
    overrides = {"output_dir": str(CACHE), "pretrain_personas": None, "pretrain_lines_per_persona": LINES}
    return EvalConfig(**{**read_config_file(config_path), **overrides})


def pretraining_gradients(config: EvalConfig) -> tuple[LineGradients, list[str]]:
    """Every pretraining character's line gradients (``persona_ids``: indices into the returned names), by chunks."""
    split = Evaluation(config).split
    names = sorted({r["persona"] for r in split.pretrain})
    chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
    paths = [CACHE / f"pretrain_{i:03d}.pt" for i in range(len(chunks))]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        _, model, collator, _ = start_model(config)
        options = HeadroomSettings.from_config(config).fit_options
        index = {model.persona_index(name): names.index(name) for name in names}  # table row -> position in names
        for i in missing:
            chosen = set(chunks[i])
            rows = [r for r in split.pretrain if r["persona"] in chosen]
            lines = line_gradients(model, collator, rows, options, f"pretraining lines, chunk {i + 1}/{len(chunks)}")
            lines.persona_ids = torch.tensor([index[int(row)] for row in lines.persona_ids])
            tmp = paths[i].with_suffix(".tmp")
            torch.save(vars(lines), tmp)
            tmp.replace(paths[i])  # a chunk is whole or absent: an interrupted run resumes at it
    parts = [torch.load(path) for path in paths]
    merged = LineGradients(
        *(torch.cat([part[key] for part in parts]) for key in ("gradients", "tokens", "persona_ids"))
    )
    return merged, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_headroom100_contrast.json")
    parser.add_argument("--only_gradients", action="store_true", help="Cache the gradients and stop.")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    pretrain, names = pretraining_gradients(scaling_config(args.config))
    unseen = gradients(EvalConfig(**{**read_config_file(args.config), "output_dir": "eval_span_analysis"}))
    print(f"{pretrain.gradients.shape[0]} pretraining lines of {len(names)} characters; unseen: {unseen['personas']}")
    if args.only_gradients:
        return
    result = {"config": args.config, **analyse(pretrain, names, unseen, random.Random(0))}
    (OUT / "span_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result)


def subset(lines: LineGradients, personas: list[int], per_persona: int, rng: random.Random) -> LineGradients:
    """``per_persona`` random lines of each of ``personas``."""
    keep = []
    for persona in personas:
        rows = (lines.persona_ids == persona).nonzero()[:, 0].tolist()
        keep += sorted(rng.sample(rows, min(per_persona, len(rows))))
    index = torch.tensor(keep)
    return LineGradients(lines.gradients[index], lines.tokens[index], lines.persona_ids[index])


def summary(values: torch.Tensor) -> dict:
    """Mean and 95% CI over characters of (characters,) values, with the values."""
    return {**summarize(values.tolist()), "per_persona": values.tolist()}


def analyse(pretrain: LineGradients, names: list[str], unseen: dict, rng: random.Random) -> dict:
    """Every span's predicted held-out gain and signal on the unseen characters; the cross-validated capture."""
    curv = curvature(pretrain, SHRINKAGE)
    train, test = as_lines(unseen["train"]), as_lines(unseen["test"])
    rows = sorted(set(train.persona_ids.tolist()))  # the unseen characters, in unseen["personas"] order
    g = torch.stack([train.persona_means()[r] for r in rows])  # (characters, tokens_per_code, hidden)
    h = torch.stack([test.persona_means()[r] for r in rows])
    learned, start = unseen["codebook"], unseen["start_prompt"][None]  # the fits' start is one more code

    def gains(codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        span = None if codes is None else torch.cat([codes.float(), start])
        fit, held = quadratic_gain_rows(span, curv, g, h)
        return held, (fit + held) / 2  # (characters,) held-out gain and signal

    ceiling = gains(None)[1]
    randoms = [gains(random_codebook_like(learned, seed)) for seed in range(RANDOM_DRAWS)]
    random_gain = torch.stack([r[0] for r in randoms]).mean(0)
    random_signal = torch.stack([r[1] for r in randoms]).mean(0)

    def row(held: torch.Tensor, signal: torch.Tensor) -> dict:
        return {
            "held_out_gain": summary(held),
            "signal": summary(signal),
            "share_of_ceiling": float(signal.mean() / ceiling.mean()),
            "ratio_to_random": float(held.mean() / random_gain.mean()),
        }

    result = {
        "pretraining_lines": int(pretrain.gradients.shape[0]),
        "pretraining_characters": len(names),
        "shrinkage": SHRINKAGE,
        "mean_eigenvalue": curv.mean_eigenvalue,  # the dampings' unit
        "personas": unseen["personas"],
        "references": {
            "every direction (free 8 tokens)": row(*gains(None)),
            f"random codebook (mean of {RANDOM_DRAWS})": row(random_gain, random_signal),
            "learned (shipped) codebook": row(*gains(learned)),
        },
        "grid": [],
    }
    counts = sorted({n for n in COUNTS if n < len(names)} | {len(names)})
    bar = tqdm(total=len(counts) * len(LINE_COUNTS) * DRAWS, desc="codebooks from subsets")
    for n in counts:
        for per in LINE_COUNTS:
            built: dict[str, list] = {"pca": [], "contrast": []}
            for draw in range(DRAWS):
                sub = subset(pretrain, sorted(rng.sample(range(len(names)), n)), per, rng)
                pca, _ = codebook_from_gradients(sub.persona_means(), NUM_CODES, 1.0, seed=draw)
                built["pca"].append(gains(pca))
                built["contrast"].append(gains(contrast_codebook(sub, NUM_CODES, 1.0, SHRINKAGE, "equal", draw)[0]))
                bar.update()
            for kind, draws in built.items():
                held = torch.stack([d[0] for d in draws]).mean(0)  # (characters,) mean over draws
                signal = torch.stack([d[1] for d in draws]).mean(0)
                result["grid"].append({"codebook": kind, "characters": n, "lines": per, **row(held, signal)})
    bar.close()
    everything = subset(pretrain, list(range(len(names))), LINE_COUNTS[-1], rng)
    spans = {
        "learned (shipped) codebook": torch.cat([learned, start]),
        "random codebook": torch.cat([random_codebook_like(learned, 0), start]),
        "pca, all characters": torch.cat(
            [codebook_from_gradients(everything.persona_means(), NUM_CODES, 1.0)[0], start]
        ),
        "every direction (free 8 tokens)": None,
    }
    result["cross_validated"] = cross_validated_capture(spans, curv, train, rows, g, h)
    return result


def cross_validated_capture(spans: dict, curv, train: LineGradients, rows: list[int], g, h) -> dict:
    """Each span's fits damped by 5-fold cross-validation on the character's training lines
    (`contrast.cross_validated_gains`): held-out gains, and their capture ratio (span / free prompt, of the means)."""
    out = {}
    for label, span in tqdm(spans.items(), desc="cross-validated damping"):
        damped = cross_validated_gains(span, curv, train, dict(zip(rows, h)))
        out[label] = {
            "held_out_gain": summary(torch.tensor([damped[r][0] for r in rows])),
            "converged_held_out_gain": summary(quadratic_gain_rows(span, curv, g, h)[1]),
            "damping_over_mean_eigenvalue": [damped[r][1] for r in rows],
        }
    free = out["every direction (free 8 tokens)"]["held_out_gain"]["mean"]
    for stats in out.values():
        stats["capture_ratio"] = stats["held_out_gain"]["mean"] / free
    return out


def write_markdown(result: dict) -> None:
    lines = [
        "# Span scaling: would more pretraining characters or lines make a codebook that carries unseen characters?",
        "",
        f"Command: `python docs/results/span_scaling.py` (see its docstring). The quadratic model's converged gains "
        f"over the start prompt on {len(result['personas'])} unseen characters (100 training, 20 held-out lines "
        f"each), nats per token, mean ± 95% CI over characters; curvature from all {result['pretraining_lines']} "
        f"cached lines of {result['pretraining_characters']} pretraining characters (shrinkage "
        f"{result['shrinkage']}). Codebooks of {NUM_CODES} codes (+ the start prompt, like the fits) from N random "
        f"pretraining characters x L random lines each, {DRAWS} draws averaged per cell. Ratio: held-out gain over "
        "a random codebook's; share: signal over the ceiling's (every direction).",
        "",
        "| span | held-out gain | ratio to random | signal | share of the ceiling |",
        "|---|---|---|---|---|",
    ]
    for label, stats in result["references"].items():
        lines.append(
            f"| {label} | {cell(stats['held_out_gain'])} | {stats['ratio_to_random']:.2f} | {cell(stats['signal'])} "
            f"| {stats['share_of_ceiling']:.2f} |"
        )
    lines += [
        "",
        "Codebooks from subsets: held-out gain ratio to random (share of the ceiling's signal).",
        "",
    ]
    per_counts = sorted({r["lines"] for r in result["grid"]})
    for kind in ("pca", "contrast"):
        lines += [
            f"**{kind}** codebook: rows N characters, columns L lines each.",
            "",
            "| N | " + " | ".join(f"L = {per}" for per in per_counts) + " |",
            "|---|" + "---|" * len(per_counts),
        ]
        for n in sorted({r["characters"] for r in result["grid"]}):
            cells = {
                r["lines"]: f"{r['ratio_to_random']:.2f} ({r['share_of_ceiling']:.2f})"
                for r in result["grid"]
                if r["codebook"] == kind and r["characters"] == n
            }
            lines.append(f"| {n} | " + " | ".join(cells[per] for per in per_counts) + " |")
        lines.append("")
    lines += [
        "Cross-validated capture: each character's fit damped by the damping that 5-fold cross-validation on its "
        "own training lines picks (the quadratic model's early stopping), then scored on its held-out lines. Capture "
        "ratio: a span's mean held-out gain over the free prompt's. Damping in units of the curvature's mean "
        "eigenvalue m.",
        "",
        "| span | held-out gain, converged | held-out gain, damped | capture ratio | damping (median, x m) |",
        "|---|---|---|---|---|",
    ]
    for label, stats in result["cross_validated"].items():
        damping = sorted(stats["damping_over_mean_eigenvalue"])[len(stats["damping_over_mean_eigenvalue"]) // 2]
        lines.append(
            f"| {label} | {cell(stats['converged_held_out_gain'])} | {cell(stats['held_out_gain'])} | "
            f"{stats['capture_ratio']:.2f} | {damping:g} |"
        )
    (OUT / "span_scaling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
