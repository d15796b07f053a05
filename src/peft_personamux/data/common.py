"""Helpers shared by the loaders: slugs, text clean-up, and the common `Dataset` layout."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
from datasets import Dataset, Features, Value

logger = logging.getLogger(__name__)

COLUMNS = ("persona", "prompt", "response", "group")
FEATURES = Features({name: Value("string") for name in COLUMNS})
_MAX_SLUG_CHARS = 64  # persona names become file names (see persona_files.py); keep each segment short


def slugify(text: str, fallback: str = "unknown") -> str:
    """Lowercase ASCII slug matching ``[a-z0-9][a-z0-9_]*``: ``"LADY MACBETH"`` -> ``"lady_macbeth"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:_MAX_SLUG_CHARS].rstrip("_")
    return slug or fallback


def normalize_whitespace(text: str) -> str:
    """Collapse all runs of whitespace (newlines included) into single spaces."""
    return " ".join(text.split())


def truncate(text: str, max_chars: int | None) -> str:
    """Cut ``text`` to at most ``max_chars`` characters at a word boundary (a single over-long word is cut)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


def check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    """Raise a `ValueError` naming the argument when ``value`` is not a positive integer."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def keep_frequent_personas(rows: list[dict[str, str]], min_lines: int, source: str) -> list[dict[str, str]]:
    """Drop personas with fewer than ``min_lines`` rows and log how many were kept and dropped."""
    counts = Counter(row["persona"] for row in rows)
    kept = {persona for persona, count in counts.items() if count >= min_lines}
    kept_rows = [row for row in rows if row["persona"] in kept]
    logger.info(
        "%s: kept %d personas with >= %d examples (%d dropped), %d examples in %d groups.",
        source,
        len(kept),
        min_lines,
        len(counts) - len(kept),
        len(kept_rows),
        len({row["group"] for row in kept_rows}),
    )
    return kept_rows


def column(ds: Dataset, name: str) -> list[str]:
    """A column as a plain list (datasets >= 4 returns a lazy `Column`, slow to iterate row by row)."""
    return list(ds[name][:])


def to_dataset(rows: Iterable[dict[str, str]]) -> Dataset:
    """Rows -> `Dataset` with the four string columns, ordered by persona and then by source order."""
    rows = sorted(rows, key=lambda row: row["persona"])  # stable: keeps source order within a persona
    columns = {
        name: pa.array([row[name] for row in rows], type=pa.string()) for name in COLUMNS
    }  # no per-row encoding
    return Dataset.from_dict(columns, features=FEATURES)
