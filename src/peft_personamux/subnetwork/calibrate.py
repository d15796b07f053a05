"""``calibrate_subnetwork``: a persona's lines in, its mask out (forward passes only, no training)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from ..persona_files import validate_persona_name
from .channels import ChannelMask, build_channel_mask
from .config import Granularity, SubnetworkConfig
from .statistics import ActivationStatistics, calibration_rows, collect_statistics
from .weights import WeightMask, build_weight_mask

logger = logging.getLogger(__name__)

ContrastSpec = ActivationStatistics | str | Sequence[str] | None


def _rows_of(dataset, persona: str, max_samples: int | None):
    if hasattr(dataset, "filter") and hasattr(dataset, "column_names") and "persona" in dataset.column_names:
        dataset = dataset.filter(lambda p: p == persona, input_columns="persona")  # a datasets.Dataset
    return calibration_rows(dataset, persona, max_samples)


def persona_statistics(
    model, tokenizer, dataset, persona: str, config: SubnetworkConfig | None = None, progress: bool = True
) -> ActivationStatistics:
    """Channel statistics of ``persona``'s rows in ``dataset`` (the expensive step; reuse it across sparsities)."""
    config = config or SubnetworkConfig()
    rows = _rows_of(dataset, persona, config.max_samples)
    return collect_statistics(model, tokenizer, rows, config, progress, desc=f"calibrate {persona}")


def calibrate_subnetwork(
    model,
    tokenizer,
    dataset,
    persona: str,
    sparsity: float | None = None,
    config: SubnetworkConfig | None = None,
    contrast: ContrastSpec = None,
    statistics: ActivationStatistics | None = None,
    name: str | None = None,
    progress: bool = True,
) -> ChannelMask | WeightMask:
    """Calibrate ``persona``'s subnetwork on its rows of ``dataset`` and return its mask.

    Args:
        model: the frozen causal LM, or a Persona-Mux ``PeftModel`` (its base is calibrated; the soft prompt is
            not active during calibration).
        dataset: rows with ``persona``, ``prompt`` and ``response`` (a `datasets.Dataset` or a list of dicts);
            only ``persona``'s rows are read.
        sparsity: overrides ``config.sparsity``; strictly between 0 and 1.
        config: `SubnetworkConfig` (granularity ``channel`` or ``weight``, statistic, calibration format, ...).
        contrast: an opposing persona's name, several names (pooled: one-vs-rest), or their precomputed
            `ActivationStatistics`; selects the contrastive score.
        statistics: ``persona``'s precomputed statistics (`persona_statistics`): no forward passes.
        name: the mask's persona name (default ``persona``).

    Returns a `ChannelMask` or `WeightMask` (``.save(path)``; ``.statistics`` holds the statistics).
    """
    config = config or SubnetworkConfig()
    if sparsity is not None:
        config = dataclasses.replace(config, sparsity=sparsity)  # validated again in __post_init__
    name = validate_persona_name(name or persona)
    start = time.perf_counter()
    if statistics is None:
        statistics = persona_statistics(model, tokenizer, dataset, persona, config, progress)
    if isinstance(contrast, str):
        contrast = persona_statistics(model, tokenizer, dataset, contrast, config, progress)
    elif contrast is not None and not isinstance(contrast, ActivationStatistics):
        others = [persona_statistics(model, tokenizer, dataset, p, config, progress) for p in contrast]
        contrast = ActivationStatistics.pooled(others)
    if contrast is not None and contrast.statistic != statistics.statistic:
        raise ValueError(
            f"`contrast` statistics use {contrast.statistic.value!r}, the persona's {statistics.statistic.value!r}."
        )
    if config.granularity == Granularity.CHANNEL:
        mask = build_channel_mask(model, name, statistics, config, contrast)
    else:
        mask = build_weight_mask(model, name, statistics, config, contrast, progress)
    logger.info(
        "Subnetwork of %r (%s, sparsity %g%s) in %.1f s: %d bits, %d bytes packed.",
        name,
        config.granularity.value,
        config.sparsity,
        ", contrastive" if contrast is not None else "",
        time.perf_counter() - start,
        mask.num_bits,
        mask.packed_bytes,
    )
    return mask
