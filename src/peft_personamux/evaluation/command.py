"""``personamux evaluate``: one JSON config (``--config`` or ``--quick``), then any field as a flag.

Precedence: `EvalConfig` defaults < the JSON file < command-line flags. ``--help`` lists every field with its help.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..argparsing import make_parser, parse_dataclasses
from .config import EvalConfig, config_dir, read_config_file

QUICK_CONFIG = "eval_quick.json"
FULL_CONFIG = "eval_full.json"


@dataclass
class RunArguments:
    config: str | None = field(
        default=None, metadata={"help": f"JSON file of EvalConfig fields, e.g. configs/{FULL_CONFIG}."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": f"Use configs/{QUICK_CONFIG}: tiny random models, a few minutes on a CPU (smoke test)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Discard the stage cache in output_dir and start over."})


def parse_args(argv: Sequence[str]) -> tuple[EvalConfig, RunArguments]:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    first.add_argument("--quick", nargs="?", const="true", default="false")
    known, _ = first.parse_known_args(list(argv))
    quick = str(known.quick).lower() in ("true", "1", "yes")
    if known.config and quick:
        raise SystemExit("Pass --config or --quick, not both.")
    path = known.config or (str(config_dir() / QUICK_CONFIG) if quick else None)
    parser = make_parser(
        (EvalConfig, RunArguments), "personamux evaluate", "Train and score every method on one split."
    )
    if path:
        try:
            parser.set_defaults(**read_config_file(path))
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from None
    config, run = parse_dataclasses(parser, argv)
    return config, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; print where the results are and the main table."""
    from transformers.utils import logging as hf_logging

    from .report import RESULTS_MD, main_table
    from .runner import run_evaluation

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, run = parse_args(argv)
    except ValueError as err:  # EvalConfig validation
        raise SystemExit(f"personamux evaluate: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_warning()
    command = "personamux evaluate " + " ".join(shlex.quote(a) for a in argv)
    results = run_evaluation(config, overwrite=run.overwrite, command=command.strip())
    if config.only_headroom:
        from .headroom_report import headroom_markdown

        print("\n".join(headroom_markdown(results)))
        print(f"\nHeadroom: {config.output_dir}/headroom.md, headroom.json, headroom_curves.png.")
        return 0
    print("\n".join(main_table(results)))
    print(f"\nResults: {config.output_dir}/{RESULTS_MD} (all numbers in results.json).")
    print(f"Wall time: {results['wall_seconds_this_call']:.1f} s. Config: {json.dumps(config.fingerprint())}")
    return 0
