"""The one data split of a run: pretraining personas vs unseen personas, and each unseen persona's train/test lines.

Rows are plain dicts (``persona``, ``prompt``, ``response``, ``group``), sorted by persona and original order, so a
run is deterministic under its seeds.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from ..data import split_persona_examples, split_personas
from ..data.common import keep_frequent_personas, to_dataset, truncate
from ..data.text_persona import persona_display_name
from .config import EvalConfig

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Rows of one evaluation split."""

    pretrain: list[dict[str, str]]  # sample of the pretraining personas: LoRA and codebook pretraining
    train: list[dict[str, str]]  # unseen personas, `num_train` lines each
    test: list[dict[str, str]]  # unseen personas, held out, at most `num_test` lines each
    personas: list[str]  # the unseen personas evaluated, sorted
    pretrain_personas: list[str] = field(default_factory=list)

    def rows_of(self, part: str, persona: str) -> list[dict[str, str]]:
        return [r for r in getattr(self, part) if r["persona"] == persona]

    def summary(self) -> dict:
        def counts(rows):
            return dict(sorted(Counter(r["persona"] for r in rows).items()))

        return {
            "unseen_personas": self.personas,
            "train_lines": counts(self.train),
            "test_lines": counts(self.test),
            "pretrain_personas": len(self.pretrain_personas),
            "pretrain_lines": len(self.pretrain),
        }


def load_rows(config: EvalConfig) -> Dataset:
    """The dataset named by ``config.dataset``, lines cut to ``max_chars``, personas with >= ``min_lines`` lines."""
    if config.dataset == "shakespeare":
        from ..data import load_shakespeare

        return load_shakespeare(min_lines=config.min_lines, max_chars=config.max_chars)
    path = Path(config.dataset)
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"`dataset` must be 'shakespeare' or a .jsonl/.json file of persona rows, got {path}.")
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    rows = []
    for i, row in enumerate(raw):
        missing = [k for k in ("persona", "prompt", "response") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i + 1} lacks {missing}; rows need persona, prompt and response.")
        rows.append(
            {
                "persona": str(row["persona"]),
                "prompt": truncate(str(row["prompt"]), config.max_chars),
                "response": truncate(str(row["response"]), config.max_chars),
                "group": str(row.get("group") or str(row["persona"]).split("/")[0]),
            }
        )
    return to_dataset(keep_frequent_personas(rows, config.min_lines, path.name))


def _rows(ds: Dataset) -> list[dict[str, str]]:
    return [dict(zip(ds.column_names, values)) for values in zip(*(ds[c] for c in ds.column_names))]


def make_split(config: EvalConfig, ds: Dataset | None = None) -> Split:
    """Split personas by group (``data.split_personas``), pick the unseen personas with the most lines, split their
    lines into train/test (``data.split_persona_examples``) and sample the pretraining side."""
    ds = load_rows(config) if ds is None else ds
    pretrain_ds, unseen_ds = split_personas(ds, config.pretrain_fraction, config.split_seed)
    counts = Counter(unseen_ds["persona"])
    needed = config.num_train + 1
    eligible = sorted((p for p in counts if counts[p] >= needed), key=lambda p: (-counts[p], p))
    if not eligible:
        raise ValueError(
            f"No unseen persona has num_train + 1 = {needed} lines (most: {max(counts.values())}); lower `num_train` "
            "or `min_lines`."
        )
    chosen = sorted(eligible[: config.num_unseen_personas] if config.num_unseen_personas else eligible)
    if config.num_unseen_personas and len(chosen) < config.num_unseen_personas:
        logger.warning(
            "Only %d unseen personas have %d lines; evaluating %d, not %d.",
            len(chosen),
            needed,
            len(chosen),
            config.num_unseen_personas,
        )
    if len(chosen) < 2:
        raise ValueError(f"Who-said-it needs at least 2 unseen personas; only {chosen} have {needed} lines.")
    wanted = set(chosen)
    unseen_ds = unseen_ds.filter(lambda p: p in wanted, input_columns="persona")
    train, test = split_persona_examples(unseen_ds, config.num_train, config.seed, max_test=config.num_test)
    return Split(
        pretrain=sample_pretraining(_rows(pretrain_ds), config),
        train=_rows(train),
        test=_rows(test),
        personas=chosen,
        pretrain_personas=sorted(set(pretrain_ds["persona"])),
    )


def sample_pretraining(rows: list[dict[str, str]], config: EvalConfig) -> list[dict[str, str]]:
    """The ``pretrain_personas`` personas with the most lines, ``pretrain_lines_per_persona`` random lines each."""
    by_persona: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_persona[row["persona"]].append(row)
    names = sorted(by_persona, key=lambda p: (-len(by_persona[p]), p))[: config.pretrain_personas]
    rng = random.Random(config.seed)
    out = []
    for name in sorted(names):
        lines = by_persona[name]
        if config.pretrain_lines_per_persona and len(lines) > config.pretrain_lines_per_persona:
            keep = sorted(rng.sample(range(len(lines)), config.pretrain_lines_per_persona))
            lines = [lines[i] for i in keep]
        out.extend(lines)
    return out


def name_persona(persona: str) -> str:
    """The cheapest text persona: ``"hamlet/lord_polonius"`` -> ``"Lord Polonius, a character of Hamlet."``."""
    group = persona.split("/")[0] if "/" in persona else ""
    where = f" of {persona_display_name(group)}" if group else ""
    return f"{persona_display_name(persona)}, a character{where}."


def tiny_model_texts(split: Split, instruction: str) -> list[str]:
    """Text a tiny random model's tokenizer is trained on."""
    lines = [instruction, "Prompt: Example lines of this character: User: Assistant: system user assistant"]
    for row in split.pretrain + split.train + split.test:
        lines += [row["prompt"], row["response"]]
    return lines
