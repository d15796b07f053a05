"""Held-out loss of persona subnetworks next to the soft prompt, for the evaluation harness to call.

`heldout_losses` calibrates every persona of ``train_rows`` once (one set of statistics serves every sparsity and
both granularities) and scores ``test_rows`` under: the base model, the soft prompt alone (a Persona-Mux model),
the faithful weight mask, the channel mask, and the channel mask plus the soft prompt, each mask at every sparsity.
The loss on `GENERAL_TEXT` under each mask shows whether the mask just breaks the model. The prompt format is the
evaluation's: the base model and the masks read ``"{instruction}\\n\\nPrompt: {prompt}"`` in the chat template; the
soft prompt sits first in the row (no text persona).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..collator import IGNORE_INDEX, PersonaMuxCollator, encode_example
from ..loss import token_nll
from ..prompting import DEFAULT_INSTRUCTION
from .calibrate import calibrate_subnetwork
from .channels import SubnetworkBank
from .combine import is_personamux
from .config import Granularity, SubnetworkConfig, check_sparsity
from .general_text import GENERAL_TEXT
from .statistics import collect_statistics, unwrap_model
from .weights import apply_weight_mask

logger = logging.getLogger(__name__)

Row = Mapping[str, str]
DEFAULT_SPARSITIES = (0.1, 0.3)


@torch.no_grad()
def plain_losses(
    model,
    tokenizer,
    rows: Sequence[Row],
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = 128,
    max_response_tokens: int | None = 64,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean response-token loss per persona of a plain causal LM (no soft prompt), token-weighted over its rows."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = [
            encode_example(
                tokenizer, r["prompt"], r["response"], -1, None, instruction, max_prompt_tokens, max_response_tokens
            )
            for r in chunk
        ]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (rows, width), right padded
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n], att[i, :n], labels[i, :n] = torch.tensor(e.input_ids), 1, torch.tensor(e.labels)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits  # (rows, width, vocab)
        labels = labels.to(device)
        nll = token_nll(logits, labels)  # (rows, width - 1)
        for row, s, n in zip(chunk, nll.sum(-1).tolist(), (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()):
            sums[row["persona"]] += s
            counts[row["persona"]] += n
    return {p: sums[p] / counts[p] for p in sorted(sums) if counts[p]}


@torch.no_grad()
def general_loss(model, tokenizer, text: str = GENERAL_TEXT, window: int = 256) -> float:
    """Mean next-token loss of a plain causal LM on ``text``, in windows of ``window`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]], device=device)  # (1, <= window + 1)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits.float()  # (1, n, vocab)
        total += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        tokens += chunk.shape[1] - 1
    return total / max(tokens, 1)


def _fit_mixture(model, tokenizer, persona: str, rows: Sequence[Row], settings: Mapping[str, Any]) -> float:
    """Register ``persona`` in a Persona-Mux model and fit its mixture (Fisher steps); returns the seconds taken."""
    from ..fitting import fit_mixtures

    start = time.perf_counter()
    model.add_persona(persona, exist_ok=True)
    collator = PersonaMuxCollator.for_model(
        model,
        tokenizer,
        instruction=settings["instruction"],
        max_prompt_tokens=settings["max_prompt_tokens"],
        max_response_tokens=settings["max_response_tokens"],
    )
    batch = collator([{**r, "persona": persona} for r in rows])
    fit_mixtures(
        model, batch, method="fisher", steps=settings["fit_steps"], bias_scale=settings["bias_scale"], progress=False
    )
    return time.perf_counter() - start


def _mux_losses(model, tokenizer, rows: Sequence[Row], persona: str, settings: Mapping[str, Any]) -> float:
    from datasets import Dataset

    from ..training import evaluate_loss

    dataset = Dataset.from_list([{k: r[k] for k in ("persona", "prompt", "response")} for r in rows])
    return evaluate_loss(
        model,
        tokenizer,
        dataset,
        [persona],
        settings["bias_scale"],
        settings["batch_size"],
        instruction=settings["instruction"],
        max_prompt_tokens=settings["max_prompt_tokens"],
        max_response_tokens=settings["max_response_tokens"],
    )[persona]


def heldout_losses(
    model,
    tokenizer,
    train_rows: Sequence[Row],
    test_rows: Sequence[Row],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    config: SubnetworkConfig | None = None,
    bias_scale: float = 1.0,
    fit_missing_mixtures: bool = True,
    fit_steps: int = 6,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = 128,
    max_response_tokens: int | None = 64,
    batch_size: int = 8,
    general_text: str = GENERAL_TEXT,
    controls: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-persona held-out mean token loss of every subnetwork variant, with its cost and general-text loss.

    Args:
        model: a plain causal LM (mask rows only), or a Persona-Mux ``PeftModel``: then also ``soft_prompt`` and
            ``channel_mask+soft_prompt`` rows, with each persona's registered mixture (fitted on its training rows
            with ``fit_steps`` Fisher steps first when it is not registered and ``fit_missing_mixtures``).
        train_rows / test_rows: rows with ``persona``, ``prompt``, ``response``; calibration reads the training
            rows (``config.calibration_format``), losses the test rows.
        sparsities: each mask is built at each of these (default 0.1 and 0.3).
        config: statistic, calibration format and limits; its sparsity and granularity are overridden.
        controls: also score each persona under the mask of the next persona (``*_mask_other@s``): a mask that
            helps its own persona no more than another's is a pruned model, not a persona.

    Returns a JSON-able dict: ``heldout[variant][persona]`` (variants ``base``, ``soft_prompt``,
    ``weight_mask@s``, ``channel_mask@s``, ``channel_mask+soft_prompt@s``, ``*_mask_other@s``),
    ``general[variant]`` (mean over personas of the general-text loss; ``base`` once), ``seconds`` (calibration
    forward passes, mask building and mixture fits, per persona), ``bytes`` (packed mask bits per persona; a
    mixture's float32 bytes) and counts.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    config = config or SubnetworkConfig()
    settings = {
        "instruction": instruction,
        "max_prompt_tokens": max_prompt_tokens,
        "max_response_tokens": max_response_tokens,
        "batch_size": batch_size,
        "bias_scale": bias_scale,
        "fit_steps": fit_steps,
    }
    mux = is_personamux(model)
    base = unwrap_model(model)  # with a Persona-Mux model: the base LM under it, the soft prompt inactive
    personas = sorted({r["persona"] for r in test_rows})
    train_by = {p: [r for r in train_rows if r["persona"] == p] for p in personas}
    test_by = {p: [r for r in test_rows if r["persona"] == p] for p in personas}
    empty = [p for p in personas if not train_by[p]]
    if empty:
        raise ValueError(f"Personas {empty[:5]} have test rows but no training rows to calibrate on.")
    heldout: dict[str, dict[str, float]] = defaultdict(dict)
    general: dict[str, list[float]] = defaultdict(list)
    seconds: dict[str, dict[str, float]] = defaultdict(dict)
    sizes: dict[str, int] = {}
    was_training = model.training
    model.eval()

    def score(rows: Sequence[Row]) -> dict[str, float]:
        return plain_losses(base, tokenizer, rows, instruction, max_prompt_tokens, max_response_tokens, batch_size)

    base_losses = score(test_rows)
    heldout["base"] = {p: base_losses[p] for p in personas}
    general_base = general_loss(base, tokenizer, general_text)
    bank = SubnetworkBank(base) if mux else None
    stats = {}
    for persona in personas:  # forward passes only; every mask below is built from these
        start = time.perf_counter()
        stats[persona] = collect_statistics(base, tokenizer, train_by[persona], config, progress=False)
        seconds["statistics"][persona] = time.perf_counter() - start

    def build(persona: str, granularity: Granularity, sparsity: float, source: str):
        cfg = dataclasses.replace(config, granularity=granularity, sparsity=sparsity)
        return calibrate_subnetwork(base, tokenizer, [], persona, config=cfg, statistics=stats[source], progress=False)

    def masked(mask, granularity: Granularity):
        return apply_weight_mask(base, mask) if granularity == Granularity.WEIGHT else _channel(base, mask)

    for index, persona in enumerate(tqdm(personas, desc="subnetwork personas", disable=not progress)):
        if mux:
            if persona not in model.personas:
                if not fit_missing_mixtures:
                    raise ValueError(f"Persona {persona!r} has no mixture in the Persona-Mux model.")
                seconds["mixture_fit"][persona] = _fit_mixture(model, tokenizer, persona, train_by[persona], settings)
            heldout["soft_prompt"][persona] = _mux_losses(model, tokenizer, test_by[persona], persona, settings)
        other = personas[(index + 1) % len(personas)]
        for sparsity in sparsities:
            tag = f"@{sparsity:g}"
            for granularity in (Granularity.WEIGHT, Granularity.CHANNEL):
                start = time.perf_counter()
                mask = build(persona, granularity, sparsity, persona)
                seconds[f"{granularity.value}_mask_build"][persona] = time.perf_counter() - start
                sizes[f"{granularity.value}_mask"] = mask.packed_bytes
                variant = f"{granularity.value}_mask{tag}"
                with masked(mask, granularity):
                    heldout[variant][persona] = score(test_by[persona])[persona]
                    general[variant].append(general_loss(base, tokenizer, general_text))
                if granularity == Granularity.CHANNEL and mux:
                    bank.add(mask, exist_ok=True)
                    with bank.apply(persona):
                        loss = _mux_losses(model, tokenizer, test_by[persona], persona, settings)
                    heldout[f"channel_mask+soft_prompt{tag}"][persona] = loss
                if controls and other != persona:  # is the mask the persona's, or just a pruned model?
                    with masked(build(persona, granularity, sparsity, other), granularity):
                        heldout[f"{granularity.value}_mask_other{tag}"][persona] = score(test_by[persona])[persona]
    model.train(was_training)
    if mux:
        sizes["mixture"] = 4 * model.adapter_config().num_codes
    return {
        "personas": personas,
        "sparsities": sparsities,
        "heldout": {k: dict(v) for k, v in heldout.items()},
        "general": {"base": general_base, **{k: sum(v) / len(v) for k, v in general.items()}},
        "seconds": {k: dict(v) for k, v in seconds.items()},
        "bytes": sizes,
        "train_examples": {p: len(train_by[p]) for p in personas},
        "test_examples": {p: len(test_by[p]) for p in personas},
        "config": config.to_metadata(),
    }


def _channel(base, mask):
    bank = SubnetworkBank(base)
    bank.add(mask)
    return bank.apply(mask.name)
