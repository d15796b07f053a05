"""Headroom: how much persona signal is there for an 8-token soft prompt, and how much of it do 64 weights capture?

For every unseen character, fitted on its training lines and scored on its held-out lines:

* ``zero``: the zero mixture (bias tokens only, the starting point of every fit);
* ``free8``: 8 free soft-prompt vectors after the bias (8 x hidden numbers per character, the ceiling of any
  8-token codebook). It is Persona-Mux on an *identity* codebook of ``8 * hidden`` codes, so the same fit applies;
* ``mix64``: the 64 weights on the learned codebook;
* ``random64``: the 64 weights on a random codebook of the same shape and per-code norm.

Each is fitted with the Levenberg-Marquardt (Fisher) fit of `fitting.fit_mixtures`, whose per-step training losses
are kept as curves: a fit that has not flattened measures the optimiser, not the headroom. The capture ratio is
``(zero - mix64) / (zero - free8)``. With every fitted mixture, each character's held-out lines are also scored
under every other character (likelihood identification: accuracy of the true one against chance 1 / N).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..collator import PersonaMuxCollator
from ..loss import FAST, LossOptions, PrefixCache, response_nll
from .methods import codebook_tensors, random_codebook_like, zero_mixtures
from .metrics import summarize

logger = logging.getLogger(__name__)

METHODS = ("zero", "free8", "mix64", "random64")


@dataclass
class HeadroomSettings:
    fisher_steps: int = 8  # LM steps of the 64-weight fits
    free_steps: int = 8  # LM steps of the free 8-token fit
    damping: float = 1e-3
    chunk_size: int = 16
    seed: int = 0
    fit_options: LossOptions = FAST  # loss shortcuts while fitting (scores always use exact float32)


def identity_codebook(tokens_per_code: int, hidden: int) -> torch.Tensor:
    """(tokens_per_code * hidden, tokens_per_code, hidden): code c is the unit vector of coordinate c."""
    size = tokens_per_code * hidden
    return torch.eye(size).reshape(size, tokens_per_code, hidden)


def free_prompt_model(base, learned, tokens_per_code: int):
    """A Persona-Mux model on a copy of ``base`` whose codebook is the identity (free prompts) and whose bias is
    ``learned``'s, with the same placeholder id."""
    from peft import get_peft_model

    from ..tuner import PersonaMuxConfig

    config = learned.peft_config[learned.active_adapter]
    hidden = base.get_input_embeddings().weight.shape[1]
    free = get_peft_model(
        copy.deepcopy(base),
        PersonaMuxConfig(
            task_type="CAUSAL_LM",
            num_codes=tokens_per_code * hidden,
            tokens_per_code=tokens_per_code,
            num_bias_tokens=config.num_bias_tokens,
            placeholder_token_id=config.placeholder_token_id,
        ),
    )
    codebook, bias = codebook_tensors(free)
    with torch.no_grad():
        codebook.copy_(identity_codebook(tokens_per_code, hidden).to(codebook.device, codebook.dtype))
        bias.copy_(codebook_tensors(learned)[1].detach())
    free.freeze()
    return free


@torch.no_grad()
def row_losses(model, batch: Mapping[str, torch.Tensor], chunk_size: int, persona_row: int | None = None):
    """Summed NLL and label tokens per row, each row under its own persona or all under ``persona_row``."""
    cache = PrefixCache()
    nlls, tokens = [], []
    n = batch["input_ids"].shape[0]
    for start in range(0, n, chunk_size):
        chunk = {k: v[start : start + chunk_size] for k, v in batch.items()}
        if persona_row is not None:
            chunk["persona_ids"] = torch.full_like(chunk["persona_ids"], persona_row)
        nll, count = response_nll(model, chunk, bias_scale=1.0, prefix_cache=cache)
        nlls.append(nll)
        tokens.append(count)
    return torch.cat(nlls), torch.cat(tokens)


