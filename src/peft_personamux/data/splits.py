"""Splits: personas into pretraining vs unseen (whole groups), and each persona's examples into train vs test."""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict

import numpy as np
from datasets import Dataset

from .common import COLUMNS, column

logger = logging.getLogger(__name__)

SMALL_PERSONA_TRAIN_FRACTION = 0.8


def _check_columns(ds: Dataset) -> None:
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"Dataset lacks columns {missing}: use a loader from peft_personamux.data (got {ds.column_names})."
        )


def _indices_by(ds: Dataset, name: str) -> dict[str, list[int]]:
    indices: dict[str, list[int]] = defaultdict(list)
    for i, value in enumerate(column(ds, name)):
        indices[value].append(i)
    return indices


def split_personas(ds: Dataset, pretrain_fraction: float = 0.9, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split personas into ``(pretrain, unseen)`` with about ``pretrain_fraction`` of the personas in pretrain.

    Whole groups (a play, a movie) go to one side, so no unseen persona shares a source with a pretraining one.
    Groups are shuffled under ``seed`` and moved to the unseen side until it holds ``1 - pretrain_fraction`` of the
    personas; both sides keep at least one group. Rows keep their original order.
    """
    _check_columns(ds)
    if not 0.0 < pretrain_fraction < 1.0:
        raise ValueError(f"`pretrain_fraction` must be strictly between 0 and 1, got {pretrain_fraction}.")
    personas_per_group: dict[str, set[str]] = defaultdict(set)
    groups_per_persona: dict[str, set[str]] = defaultdict(set)
    for persona, group in zip(column(ds, "persona"), column(ds, "group")):
        personas_per_group[group].add(persona)
        groups_per_persona[persona].add(group)
    shared = sorted(p for p, g in groups_per_persona.items() if len(g) > 1)
    if shared:
        raise ValueError(f"Personas {shared[:3]} appear in several groups; give each persona a single group.")
    groups = sorted(personas_per_group)
    if len(groups) < 2:
        raise ValueError(f"Splitting personas by group needs at least 2 groups, got {len(groups)}: {groups}.")
    order = np.random.default_rng(seed).permutation(len(groups))
    num_personas = sum(len(p) for p in personas_per_group.values())
    target = (1.0 - pretrain_fraction) * num_personas
    unseen_groups: set[str] = set()
    unseen_personas = 0
    for index in order[:-1]:  # the last group always stays in pretraining
        if unseen_personas >= target:
            break
        unseen_groups.add(groups[index])
        unseen_personas += len(personas_per_group[groups[index]])
    is_unseen = [group in unseen_groups for group in column(ds, "group")]
    pretrain = ds.select([i for i, unseen in enumerate(is_unseen) if not unseen])
    unseen = ds.select([i for i, unseen in enumerate(is_unseen) if unseen])
    logger.info(
        "Persona split (seed %d): %d pretraining personas in %d groups, %d unseen personas in %d groups.",
        seed,
        num_personas - unseen_personas,
        len(groups) - len(unseen_groups),
        unseen_personas,
        len(unseen_groups),
    )
    return pretrain, unseen


def split_persona_examples(
    ds: Dataset, num_train: int = 100, seed: int = 0, max_test: int | None = None
) -> tuple[Dataset, Dataset]:
    """Split each persona's examples into ``(train, test)``: ``num_train`` shuffled examples to train, the rest test.

    A persona with at most ``num_train`` examples is split 80/20 instead (at least one example each side) and
    counted in a warning; a persona with a single example goes to train only. ``max_test`` caps test examples per
    persona. Each persona is shuffled by its own generator (``seed`` and the persona name), so adding or removing
    other personas does not change its split. Rows keep their original order.
    """
    _check_columns(ds)
    if not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"`num_train` must be a positive integer, got {num_train!r}.")
    if max_test is not None and (not isinstance(max_test, int) or max_test < 1):
        raise ValueError(f"`max_test` must be a positive integer or None, got {max_test!r}.")
    train: list[int] = []
    test: list[int] = []
    small = []
    for persona, indices in sorted(_indices_by(ds, "persona").items()):
        rng = np.random.default_rng([seed, zlib.crc32(persona.encode("utf-8"))])
        shuffled = [indices[i] for i in rng.permutation(len(indices))]
        n_train = num_train
        if len(shuffled) <= num_train:
            small.append(persona)
            n_train = min(len(shuffled) - 1, int(round(SMALL_PERSONA_TRAIN_FRACTION * len(shuffled)))) or 1
        train.extend(shuffled[:n_train])
        test.extend(shuffled[n_train:][:max_test] if max_test is not None else shuffled[n_train:])
    if small:
        logger.warning(
            "%d personas have at most num_train=%d examples and were split %d/%d instead: %s%s",
            len(small),
            num_train,
            round(100 * SMALL_PERSONA_TRAIN_FRACTION),
            round(100 * (1 - SMALL_PERSONA_TRAIN_FRACTION)),
            ", ".join(small[:5]),
            ", ..." if len(small) > 5 else "",
        )
    return ds.select(sorted(train)), ds.select(sorted(test))


def summarize(ds: Dataset) -> dict[str, float | int]:
    """Counts for a persona dataset: examples, personas, groups and min/median/max examples per persona."""
    _check_columns(ds)
    lines = np.array([len(v) for v in _indices_by(ds, "persona").values()]) if len(ds) else np.zeros(1, int)
    return {
        "examples": len(ds),
        "personas": len(set(column(ds, "persona"))),
        "groups": len(set(column(ds, "group"))),
        "min_lines": int(lines.min()),
        "median_lines": float(np.median(lines)),
        "max_lines": int(lines.max()),
    }
