"""Tweets from a CSV -> one persona per author (``tweets/<author>``); each author is its own group.

The ``prompt`` is a short topic derived from the tweet, so the model learns how an author writes about a topic:
its hashtags (``"Topic: #ai #ml"``) when it has any, else its first five content words (URLs, @mentions, numbers
and common English stop words removed). The ``response`` is the tweet text with whitespace normalised.
"""

from __future__ import annotations

import csv
import html
import logging
import os
import re
import zlib
from pathlib import Path

from datasets import Dataset

from .common import check_positive, keep_frequent_personas, normalize_whitespace, slugify, to_dataset
from .errors import DataFileNotFoundError, DataFormatError

logger = logging.getLogger(__name__)

TOPIC_WORDS = 5
_HASHTAG_RE = re.compile(r"(?<!\w)#(\w+)")
_NOISE_RE = re.compile(r"https?://\S+|www\.\S+|(?<!\w)[@#]\w+|\bRT\b")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'’-]*")
_STOP_WORDS = frozenset(
    """a about after again all am an and any are as at be been being but by can could did do does doing for from
    had has have having he her here hers him his how i i'm if in into is it it's its just me more most my no not now
    of off on once only or our out over own same she so some such than that the their them then there these they
    this those through to too under up very was we were what when where which while who whom why will with would
    you your yours""".split()
)


def tweet_topic(text: str) -> str:
    """A short topic for a tweet: its hashtags, else its first five content words, else ``"anything"``."""
    hashtags = list(dict.fromkeys(tag.lower() for tag in _HASHTAG_RE.findall(text)))
    if hashtags:
        return "Topic: " + " ".join(f"#{tag}" for tag in hashtags)
    words = [w.lower() for w in _WORD_RE.findall(_NOISE_RE.sub(" ", text))]
    content = [w for w in words if w.replace("’", "'") not in _STOP_WORDS][:TOPIC_WORDS]
    return "Topic: " + (" ".join(content) if content else "anything")


def load_tweets(
    path: str | os.PathLike,
    author_column: str = "author",
    text_column: str = "text",
    min_lines: int = 20,
    max_per_author: int | None = None,
) -> Dataset:
    """One persona per author with at least ``min_lines`` tweets; persona ``tweets/<author slug>``, group = slug.

    Args:
        path: CSV file with a header row (UTF-8, a byte-order mark is accepted).
        author_column: column holding the author's name or handle; it is slugged (``"Ada Lovelace"`` ->
            ``ada_lovelace``, names without Latin letters -> ``author_<crc32>``), names with equal slugs merge.
        text_column: column holding the tweet text; empty tweets are skipped.
        min_lines: keep authors with at least this many tweets (counted after ``max_per_author``).
        max_per_author: keep at most this many tweets per author, the first ones in file order.
    """
    check_positive("min_lines", min_lines)
    check_positive("max_per_author", max_per_author, allow_none=True)
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataFileNotFoundError(csv_path, f"a CSV file with columns {author_column!r} and {text_column!r}")
    rows: list[dict[str, str]] = []
    per_author: dict[str, int] = {}
    with csv_path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(
                csv_path, 1, f"a header row with columns {author_column!r} and {text_column!r}", "an empty file"
            )
        missing = [c for c in (author_column, text_column) if c not in header]
        if missing:
            raise DataFormatError(
                csv_path,
                1,
                f"a header with columns {missing} (pass author_column=/text_column= to name others)",
                f"{header}",
            )
        author_index, text_index = header.index(author_column), header.index(text_column)
        for record in reader:
            if not record or all(not field.strip() for field in record):
                continue
            if len(record) != len(header):
                raise DataFormatError(
                    csv_path, reader.line_num, f"{len(header)} fields as in the header", f"{len(record)}"
                )
            name = record[author_index].strip()
            if not name:
                raise DataFormatError(csv_path, reader.line_num, f"an author in column {author_column!r}", "none")
            author = slugify(name, fallback=f"author_{zlib.crc32(name.encode('utf-8')):08x}")  # e.g. non-Latin names
            text = normalize_whitespace(html.unescape(record[text_index]))
            if not text or (max_per_author is not None and per_author.get(author, 0) >= max_per_author):
                continue
            per_author[author] = per_author.get(author, 0) + 1
            rows.append(
                {"persona": f"tweets/{author}", "prompt": tweet_topic(text), "response": text, "group": author}
            )
    logger.info("Tweets from %s: %d tweets by %d authors before filtering.", csv_path, len(rows), len(per_author))
    return to_dataset(keep_frequent_personas(rows, min_lines, "Tweets"))
