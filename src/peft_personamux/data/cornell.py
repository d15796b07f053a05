"""Cornell Movie-Dialogs corpus -> one persona per movie character (``<movie_id>/<character>``); group = movie.

Two layouts are read from a local folder (or the single sub-folder the release unpacks into):

* the original release: ``movie_lines.txt`` (line id, character id, movie id, character name, text) and
  ``movie_conversations.txt`` (character id, character id, movie id, ``['L194', 'L195', ...]``), Latin-1 text with
  fields separated by `` +++$+++ ``; ``movie_characters_metadata.txt`` is optional and only supplies names;
* ConvoKit's ``movie-corpus``: ``utterances.jsonl`` (``id``, ``speaker``, ``conversation_id``, ``reply_to``,
  ``text``, ``meta.movie_id``) and optionally ``speakers.json`` (``meta.character_name``).

An example pairs the previous utterance of a conversation (``prompt``) with the character's reply (``response``).
"""

from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path

from datasets import Dataset

from .common import check_positive, keep_frequent_personas, normalize_whitespace, slugify, to_dataset, truncate
from .errors import DataFileNotFoundError, DataFormatError

logger = logging.getLogger(__name__)

SEPARATOR = "+++$+++"
LINES_FILE = "movie_lines.txt"
CONVERSATIONS_FILE = "movie_conversations.txt"
CHARACTERS_FILE = "movie_characters_metadata.txt"
UTTERANCES_FILE = "utterances.jsonl"
SPEAKERS_FILE = "speakers.json"
_EXPECTED = f"{LINES_FILE} + {CONVERSATIONS_FILE} (original release) or {UTTERANCES_FILE} (ConvoKit)"


def _find_corpus_dir(path: Path) -> Path:
    """``path`` itself, or its only sub-folder holding the corpus files (how the release zip unpacks)."""
    if not path.is_dir():
        raise DataFileNotFoundError(path, f"a folder with {_EXPECTED}")
    for candidate in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        if (candidate / UTTERANCES_FILE).is_file() or (candidate / LINES_FILE).is_file():
            return candidate
    raise DataFileNotFoundError(path, _EXPECTED)


def _read_fields(path: Path, num_fields: int, what: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` for each non-empty line of a `` +++$+++ `` file (the last field may be empty)."""
    rows = []
    with path.open(encoding="latin-1", newline="") as f:  # Latin-1 decodes any byte; the release is not UTF-8
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split(SEPARATOR, maxsplit=num_fields - 1)]
            if len(fields) != num_fields:
                raise DataFormatError(
                    path, number, f"{num_fields} fields ({what}) separated by ' {SEPARATOR} '", f"{len(fields)}"
                )
            rows.append((number, fields))
    return rows


def _example(persona: str, movie: str, prompt: str, response: str, max_chars: int) -> dict[str, str]:
    return {
        "persona": persona,
        "prompt": truncate(prompt, max_chars),
        "response": truncate(response, max_chars),
        "group": movie,
    }


def _load_original(root: Path, max_chars: int) -> list[dict[str, str]]:
    conversations_path = root / CONVERSATIONS_FILE
    if not conversations_path.is_file():
        raise DataFileNotFoundError(conversations_path, f"{CONVERSATIONS_FILE} next to {LINES_FILE}")
    lines_path = root / LINES_FILE
    lines = {}
    for _, (line_id, character_id, movie_id, name, text) in _read_fields(
        lines_path, 5, "line id, character id, movie id, character name, text"
    ):
        lines[line_id] = (character_id, movie_id, name, normalize_whitespace(text))
    names: dict[str, str] = {}
    characters_path = root / CHARACTERS_FILE
    if characters_path.is_file():
        for _, fields in _read_fields(characters_path, 6, "character id, name, movie id, title, gender, position"):
            names[fields[0]] = fields[1]
    rows = []
    for number, fields in _read_fields(
        conversations_path, 4, "character id, character id, movie id, list of line ids"
    ):
        try:
            line_ids = ast.literal_eval(fields[3])
        except (ValueError, SyntaxError):
            line_ids = None
        if not isinstance(line_ids, list) or not all(isinstance(i, str) for i in line_ids):
            raise DataFormatError(conversations_path, number, "a list of line ids like ['L194', 'L195']", fields[3])
        missing = [i for i in line_ids if i not in lines]
        if missing:
            raise DataFormatError(conversations_path, number, f"line ids present in {LINES_FILE}", f"{missing[:3]}")
        for prev_id, line_id in zip(line_ids, line_ids[1:]):
            character_id, movie_id, name, text = lines[line_id]
            prompt = lines[prev_id][3]
            if not text or not prompt:
                continue
            character = slugify(names.get(character_id) or name, fallback=slugify(character_id))
            rows.append(_example(f"{slugify(movie_id)}/{character}", slugify(movie_id), prompt, text, max_chars))
    return rows


def _load_convokit(root: Path, max_chars: int) -> list[dict[str, str]]:
    utterances_path = root / UTTERANCES_FILE
    names: dict[str, str] = {}
    speakers_path = root / SPEAKERS_FILE
    if speakers_path.is_file():
        try:
            speakers = json.loads(speakers_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFormatError(speakers_path, e.lineno, "a JSON object {speaker id: {'meta': {...}}}", e.msg) from e
        names = {sid: (s.get("meta") or {}).get("character_name") or "" for sid, s in speakers.items()}
    utterances = []
    with utterances_path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                utterance = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(utterances_path, number, "one JSON object per line", e.msg) from e
            missing = [k for k in ("id", "speaker", "text") if not isinstance(utterance.get(k), str)] + (
                [] if isinstance((utterance.get("meta") or {}).get("movie_id"), str) else ["meta.movie_id"]
            )
            if missing:
                raise DataFormatError(
                    utterances_path, number, "string fields id, speaker, text, meta.movie_id", f"no {missing}"
                )
            utterances.append((number, utterance))
    texts = {u["id"]: normalize_whitespace(u["text"]) for _, u in utterances}
    rows = []
    for number, u in utterances:
        reply_to = u.get("reply_to")
        if reply_to is None:
            continue  # first utterance of a conversation
        if reply_to not in texts:
            raise DataFormatError(
                utterances_path, number, "reply_to naming an utterance id in the file", repr(reply_to)
            )
        text, prompt = texts[u["id"]], texts[reply_to]
        if not text or not prompt:
            continue
        movie = slugify(u["meta"]["movie_id"])
        character = slugify(names.get(u["speaker"]) or "", fallback=slugify(u["speaker"]))
        rows.append(_example(f"{movie}/{character}", movie, prompt, text, max_chars))
    return rows


def load_cornell(path: str | os.PathLike, min_lines: int = 20, max_chars: int = 400) -> Dataset:
    """One persona per movie character with at least ``min_lines`` replies; persona ``m0/bianca``, group ``m0``.

    Args:
        path: folder of the original release or of ConvoKit's ``movie-corpus`` (see the module docstring).
        min_lines: keep characters with at least this many examples.
        max_chars: prompts and responses are cut at a word boundary to at most this many characters.
    """
    check_positive("min_lines", min_lines)
    check_positive("max_chars", max_chars)
    root = _find_corpus_dir(Path(path))
    if (root / UTTERANCES_FILE).is_file():
        rows, layout = _load_convokit(root, max_chars), "ConvoKit"
    else:
        rows, layout = _load_original(root, max_chars), "original release"
    logger.info("Cornell (%s) from %s: %d examples before filtering.", layout, root, len(rows))
    return to_dataset(keep_frequent_personas(rows, min_lines, "Cornell"))
