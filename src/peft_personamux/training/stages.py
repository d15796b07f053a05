"""The two stages. Stage 1 (`pretrain_codebook`): W, b and one mixture per persona, after a bias-only warm-up.
Stage 2 (`fit_personas`): the mixtures of new personas on a frozen codebook, full batch (Adam) or Fisher steps."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from ..collator import PersonaMuxCollator
from ..diagnostics import IdentityDiagnosticCallback
from ..loss import PLAIN
from .arguments import CodebookTrainingArguments, PersonaFitArguments, PersonaMuxTrainingArguments
from .callbacks import LossLogCallback, StageSwitchCallback, TrainPersonasCallback
from .heldout import evaluate_loss
from .trainer import PersonaMuxTrainer, fast_loss_options

logger = logging.getLogger(__name__)


def personas_in(*datasets) -> list[str]:
    """Sorted persona names of one or more datasets (sorted, so every process builds the same table)."""
    names: set[str] = set()
    for ds in datasets:
        if ds is not None:
            names.update(ds["persona"])
    return sorted(names)


def mux_collator(model, tokenizer, args: PersonaMuxTrainingArguments, text_personas) -> PersonaMuxCollator:
    return PersonaMuxCollator.for_model(
        model,
        tokenizer,
        text_personas=text_personas,
        instruction=args.instruction,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens,
    )


def build_codebook_trainer(
    model,
    tokenizer,
    dataset,
    args: CodebookTrainingArguments,
    text_personas: Mapping[str, str] | None = None,
    eval_dataset=None,
    callbacks: Sequence[TrainerCallback] = (),
    identity_dataset=None,
) -> PersonaMuxTrainer:
    """A stage 1 trainer: registers every persona of ``dataset`` (and ``eval_dataset``), all at zero.

    ``identity_dataset``: held-out lines of those personas for the identity diagnostic (``args.identity_every``).
    """
    model.add_personas(personas_in(dataset, eval_dataset, identity_dataset), exist_ok=True)
    model.train_codebook()  # the optimizer is built from what requires grad: W, b and the whole mixture table
    collator = mux_collator(model, tokenizer, args, text_personas)
    extra: list[TrainerCallback] = [LossLogCallback(title="Persona-Mux codebook pretraining")] if args.loss_log else []
    if identity_dataset is not None and getattr(args, "identity_every", 0) > 0:
        extra.append(IdentityDiagnosticCallback(_batches(identity_dataset, collator, 16), args.identity_every))
    on_switch = None
    if getattr(args, "gradient_codebook", False):
        lines = _first_lines(dataset, args.gradient_codebook_lines)
        on_switch = lambda m: _gradient_codebook(m, _batches(lines, collator, 16), trainer)  # noqa: E731
    trainer = PersonaMuxTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[StageSwitchCallback(getattr(args, "warmup_epochs", 1.0), on_switch), *extra, *callbacks],
    )
    return trainer


def _batches(dataset, collator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _first_lines(dataset, per_persona: int):
    """The first ``per_persona`` rows of each persona (a subset for the gradient codebook's pass)."""
    seen: Counter = Counter()
    keep = []
    for index, name in enumerate(dataset["persona"]):
        if seen[name] < per_persona:
            keep.append(index)
            seen[name] += 1
    return dataset.select(keep)


def _gradient_codebook(model, batches, trainer: PersonaMuxTrainer) -> dict:
    from ..codebook_init import init_codebook_from_gradients

    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    options = trainer.loss_options().eager()  # one pass: compiling would not pay back
    scale = getattr(trainer.args, "gradient_codebook_scale", "equal")
    init = init_codebook_from_gradients(model, batches, options, progress=not trainer.args.disable_tqdm, scale=scale)
    return {
        "gradient_codebook_explained": round(init.explained, 5),
        "gradient_codebook_explained_random": round(init.explained_random, 5),
        "gradient_codebook_passes": init.example_passes,
    }


def split_identity_lines(dataset, lines: int, personas: int, seed: int = 0):
    """``(train, held_out)``: the last ``lines`` rows of up to ``personas`` personas (those with at least
    ``lines + 4`` rows, spread over the sorted names) move to ``held_out`` for the identity diagnostic."""
    counts = Counter(dataset["persona"])
    eligible = sorted(n for n, c in counts.items() if c >= lines + 4)
    if len(eligible) < 2:
        raise ValueError(f"The identity diagnostic needs 2 personas with at least {lines + 4} lines.")
    chosen = set(eligible[:: max(1, len(eligible) // personas)][:personas])
    seen: Counter = Counter()
    held = set()
    names = dataset["persona"]
    for index in range(len(names) - 1, -1, -1):
        name = names[index]
        if name in chosen and seen[name] < lines:
            held.add(index)
            seen[name] += 1
    train = [i for i in range(len(names)) if i not in held]
    return dataset.select(train), dataset.select(sorted(held))


def pretrain_codebook(
    model,
    tokenizer,
    dataset,
    args: CodebookTrainingArguments,
    text_personas: Mapping[str, str] | None = None,
    eval_dataset=None,
    callbacks: Sequence[TrainerCallback] = (),
) -> PersonaMuxTrainer:
    """Stage 1: train the codebook, bias and one mixture per persona of ``dataset``; save to ``args.output_dir``.

    Resumes from ``args.resume_from_checkpoint`` when set (a path, or True for the last checkpoint). Afterwards the
    model is frozen, and ``output_dir`` holds the adapter (W and b) and ``personas/<name>.safetensors``.
    """
    identity = None
    if getattr(args, "identity_every", 0) > 0:
        dataset, identity = split_identity_lines(dataset, args.identity_lines, args.identity_personas, args.seed)
    trainer = build_codebook_trainer(
        model, tokenizer, dataset, args, text_personas, eval_dataset, callbacks, identity_dataset=identity
    )
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "1"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    model.freeze()
    # model.save_pretrained rather than trainer.save_model: the codebook folder gets no tokenizer copy and no
    # pickled training_args.bin, only adapter_config.json, adapter_model.safetensors and personas/
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        model.save_pretrained(args.output_dir)
    return trainer


def full_batch_arguments(args: PersonaFitArguments, num_examples: int) -> PersonaFitArguments:
    """Copy of ``args`` whose every optimizer step sees all ``num_examples`` (micro-batches accumulate if capped)."""
    if num_examples < 1:
        raise ValueError("The dataset to fit personas on is empty.")
    per_device = math.ceil(num_examples / max(1, args.world_size))
    micro = min(per_device, args.max_micro_batch_size or per_device)
    return dataclasses.replace(
        args,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=math.ceil(per_device / micro),
    )


def register_for_fit(model, dataset, args: PersonaFitArguments) -> list[str]:
    """Register the personas of ``dataset`` (reset to ``args.fit_start`` when ``args.reset_mixtures``)."""
    from ..fitting import mean_persona_mixture

    names = personas_in(dataset)
    model.add_personas(names, exist_ok=True)
    if args.reset_mixtures:
        start = mean_persona_mixture(model) if args.fit_start == "mean" else None
        for name in names:
            model.set_mixture(name, torch.zeros_like(model.get_mixture(name)) if start is None else start)
    return names


def build_fit_trainer(
    model,
    tokenizer,
    dataset,
    args: PersonaFitArguments,
    text_personas: Mapping[str, str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> PersonaMuxTrainer:
    """A stage 2 trainer for the personas of ``dataset``: registered (from zero), only their rows train."""
    names = register_for_fit(model, dataset, args)
    model.train_personas(names)  # W and b frozen: the optimizer holds only the mixture table
    extra = [LossLogCallback(title="Persona-Mux persona fitting")] if args.loss_log else []
    return PersonaMuxTrainer(
        model=model,
        args=full_batch_arguments(args, len(dataset)),
        train_dataset=dataset,
        data_collator=mux_collator(model, tokenizer, args, text_personas),
        callbacks=[TrainPersonasCallback(names), *extra, *callbacks],
    )


def fit_personas(
    model,
    tokenizer,
    dataset,
    args: PersonaFitArguments,
    eval_dataset=None,
    text_personas: Mapping[str, str] | None = None,
    save_dir: str | os.PathLike | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, dict[str, Any]]:
    """Stage 2: fit the mixture vectors of every persona in ``dataset`` at once; W and b stay frozen.

    Each optimizer step sees all examples (full batch), so fitting many personas costs the same per example as one.
    Persona files go to ``save_dir`` (default ``args.output_dir``; pass the codebook folder to keep them beside it).
    Returns, per persona: ``train_examples``, ``file``, and with ``eval_dataset`` the held-out mean token loss
    ``loss_before``/``loss_after`` and ``eval_examples``.
    """
    names = personas_in(dataset)
    eval_kwargs = {
        "text_personas": text_personas,
        "instruction": args.instruction,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_response_tokens": args.max_response_tokens,
        "batch_size": args.per_device_eval_batch_size,
    }
    heldout = set(eval_dataset["persona"]) if eval_dataset is not None else set()
    eval_names = [n for n in names if n in heldout]
    if args.fit_method in ("fisher", "lbfgs"):
        register_for_fit(model, dataset, args)
        fit = lambda: _fit_direct(model, tokenizer, dataset, args, text_personas)  # noqa: E731
    else:
        fit = build_fit_trainer(model, tokenizer, dataset, args, text_personas, callbacks).train
    before = evaluate_loss(model, tokenizer, eval_dataset, eval_names, **eval_kwargs) if eval_names else {}
    fit()
    model.freeze()
    after = evaluate_loss(model, tokenizer, eval_dataset, eval_names, **eval_kwargs) if eval_names else {}
    directory = os.fspath(save_dir if save_dir is not None else args.output_dir)
    paths = dict(zip(names, model.save_personas(directory, names=names))) if args.should_save else {}
    train_counts = Counter(dataset["persona"])
    eval_counts = Counter(eval_dataset["persona"]) if eval_dataset is not None else Counter()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = {"train_examples": train_counts[name], "file": paths.get(name)}
        if name in before:
            results[name].update(eval_examples=eval_counts[name], loss_before=before[name], loss_after=after[name])
    return results


def _fit_direct(model, tokenizer, dataset, args: PersonaFitArguments, text_personas) -> None:
    """``fit_method`` 'fisher' or 'lbfgs': the whole dataset as one batch for `fitting.fit_mixtures` (chunked)."""
    from ..fitting import fit_mixtures

    rows = [dict(zip(dataset.column_names, values)) for values in zip(*(dataset[c] for c in dataset.column_names))]
    device = next(p for p in model.parameters()).device
    batch = mux_collator(model, tokenizer, args, text_personas)(rows)
    order = batch["attention_mask"].sum(-1).argsort(stable=True)  # by length: chunks of similar rows, less padding
    batch = {k: v[order].to(device) for k, v in batch.items()}
    options = fast_loss_options(args, device) if args.fast_loss else PLAIN
    fit = fit_mixtures(
        model,
        batch,
        method=args.fit_method,
        steps=args.fisher_steps if args.fit_method == "fisher" else args.lbfgs_steps,
        chunk_size=args.max_micro_batch_size or 16,
        progress=not args.disable_tqdm,
        options=options,
    )
    logger.info(
        "%s fit: %d example passes in %.1f s, train loss %.4f -> %.4f.",
        args.fit_method,
        fit.example_passes,
        fit.seconds,
        fit.losses[0],
        fit.losses[-1],
    )