def per_persona(rows: Sequence[Mapping[str, str]], nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    sums, counts = defaultdict(float), defaultdict(int)
    for row, s, n in zip(rows, nll.tolist(), tokens.tolist()):
        sums[row["persona"]] += s
        counts[row["persona"]] += n
    return {p: sums[p] / counts[p] for p in sorted(sums) if counts[p]}


def run_headroom(
    base,
    tokenizer,
    codebook_dir: str | Path,
    personas: Sequence[str],
    train_rows: Sequence[Mapping[str, str]],
    test_rows: Sequence[Mapping[str, str]],
    collator_kwargs: Mapping,
    settings: HeadroomSettings | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Fit zero / free8 / mix64 / random64 for every persona in ``personas``; see the module docstring."""
    from peft import PeftModel

    from ..fitting import fit_mixtures

    settings = settings or HeadroomSettings()
    learned = PeftModel.from_pretrained(copy.deepcopy(base), str(codebook_dir)).to(device)
    learned.add_personas(list(personas), exist_ok=True)
    learned.freeze()
    config = learned.peft_config[learned.active_adapter]
    result: dict = {"personas": list(personas), "train_lines": len(train_rows), "test_lines": len(test_rows)}

    def batches(model):
        collator = PersonaMuxCollator.for_model(model, tokenizer, **collator_kwargs)
        train = {k: v.to(device) for k, v in collator(list(train_rows)).items()}
        test = {k: v.to(device) for k, v in collator(list(test_rows)).items()}
        return train, test

    def scores(model, train, test) -> dict:
        return {
            "train": per_persona(train_rows, *row_losses(model, train, settings.chunk_size)),
            "test": per_persona(test_rows, *row_losses(model, test, settings.chunk_size)),
        }

    def fit(model, train, steps: int, label: str) -> dict:
        zero_mixtures(model, personas)
        out = fit_mixtures(
            model,
            train,
            method="fisher",
            steps=steps,
            damping=settings.damping,
            chunk_size=settings.chunk_size,
            bias_scale=1.0,
            progress=True,
            options=settings.fit_options,
        )
        curves = {model.personas[row]: curve for row, curve in out.persona_curves.items()}
        logger.info("headroom %s: %d passes in %.0f s", label, out.example_passes, out.seconds)
        return {"curves": curves, "example_passes": out.example_passes, "seconds": out.seconds}

    train, test = batches(learned)
    zero_mixtures(learned, personas)
    result["zero"] = scores(learned, train, test)
    # mean64: the mean mixture of the codebook's pretraining personas, unfitted (the component they all share)
    mean = pretraining_mean_mixture(learned)
    if mean is not None:
        for name in personas:
            learned.set_mixture(name, mean)
        result["mean64"] = scores(learned, train, test)
    # mix64 on the learned codebook, then likelihood identification with its mixtures
    result["mix64"] = {**fit(learned, train, settings.fisher_steps, "mix64"), **scores(learned, train, test)}
    result["identification"] = identification(learned, test, test_rows, personas, settings.chunk_size)
    # random64: the same fit on a random codebook of the learned one's shape and per-code norm
    codebook, _ = codebook_tensors(learned)
    kept = codebook.detach().clone()
    with torch.no_grad():
        codebook.copy_(random_codebook_like(kept, settings.seed))
    try:
        result["random64"] = {**fit(learned, train, settings.fisher_steps, "random64"), **scores(learned, train, test)}
    finally:
        with torch.no_grad():
            codebook.copy_(kept)
    free = free_prompt_model(base, learned, config.tokens_per_code).to(device)  # base is clean: learned wraps a copy
    del learned
    free.add_personas(list(personas))
    train, test = batches(free)
    result["free8"] = {**fit(free, train, settings.free_steps, "free8"), **scores(free, train, test)}
    result["summary"] = summarize_headroom(result)
    return result


def pretraining_mean_mixture(model) -> torch.Tensor | None:
    """Mean of the mixtures in the codebook folder's persona files (None when it has none)."""
    from ..persona_files import read_persona_file

    files = model.available_persona_files()
    if not files:
        return None
    config = model.peft_config[model.active_adapter]
    fingerprint = model.codebook_fingerprint()
    rows = [read_persona_file(path, config.num_codes, fingerprint)[1].float() for path in files.values()]
    return torch.stack(rows).mean(0)


@torch.no_grad()
def identification(model, test: Mapping[str, torch.Tensor], test_rows, personas: Sequence[str], chunk_size: int):
    """Each persona's held-out lines scored under every fitted persona: loss matrix, accuracy, chance."""
    matrix = []  # matrix[i][j]: mean loss of persona i's lines under persona j's mixture
    columns = []
    for name in tqdm(personas, desc="identification"):
        columns.append(per_persona(test_rows, *row_losses(model, test, chunk_size, model.persona_index(name))))
    for true in personas:
        matrix.append([columns[j][true] for j in range(len(personas))])
    predicted = [min(range(len(personas)), key=lambda j: row[j]) for row in matrix]
    correct = [int(p == i) for i, p in enumerate(predicted)]
    return {
        "loss_matrix": matrix,
        "predicted": [personas[p] for p in predicted],
        "accuracy": sum(correct) / len(personas),
        "chance": 1 / len(personas),
    }


def summarize_headroom(result: dict) -> dict:
    """Means with 95% CIs per method and split, improvements over zero, the capture ratio, learned/random ratio."""
    personas = result["personas"]
    out: dict = {}
    for split in ("train", "test"):
        zero = [result["zero"][split][p] for p in personas]
        methods = [m for m in (*METHODS, "mean64") if m in result]
        out[split] = {m: summarize([result[m][split][p] for p in personas]) for m in methods}
        gains = {m: [z - result[m][split][p] for z, p in zip(zero, personas)] for m in methods if m != "zero"}
        out[split]["improvement"] = {m: summarize(v) for m, v in gains.items()}
        capture = [g / f if abs(f) > 1e-9 else None for g, f in zip(gains["mix64"], gains["free8"])]
        free_mean, mix_mean = out[split]["improvement"]["free8"]["mean"], out[split]["improvement"]["mix64"]["mean"]
        rand_mean = out[split]["improvement"]["random64"]["mean"]
        out[split]["capture_ratio_of_means"] = mix_mean / free_mean if free_mean else None
        out[split]["capture_ratio_per_persona"] = summarize(capture)
        out[split]["learned_over_random"] = mix_mean / rand_mean if rand_mean else None
    return out


def headroom_markdown(result: dict) -> list[str]:
    """Tables of the headroom stage (per character and summary) and identification."""
    s = result["summary"]
    lines = [
        f"{len(result['personas'])} unseen characters, {result['train_lines']} training and {result['test_lines']} "
        "held-out lines in all; every fit is the Fisher (Levenberg-Marquardt) fit from zero.",
        "",
        "| | zero | free 8 tokens | 64 weights, learned codebook | 64 weights, random codebook |",
        "|---|---|---|---|---|",
    ]
    for split in ("train", "test"):
        cells = [_ci(s[split][m]) for m in METHODS]
        lines.append(f"| {split} loss | " + " | ".join(cells) + " |")
    for split in ("train", "test"):
        imp = s[split]["improvement"]
        cells = " | ".join(_ci(imp[m]) for m in ("free8", "mix64", "random64"))
        lines.append(f"| {split} improvement over zero | — | {cells} |")
    if "mean64" in s["test"]:
        lines += [
            "",
            "Mean pretraining mixture, unfitted (the part every pretraining persona shares): train "
            f"{_ci(s['train']['mean64'])}, held-out {_ci(s['test']['mean64'])}; held-out improvement over zero "
            f"{_ci(s['test']['improvement']['mean64'])}.",
        ]
    lines += [
        "",
        "Capture ratio (zero - mix64) / (zero - free8), of the means: train "
        f"{_num(s['train']['capture_ratio_of_means'])}, held-out {_num(s['test']['capture_ratio_of_means'])}. "
        "Learned / random codebook improvement: train "
        f"{_num(s['train']['learned_over_random'])}, held-out {_num(s['test']['learned_over_random'])}.",
        "",
        f"Likelihood identification (held-out lines scored under every fitted character's 64 weights): accuracy "
        f"{result['identification']['accuracy']:.3f}, chance {result['identification']['chance']:.3f}.",
        "",
        "| character | zero (test) | free8 | mix64 | random64 | capture | fit steps | mix64 train curve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["personas"]:
        z = result["zero"]["test"][p]
        f, m, r = (result[k]["test"][p] for k in ("free8", "mix64", "random64"))
        capture = (z - m) / (z - f) if abs(z - f) > 1e-9 else float("nan")
        curve = result["mix64"]["curves"][p]
        lines.append(
            f"| {p} | {z:.3f} | {f:.3f} | {m:.3f} | {r:.3f} | {capture:.2f} | {len(curve) - 1} | "
            + " → ".join(f"{v:.3f}" for v in curve)
            + " |"
        )
    return lines


def plot_headroom(result: dict, path: str | Path) -> str:
    """Training-loss curves of every fit (one panel per method, one line per character)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.5))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, method in zip(axes, ("free8", "mix64", "random64")):
        for p, curve in result[method]["curves"].items():
            ax.plot(range(len(curve)), curve, marker=".", linewidth=1, label=p.split("/")[-1])
        ax.set_title(method)
        ax.set_xlabel("Fisher step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (mean token NLL)")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.suptitle("Headroom fits: training loss per step")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)


def plot_identification(result: dict, path: str | Path) -> str:
    """Confusion matrix of likelihood identification: row = true character, column = mixture it was scored under."""
    from matplotlib.figure import Figure

    ident, personas = result["identification"], result["personas"]
    matrix = torch.tensor(ident["loss_matrix"])  # (true, candidate)
    relative = matrix - matrix.min(dim=1, keepdim=True).values  # 0 at each row's best candidate
    names = [p.split("/")[-1] for p in personas]
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(relative.numpy(), cmap="viridis_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("scored under the fitted mixture of")
    ax.set_ylabel("held-out lines of")
    ax.set_title(f"Likelihood identification: accuracy {ident['accuracy']:.2f} (chance {ident['chance']:.2f})")
    fig.colorbar(image, ax=ax, label="loss above the row's best (nats)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)


def _ci(summary: dict) -> str:
    if summary["mean"] is None:
        return "n/a"
    if summary["ci95"] is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
