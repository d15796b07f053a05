"""Calibration statistics: how strongly each input channel of every decoder Linear fires on a persona's lines.

Forward passes only (no gradients). Per sample ``n`` and input channel ``j`` of a Linear with input ``x`` of shape
(tokens, in): ``a_n[j] = sqrt(sum_t x[t, j]^2)`` (authors' code) or ``sqrt(mean_t x[t, j]^2)`` (length-normalised).
We keep ``sum_n a_n`` and ``sum_n a_n^2`` per channel, so means, variances, contrasts between personas and
one-vs-rest pools need no further forward passes. Padding and (in the chat format) prompt tokens are zeroed before
the norm.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..collator import IGNORE_INDEX, encode_example
from .config import CalibrationFormat, Statistic, SubnetworkConfig

logger = logging.getLogger(__name__)


def unwrap_model(model) -> nn.Module:
    """The transformers model under a ``PeftModel`` (a Persona-Mux model calibrates on its frozen base)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_linears(model, mlp_only: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the decoder by module name, without the LM head (tied to the embeddings in SmolLM2)."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    found = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and module is not head and (not mlp_only or ".mlp." in f".{name}.")
    }
    if not found:
        raise ValueError(
            f"{type(base).__name__} has no nn.Linear layers besides the LM head; subnetwork masks need them "
            "(GPT-2 style Conv1D layers are not supported)."
        )
    return found


@dataclass
class ActivationStatistics:
    """Running sums of per-sample channel norms, per Linear (keyed by module name)."""

    statistic: Statistic
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (in,) float64, sum_n a_n[j]
    squares: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (in,) float64, sum_n a_n[j]^2
    count: int = 0  # samples

    def mean(self, name: str) -> torch.Tensor:
        """``A[j] = mean_n a_n[j]``, shape (in,), float32."""
        return (self.sums[name] / max(self.count, 1)).float()

    def var(self, name: str) -> torch.Tensor:
        """Population variance of ``a_n[j]`` over samples, shape (in,), float32."""
        mean = self.sums[name] / max(self.count, 1)
        return (self.squares[name] / max(self.count, 1) - mean**2).clamp_min(0).float()

    @classmethod
    def pooled(cls, parts: Sequence[ActivationStatistics]) -> ActivationStatistics:
        """All samples of ``parts`` as one set (a one-vs-rest contrast partner: every other persona pooled)."""
        if not parts:
            raise ValueError("`parts` must hold at least one ActivationStatistics to pool.")
        kinds = {p.statistic for p in parts}
        if len(kinds) > 1:
            raise ValueError(f"Cannot pool statistics of different kinds: {sorted(k.value for k in kinds)}.")
        names = set(parts[0].sums)
        if any(set(p.sums) != names for p in parts):
            raise ValueError("Cannot pool statistics of different models (their Linear layers differ).")
        return cls(
            parts[0].statistic,
            {n: sum(p.sums[n] for p in parts) for n in names},
            {n: sum(p.squares[n] for p in parts) for n in names},
            sum(p.count for p in parts),
        )


def calibration_rows(dataset, persona: str | None, max_samples: int | None = None) -> list[Mapping[str, str]]:
    """The rows of ``persona`` (None: all) with a non-empty ``response``, at most ``max_samples``."""
    rows = [row for row in dataset if persona is None or row.get("persona") == persona]
    if not rows:
        raise ValueError(f"No rows of persona {persona!r} in the calibration dataset.")
    rows = [row for row in rows if str(row.get("response") or "").strip()]
    if not rows:
        raise ValueError(f"Persona {persona!r} has only empty responses; calibration needs its lines.")
    return rows[:max_samples] if max_samples else rows


def encode_calibration(tokenizer, rows: Sequence[Mapping[str, str]], config: SubnetworkConfig) -> list[tuple]:
    """``(input_ids, stat_mask)`` lists per row: which tokens count towards the statistics."""
    encoded = []
    for row in rows:
        if config.calibration_format == CalibrationFormat.LINES:
            ids = tokenizer(row["response"], truncation=True, max_length=config.max_length)["input_ids"]
            encoded.append((ids, [1] * len(ids)))
        else:
            half = max(config.max_length // 2, 1)
            # no text persona, hence no placeholder in the text: the id passed is never used
            prompt = row.get("prompt") or ""
            example = encode_example(tokenizer, prompt, row["response"], 0, None, max_prompt_tokens=half)
            example.input_ids, example.labels = example.input_ids[: 2 * half], example.labels[: 2 * half]
            encoded.append((example.input_ids, [int(label != IGNORE_INDEX) for label in example.labels]))
    return encoded


class _Recorder:
    """Forward pre-hooks on the Linears that add each batch's per-sample channel norms into the sums."""

    def __init__(self, linears: Mapping[str, nn.Linear], statistic: Statistic) -> None:
        self.linears = linears
        self.stats = ActivationStatistics(statistic)
        self.token_mask: torch.Tensor | None = None  # (batch, seq) float: 1 where a token counts

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].float() * self.token_mask.unsqueeze(-1)  # (batch, seq, in)
            sq = x.pow(2).sum(1)  # (batch, in)
            if self.stats.statistic == Statistic.SAMPLE_RMS:
                sq = sq / self.token_mask.sum(1, keepdim=True).clamp_min(1)
            a = sq.sqrt().double()  # (batch, in): one norm per sample and channel
            if name not in self.stats.sums:
                self.stats.sums[name] = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
                self.stats.squares[name] = torch.zeros_like(self.stats.sums[name])
            self.stats.sums[name] += a.sum(0)
            self.stats.squares[name] += a.pow(2).sum(0)

        return record

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in self.linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def collect_statistics(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    config: SubnetworkConfig | None = None,
    progress: bool = True,
    desc: str = "calibrate",
) -> ActivationStatistics:
    """Run ``rows`` through the frozen decoder (no LM head) and return the channel statistics of every Linear."""
    config = config or SubnetworkConfig()
    base = unwrap_model(model)
    linears = decoder_linears(base)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    runner = decoder if isinstance(decoder, nn.Module) else base
    device = next(base.parameters()).device
    encoded = sorted(encode_calibration(tokenizer, rows, config), key=lambda e: len(e[0]))  # less padding
    encoded = [e for e in encoded if sum(e[1]) > 0]
    if not encoded:
        raise ValueError("No calibration tokens: every sample is empty after tokenisation.")
    recorder = _Recorder(linears, config.statistic)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = base.training
    base.eval()
    batches = range(0, len(encoded), config.batch_size)
    try:
        with recorder.attached(), torch.inference_mode():
            for start in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                chunk = encoded[start : start + config.batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (batch, width), right padded
                attention = torch.zeros_like(input_ids)
                counted = torch.zeros(len(chunk), width)
                for i, (ids, stat_mask) in enumerate(chunk):
                    input_ids[i, : len(ids)], attention[i, : len(ids)] = torch.tensor(ids), 1
                    counted[i, : len(ids)] = torch.tensor(stat_mask, dtype=torch.float32)
                recorder.token_mask = counted.to(device)
                runner(input_ids=input_ids.to(device), attention_mask=attention.to(device))
                recorder.stats.count += len(chunk)
    finally:
        base.train(was_training)
    tokens = sum(sum(mask) for _, mask in encoded)
    logger.info("Calibrated on %d samples (%d counted tokens), %d Linear layers.", len(encoded), tokens, len(linears))
    return recorder.stats
