"""Headroom: how much persona signal is there for an 8-token soft prompt, and how much of it do 64 weights capture?

For every unseen character, fitted on its training lines and scored on its held-out lines:

* ``zero``: the zero mixture (bias tokens only);
* ``mean64``: the mean mixture of the codebook's pretraining personas, unfitted: **the start of every fit** below
  (at zero the mixed tokens sit at the first RMSNorm's singular point, see docs/fitting.md);
* ``free8``: 8 free soft-prompt vectors after the bias (8 x hidden numbers per character, the ceiling of any
  8-token codebook). It is Persona-Mux on an *identity* codebook of ``8 * hidden`` codes, so the same fit applies;
* ``mix64``: the 64 weights on the learned codebook; ``mix64_zero`` (optional): the same fitted from zero, the
  paper's start;
* ``random64``: the 64 weights on a random codebook of the same shape and per-code norm;
* ``grad64`` (when ``gradient_personas`` > 0): the 64 weights on a codebook computed, not trained, from the
  pretraining personas' prompt gradients at the start: their principal directions (``gradient_codebook="pca"``,
  `codebook_init`) or the contrast of their persona signal against the curvature (``"contrast"``, `contrast`).

The random and gradient spans get the start prompt as a 65th code, so every span starts at the same loss. Every
persona is fitted on its own (``fitting.fit_mixtures``, L-BFGS by default: the full-batch loss is deterministic), and
every fit keeps its training-loss curve: a fit that has not flattened measures the optimiser, not the headroom. The
capture ratio is ``(start - mix64) / (start - free8)``, left out when the free prompt's gain is within its CI.
**Gradient capture** is the first-order version of the same question, at no fitting cost: the share of each unseen
character's prompt gradient at the start (8 x hidden numbers) that lies in a codebook's 64-dimensional span; a
random span holds 64 / (8 x hidden) of it. The **quadratic model** (`contrast`, ``quadratic``) predicts each span's
converged training and held-out gain from the same gradients and the pretraining lines' curvature. With the fitted
mixtures, each character's held-out lines are also scored
under every other character (likelihood identification: accuracy of the true one against chance 1 / N).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..collator import PersonaMuxCollator
from ..contrast import Curvature, contrast_codebook, cross_validated_gains, curvature, quadratic_gains
from ..loss import FAST, LossOptions, PrefixCache, choose_attention, choose_autocast, response_nll
from ..prompt_gradients import LineGradients
from .methods import codebook_tensors, random_codebook_like, zero_mixtures
from .metrics import identification_summary, summarize

logger = logging.getLogger(__name__)

FITTED = ("free8", "mix64", "mix64_zero", "random64", "grad64")


@dataclass
class HeadroomSettings:
    method: str = "lbfgs"  # optimiser of every fit (fitting.fit_mixtures)
    steps: int = 10  # its iterations
    lr: float = 1e-3  # adam only
    damping: float = 1e-3  # fisher only
    chunk_size: int = 16
    seed: int = 0
    gradient_personas: int = 0  # pretraining personas spanning the grad64 codebook; 0: no grad64 row
    gradient_lines: int = 8  # their lines each
    gradient_scale: str = "equal"  # grad64 code norms: equal, or whitened by the singular values
    gradient_codebook: str = "pca"  # grad64's directions: principal directions, or the contrast codebook
    shrinkage: float = 0.2  # the curvature's shrinkage (contrast codebook and quadratic model)
    quadratic: bool = False  # the quadratic model's predicted converged gains (a backward pass over train and test)
    zero_start: bool = True  # the mix64_zero row (the paper's start)
    identify_all: bool = True  # identification for random64, grad64 and free8 too
    gradient_capture: bool = True  # share of each prompt gradient in each span (a backward pass over train)
    fit_options: LossOptions = FAST  # loss shortcuts while fitting (scores always use exact float32)

    @classmethod
    def from_config(cls, config, device: torch.device | str = "cpu") -> HeadroomSettings:
        """The settings an `EvalConfig` asks for, fitting on ``device``."""
        dtype = choose_autocast(device, getattr(config, "fit_autocast", "no"))
        return cls(
            fit_options=LossOptions(autocast_dtype=dtype, attention=choose_attention(device, dtype)),
            method=config.headroom_method,
            steps=config.headroom_steps,
            lr=config.fit_lr,
            damping=config.fisher_damping,
            chunk_size=config.fit_chunk_size,
            seed=config.seed,
            gradient_personas=config.headroom_gradient_personas,
            gradient_lines=config.headroom_gradient_lines,
            gradient_scale=config.headroom_gradient_scale,
            gradient_codebook=config.headroom_gradient_codebook,
            quadratic=config.headroom_quadratic,
            zero_start=config.headroom_zero_start,
            identify_all=config.headroom_identify_all,
            gradient_capture=config.headroom_gradient_capture,
        )


def identity_codebook(tokens_per_code: int, hidden: int) -> torch.Tensor:
    """(tokens_per_code * hidden, tokens_per_code, hidden): code c is the unit vector of coordinate c."""
    size = tokens_per_code * hidden
    return torch.eye(size).reshape(size, tokens_per_code, hidden)


def span_model(base, learned, codes: torch.Tensor):
    """A Persona-Mux model on a copy of ``base`` with codebook ``codes`` (num_codes, tokens_per_code, hidden), the
    bias of ``learned`` and its placeholder id: a mixture on it is a prompt in the span of ``codes``."""
    from peft import get_peft_model

    from ..tuner import PersonaMuxConfig

    config = learned.peft_config[learned.active_adapter]
    model = get_peft_model(
        copy.deepcopy(base),
        PersonaMuxConfig(
            task_type="CAUSAL_LM",
            num_codes=codes.shape[0],
            tokens_per_code=codes.shape[1],
            num_bias_tokens=config.num_bias_tokens,
            placeholder_token_id=config.placeholder_token_id,
        ),
    )
    codebook, bias = codebook_tensors(model)
    with torch.no_grad():
        codebook.copy_(codes.to(codebook.device, codebook.dtype))
        bias.copy_(codebook_tensors(learned)[1].detach())
    model.freeze()
    return model


def free_prompt_model(base, learned, tokens_per_code: int):
    """`span_model` on the identity codebook: its mixtures are free prompts (8 x hidden numbers)."""
    hidden = base.get_input_embeddings().weight.shape[1]
    return span_model(base, learned, identity_codebook(tokens_per_code, hidden))


@torch.no_grad()
def row_losses(
    model,
    batch: Mapping[str, torch.Tensor],
    chunk_size: int,
    persona_row: int | None = None,
    desc: str | None = None,
    bias_scale: float = 1.0,
):
    """Summed NLL and label tokens per row, each row under its own persona or all under ``persona_row``.

    ``desc``: show a progress bar over the chunks with this text (none when None). ``bias_scale``: 0 scores without
    the bias tokens.
    """
    cache = PrefixCache()
    nlls, tokens = [], []
    n = batch["input_ids"].shape[0]
    for start in tqdm(range(0, n, chunk_size), desc=desc, disable=desc is None, leave=False):
        chunk = {k: v[start : start + chunk_size] for k, v in batch.items()}
        if persona_row is not None:
            chunk["persona_ids"] = torch.full_like(chunk["persona_ids"], persona_row)
        nll, count = response_nll(model, chunk, bias_scale=bias_scale, prefix_cache=cache)
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
    pretrain_rows: Sequence[Mapping[str, str]] = (),
    partial: dict | None = None,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """Fit and score every row of the module docstring for every persona in ``personas``.

    ``save(result)`` is called after each scoring, each fitted persona and each identification, with what is done so
    far; passing that back as ``partial`` continues from there (a fitted persona's mixture is restored, not refitted).
    """
    from peft import PeftModel

    from ..codebook_init import codebook_from_gradients
    from ..prompt_gradients import persona_prompt_gradients, prompt_line_gradients

    settings = settings or HeadroomSettings()
    learned = PeftModel.from_pretrained(copy.deepcopy(base), str(codebook_dir)).to(device)
    learned.add_personas(list(personas), exist_ok=True)
    learned.freeze()
    config = learned.peft_config[learned.active_adapter]
    result: dict = dict(partial or {})
    result.update(
        personas=list(personas),
        train_lines=len(train_rows),
        test_lines=len(test_rows),
        settings={k: v for k, v in vars(settings).items() if k != "fit_options"},
    )

    def checkpoint() -> None:
        if save is not None:
            save(result)

    def collate(model, rows) -> dict:
        collator = PersonaMuxCollator.for_model(model, tokenizer, **collator_kwargs)
        return {k: v.to(device) for k, v in collator(list(rows)).items()}

    def scores(model, train, test, label: str) -> dict:
        return {
            "train": per_persona(
                train_rows, *row_losses(model, train, settings.chunk_size, desc=f"score {label} train")
            ),
            "test": per_persona(test_rows, *row_losses(model, test, settings.chunk_size, desc=f"score {label} test")),
        }

    def fitted(model, train, test, label: str, start: torch.Tensor, fit_settings: HeadroomSettings = settings) -> None:
        """``result[label]``: every persona fitted from ``start`` and scored; restored when already there."""
        if label in result:  # free8's 4,608 numbers per persona are dropped once identified: nothing to restore
            for name, mixture in result[label].get("mixtures", {}).items():
                model.set_mixture(name, torch.tensor(mixture))
            return
        progress = result.setdefault(f"{label}_in_progress", {})
        out = fit_each(model, train, personas, fit_settings, label, start, progress, checkpoint)
        out.update(scores(model, train, test, label))
        out["mixtures"] = {name: model.get_mixture(name).tolist() for name in personas}
        result[label] = out
        del result[f"{label}_in_progress"]
        checkpoint()

    def identify(model, test, key: str) -> None:
        if key not in result:
            result[key] = identification(model, test, test_rows, personas, settings.chunk_size)
            checkpoint()

    train, test = collate(learned, train_rows), collate(learned, test_rows)
    if "zero" not in result:
        zero_mixtures(learned, personas)
        result["zero"] = scores(learned, train, test, "zero")
        checkpoint()
    codebook, _ = codebook_tensors(learned)
    kept = codebook.detach().clone().float()  # (num_codes, tokens_per_code, hidden)
    zeros = torch.zeros(config.num_codes)
    mean = pretraining_mean_mixture(learned)
    start = zeros if mean is None else mean  # every fit but mix64_zero starts at this mixture's prompt
    start_prompt = torch.einsum("c,ckd->kd", start, kept)  # (tokens_per_code, hidden)
    for name in personas:
        learned.set_mixture(name, start)
    if mean is not None and "mean64" not in result:
        result["mean64"] = scores(learned, train, test, "mean64")
        checkpoint()
    spans = {"mix64": kept, "random64": random_codebook_like(kept, settings.seed)}
    pre_lines = None
    if settings.gradient_personas and pretrain_rows:
        rows = pretraining_sample(pretrain_rows, settings.gradient_personas, settings.gradient_lines)
        names = sorted({r["persona"] for r in rows})
        learned.add_personas(names, exist_ok=True)
        for name in names:
            learned.set_mixture(name, start)
        pre_lines = prompt_line_gradients(
            learned, _chunks(collate(learned, rows), settings.chunk_size), settings.fit_options, desc="grad64 codebook"
        )
        code_norm = float(kept.flatten(1).norm(dim=1).mean())
        # seeded: a resumed run must rebuild the very span its saved grad64 mixtures were fitted in
        pca, explained = codebook_from_gradients(
            pre_lines.persona_means(), config.num_codes, code_norm, seed=settings.seed, scale=settings.gradient_scale
        )
        result["grad64_codebook"] = {
            "personas": len(names),
            "lines": len(rows),
            "method": settings.gradient_codebook,
            "explained_variance": explained,
        }
        spans["grad64"] = pca
        if settings.gradient_codebook == "contrast" or settings.quadratic:
            contrast, result["grad64_codebook"]["contrast_share"] = contrast_codebook(
                pre_lines, config.num_codes, code_norm, settings.shrinkage, settings.gradient_scale, settings.seed
            )
            if settings.gradient_codebook == "contrast":
                spans["grad64"] = contrast
    unseen_train = None
    if (settings.gradient_capture and "gradient_capture" not in result) or (
        settings.quadratic and pre_lines is not None and "quadratic" not in result
    ):
        # the unseen personas' prompt gradients at the start (one pass over train), before any fit moves them
        unseen_lines = prompt_line_gradients(learned, _chunks(train, settings.chunk_size), desc="unseen gradients")
        unseen_train = unseen_lines.persona_means()
    if settings.gradient_capture and "gradient_capture" not in result:
        gradients = torch.stack([unseen_train[learned.persona_index(p)].flatten() for p in personas])  # (personas, D)
        result["gradient_capture"] = {
            label: gradient_capture(span, gradients, personas) for label, span in spans.items()
        } | {"random_expected": config.num_codes / gradients.shape[1]}
        checkpoint()
    if unseen_train is not None and settings.quadratic and pre_lines is not None and "quadratic" not in result:
        unseen_test = persona_prompt_gradients(learned, _chunks(test, settings.chunk_size), desc="held-out gradients")
        predicted = {"mix64": kept, "random64": spans["random64"], "pca64": pca, "contrast64": contrast, "free8": None}
        result["quadratic"] = quadratic_predictions(
            predicted,
            start_prompt,
            curvature(pre_lines, settings.shrinkage),
            personas,
            learned,
            unseen_train,
            unseen_test,
            unseen_lines,
        ) | {"shrinkage": settings.shrinkage, "grad64": settings.gradient_codebook + "64"}
        checkpoint()
    if settings.zero_start:
        fitted(learned, train, test, "mix64_zero", start=zeros)  # the paper's stage-2 start
    fitted(learned, train, test, "mix64", start=start)
    identify(learned, test, "identification")
    # other spans start at the same prompt: it is one more code, at weight 1 (fitted like the others)
    offset_start = torch.cat([zeros, torch.ones(1)])
    for label in ("random64", "grad64"):
        if label not in spans:
            continue
        model = span_model(base, learned, torch.cat([spans[label], start_prompt[None]])).to(device)
        model.add_personas(list(personas))
        span_train, span_test = collate(model, train_rows), collate(model, test_rows)
        fitted(model, span_train, span_test, label, start=offset_start)
        if settings.identify_all:  # is a span's gain this character's, or shared by all (own vs others' fits)?
            identify(model, span_test, f"identification_{label}")
        del model
    free = free_prompt_model(base, learned, config.tokens_per_code).to(device)  # base is clean: learned wraps a copy
    del learned
    free.add_personas(list(personas))
    train, test = collate(free, train_rows), collate(free, test_rows)
    # float32: with bf16 autocast the loss noise swamps the first L-BFGS steps over 4,608 numbers and the line search
    # stalls at the start (9 of 12 characters in docs/results/headroom100_grad; none in float32)
    exact = replace(settings, fit_options=replace(settings.fit_options, autocast_dtype=None))
    fitted(free, train, test, "free8", start=start_prompt.flatten(), fit_settings=exact)
    if settings.identify_all and "mixtures" in result["free8"]:
        identify(free, test, "identification_free8")
    elif settings.identify_all and "identification_free8" not in result:
        logger.warning("free8 was fitted by a run without identify_all and its prompts were not kept: not identified.")
    result["free8"].pop("mixtures", None)  # 4,608 numbers per persona: not worth keeping once identified
    result["summary"] = summarize_headroom(result)
    return result


def fit_each(
    model,
    train: Mapping[str, torch.Tensor],
    personas,
    settings: HeadroomSettings,
    label: str,
    start,
    progress: dict | None = None,
    checkpoint: Callable[[], None] | None = None,
    desc: str | None = None,
):
    """Fit every persona on its own rows from the mixture ``start``; curves, passes and seconds per persona
    (``desc``: the progress bar's text, default ``headroom <label>``).

    ``progress`` (a dict this fills: curves, mixtures, passes, seconds so far) lets an interrupted call continue:
    personas already in it get their mixture back instead of a new fit; ``checkpoint()`` runs after each persona.
    """
    from ..fitting import fit_mixtures

    progress = {} if progress is None else progress
    for key, empty in (("curves", {}), ("mixtures", {}), ("example_passes", 0), ("seconds", 0.0)):
        progress.setdefault(key, empty)
    desc = desc or f"headroom {label}"
    for name in tqdm(personas, desc=desc):
        if name in progress["curves"]:
            model.set_mixture(name, torch.tensor(progress["mixtures"][name]))
            continue
        row = model.persona_index(name)
        model.set_mixture(name, start)
        keep = train["persona_ids"] == row
        out = fit_mixtures(
            model,
            {k: v[keep] for k, v in train.items()},
            method=settings.method,
            steps=settings.steps,
            lr=settings.lr,
            damping=settings.damping,
            chunk_size=settings.chunk_size,
            bias_scale=1.0,
            progress=False,
            options=settings.fit_options,
        )
        progress["curves"][name] = out.persona_curves[row]
        progress["mixtures"][name] = model.get_mixture(name).tolist()
        progress["example_passes"] += out.example_passes
        progress["seconds"] += out.seconds
        if checkpoint is not None:
            checkpoint()
    logger.info("%s: %d passes in %.0f s", desc, progress["example_passes"], progress["seconds"])
    return {k: progress[k] for k in ("curves", "example_passes", "seconds")}


def gradient_capture(span: torch.Tensor, gradients: torch.Tensor, personas: Sequence[str]) -> dict:
    """Share of each gradient's energy in the row span of ``span`` (codes, tokens, hidden): raw, and centred by
    the mean of the *other* personas' gradients (what is particular to each character)."""
    basis = torch.linalg.qr(span.detach().double().flatten(1).T).Q  # (tokens * hidden, codes), orthonormal
    g = gradients.double()  # (personas, tokens * hidden)
    n = g.shape[0]
    others = (g.sum(0, keepdim=True) - g) / max(n - 1, 1)  # leave-one-out mean
    out = {}
    for name, vectors in (("raw", g), ("centred", g - others)):
        share = ((vectors @ basis) ** 2).sum(1) / (vectors**2).sum(1).clamp(min=1e-30)  # (personas,)
        out[name] = {"per_persona": dict(zip(personas, share.tolist())), **summarize(share.tolist())}
    return out


def quadratic_predictions(
    spans: Mapping[str, torch.Tensor | None],
    start_prompt: torch.Tensor,
    curv: Curvature,
    personas: Sequence[str],
    model,
    train: Mapping[int, torch.Tensor],
    test: Mapping[int, torch.Tensor],
    train_lines: LineGradients | None = None,
) -> dict:
    """Per span (None: every direction) and persona: the quadratic model's converged training and held-out gains
    (`contrast.quadratic_gains`), each span with the start prompt as one more code, like the fits.

    With ``train_lines`` (the personas' line gradients), also each fit's held-out gain damped by cross-validation
    on its own lines (`contrast.cross_validated_gains`; 5 folds, fewer when a persona has fewer lines) and the
    spans' capture ratios of those, over free8's (which must be among ``spans``).
    """
    out: dict = {}
    rows = {name: model.persona_index(name) for name in personas}
    folds = 0  # cross-validation folds: 5, or fewer when a persona has fewer lines; under 2, no damped gains
    if train_lines is not None:
        folds = min([5] + [int((train_lines.persona_ids == row).sum()) for row in rows.values()])
    for label, codes in spans.items():
        span = None if codes is None else torch.cat([codes.float(), start_prompt[None].float()])
        per = {"train": {}, "test": {}}
        for name, row in rows.items():
            per["train"][name], per["test"][name] = quadratic_gains(span, curv, train[row], test[row])
        out[label] = {split: {"per_persona": v, **summarize(list(v.values()))} for split, v in per.items()}
        if folds >= 2:
            damped = cross_validated_gains(span, curv, train_lines, test, folds=folds)
            gains = {name: damped[row][0] for name, row in rows.items()}
            out[label]["damped"] = {
                "per_persona": gains,
                "damping_over_mean_eigenvalue": {name: damped[row][1] for name, row in rows.items()},
                **summarize(list(gains.values())),
            }
    if folds >= 2:
        free = out["free8"]["damped"]["mean"]
        out["capture_damped"] = {label: out[label]["damped"]["mean"] / free for label in spans if label != "free8"}
        out["folds"] = folds
    return out


def pretraining_sample(rows: Sequence[Mapping[str, str]], personas: int, lines: int) -> list[Mapping[str, str]]:
    """The first ``lines`` rows of each of the ``personas`` pretraining personas with the most rows."""
    by_persona: dict[str, list] = defaultdict(list)
    for row in rows:
        by_persona[row["persona"]].append(row)
    names = sorted(by_persona, key=lambda p: (-len(by_persona[p]), p))[:personas]
    return [row for name in sorted(names) for row in by_persona[name][:lines]]


def _chunks(batch: Mapping[str, torch.Tensor], size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def pretraining_mean_mixture(model) -> torch.Tensor | None:
    """`fitting.mean_persona_mixture`, or None when the codebook folder has no persona files."""
    from ..fitting import mean_persona_mixture

    return mean_persona_mixture(model) if model.available_persona_files() else None


@torch.no_grad()
def identification(model, test: Mapping[str, torch.Tensor], test_rows, personas: Sequence[str], chunk_size: int):
    """Each persona's held-out lines scored under every fitted persona: loss matrix, accuracy, chance."""
    matrix = []  # matrix[i][j]: mean loss of persona i's lines under persona j's mixture
    columns = []
    for name in tqdm(personas, desc="identification"):
        columns.append(per_persona(test_rows, *row_losses(model, test, chunk_size, model.persona_index(name))))
    for true in personas:
        matrix.append([columns[j][true] for j in range(len(personas))])
    return identification_summary(matrix, list(personas))


def summarize_headroom(result: dict) -> dict:
    """Means with 95% CIs per method and split; improvements over zero and gains over the fits' common start
    (``mean64`` when present, else zero); capture ratios and ratios to the random codebook, both from those gains."""
    personas = result["personas"]
    out: dict = {}
    methods = [m for m in ("zero", "mean64", *FITTED) if m in result]
    base = "mean64" if "mean64" in result else "zero"
    out["start"] = base
    for split in ("train", "test"):
        out[split] = {m: summarize([result[m][split][p] for p in personas]) for m in methods}

        def gains(reference: str, split: str = split) -> dict[str, list[float]]:
            ref = [result[reference][split][p] for p in personas]
            return {m: [r - result[m][split][p] for r, p in zip(ref, personas)] for m in methods if m != reference}

        over_zero, over_start = gains("zero"), gains(base)
        out[split]["improvement"] = {m: summarize(v) for m, v in over_zero.items()}
        out[split]["gain_over_start"] = {m: summarize(v) for m, v in over_start.items() if m in FITTED}
        mean_gain = {m: out[split]["gain_over_start"][m]["mean"] for m in out[split]["gain_over_start"]}
        free, free_ci = mean_gain.get("free8"), (out[split]["gain_over_start"].get("free8") or {}).get("ci95")
        # a ratio to a free-prompt gain that is not distinguishable from 0 measures nothing: left out (None)
        if not free or (free_ci is not None and abs(free) <= free_ci):
            free = None
        out[split]["capture_ratios"] = {m: (g / free if free else None) for m, g in mean_gain.items() if m != "free8"}
        out[split]["capture_ratio_of_means"] = out[split]["capture_ratios"].get("mix64")
        per_persona_capture = [  # rows still missing (an interrupted run) give no ratio
            g / f if abs(f) > 1e-9 else None for g, f in zip(over_start.get("mix64", []), over_start.get("free8", []))
        ]
        out[split]["capture_ratio_per_persona"] = summarize(per_persona_capture)
        rand = mean_gain.get("random64")
        out[split]["over_random"] = {
            m: (mean_gain[m] / rand if rand else None) for m in ("mix64", "mix64_zero", "grad64") if m in mean_gain
        }
        out[split]["learned_over_random"] = out[split]["over_random"].get("mix64")
    return out
