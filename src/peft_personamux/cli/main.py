"""The ``personamux`` command: a list of commands, one file each (as TRL's CLI); a new command is a new file."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from . import add_persona, chat, demo, evaluate, generate, personas, pretrain, serve
from .common import Command

COMMANDS: dict[str, Command] = {
    module.COMMAND.name: module.COMMAND
    for module in (pretrain, add_persona, generate, personas, demo, chat, serve, evaluate)
}


def usage() -> str:
    lines = ["usage: personamux <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<12} {command.description}" for name, command in COMMANDS.items()]
    lines.append("\n`personamux <command> --help` lists the options of a command.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from .. import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"personamux {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"personamux: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_warning()
    # peft's `get_peft_model` reads a property newer transformers deprecate: nothing for a CLI user to change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    return COMMANDS[name].main(rest)
