"""`HfArgumentParser` as every command and script here uses it: flags spelled out (no abbreviations), and a flag it
does not know ends the call with one line that names the closest valid one, instead of a traceback."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence


def make_parser(types: tuple[type, ...], prog: str, description: str | None = None):
    """An ``HfArgumentParser`` over the dataclasses ``types``."""
    from transformers import HfArgumentParser

    # no abbreviations: a prefix such as --personas would be taken for --personas_per_batch, or be "ambiguous"
    return HfArgumentParser(types, prog=prog, description=description, allow_abbrev=False)


def parse_dataclasses(parser, argv: Sequence[str]) -> tuple:
    """The dataclasses ``parser`` fills from ``argv``; an unknown flag prints one line and exits with status 2."""
    *parsed, remaining = parser.parse_args_into_dataclasses(
        list(argv), look_for_args_file=False, return_remaining_strings=True
    )
    if remaining:
        known = [option for action in parser._actions for option in action.option_strings]
        print(f"{parser.prog}: {unknown_flag_message(remaining, known)}", file=sys.stderr)
        raise SystemExit(2)
    return tuple(parsed)


def unknown_flag_message(remaining: Sequence[str], known: Sequence[str]) -> str:
    """``unknown flag --personas (did you mean --persona?)``, for the first flag of ``remaining``."""
    flags = [token.split("=", 1)[0] for token in remaining if token.startswith("-")]
    if not flags:
        return f"unexpected value {remaining[0]!r} (values follow their flag; see --help)."
    close = difflib.get_close_matches(flags[0], known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else "; see --help for the flags."
    return f"unknown flag {flags[0]}{hint}"
