"""``personamux add-persona``: stage 2, a new persona's mixture fitted on a frozen codebook (or a subnetwork mask)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.flags import DataArguments, load_persona_dataset, read_lines_file
from ..files import PRETRAIN_INFO_NAME, read_json
from ..persona_files import list_persona_files, validate_persona_name
from ..training import PersonaFitArguments
from .common import Command, ModelArguments, codebook_dir, load_base, load_codebook, seconds

logger = logging.getLogger(__name__)


@dataclass
class AddPersonaArguments:
    name: str | None = field(
        default=None, metadata={"help": "Persona name, e.g. 'me/narrator'. Default with --persona: that name."}
    )
    lines_file: str | None = field(
        default=None,
        metadata={
            "help": "Text file, one example per line: 'prompt<TAB>response', or a response alone (then "
            "--default_prompt is its prompt)."
        },
    )
    persona: str | None = field(
        default=None, metadata={"help": "Or a persona of --dataset, e.g. 'as_you_like_it/rosalind'."}
    )
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    save_dir: str | None = field(
        default=None, metadata={"help": "Where personas/<name>.safetensors goes. Default: the codebook folder."}
    )
    num_train: int = field(default=100, metadata={"help": "Training examples (paper: 100)."})
    num_eval: int = field(default=10, metadata={"help": "Held-out examples for the loss before/after (0: none)."})
    default_prompt: str = field(
        default="Say something.", metadata={"help": "Prompt of lines in --lines_file that have no tab."}
    )
    text_persona: str | None = field(default=None, metadata={"help": "Text description of the persona."})
    method: str = field(
        default="mixture",
        metadata={
            "help": "'mixture': fit the persona's mixture weights on the codebook (Persona-Mux). 'subnetwork': "
            "calibrate a mask over the frozen model from the lines, forward passes only (docs/subnetworks.md)."
        },
    )
    sparsity: float = field(
        default=0.1,
        metadata={"help": "--method subnetwork: fraction masked of each layer's neurons and heads (channel) or rows."},
    )
    granularity: str = field(
        default="channel",
        metadata={"help": "--method subnetwork: 'channel' (a few KB, mixes per batch row) or 'weight' (the paper's)."},
    )


def persona_data(args: AddPersonaArguments, data_args: DataArguments, seed: int):
    """(name, train, eval or None) for add-persona."""
    from datasets import Dataset

    if (args.lines_file is None) == (args.persona is None):
        raise SystemExit("Pass exactly one of --lines_file (your own lines) or --persona (a persona of --dataset).")
    if args.lines_file:
        if not args.name:
            raise SystemExit("--lines_file needs --name for the new persona, e.g. --name me/narrator.")
        name = validate_persona_name(args.name)
        rows = read_lines_file(Path(args.lines_file), name, args.default_prompt)
        random.Random(seed).shuffle(rows)
        num_eval = min(args.num_eval, len(rows) - 1)
        train, heldout = rows[num_eval:][: args.num_train], rows[:num_eval]
        return name, Dataset.from_list(train), Dataset.from_list(heldout) if heldout else None
    from ..data import split_persona_examples

    ds = load_persona_dataset(data_args)
    ds = ds.filter(lambda persona: persona == args.persona, input_columns="persona")
    if len(ds) == 0:
        raise SystemExit(f"Persona {args.persona!r} is not in --dataset {data_args.dataset}.")
    train, heldout = split_persona_examples(ds, args.num_train, seed, max_test=max(args.num_eval, 1))
    name = validate_persona_name(args.name or args.persona)
    rename = (lambda row: {"persona": name}) if name != args.persona else None
    if rename:
        train, heldout = train.map(rename), heldout.map(rename)
    return name, train, heldout if args.num_eval and len(heldout) else None


def add_persona(
    model_args: ModelArguments, args: AddPersonaArguments, data_args: DataArguments, fit_args: PersonaFitArguments
) -> int:
    """Stage 2: fit a new persona's mixture on a frozen codebook and save its persona file."""
    from ..training import fit_personas

    start = time.perf_counter()
    if args.method != "mixture":
        return add_subnetwork_persona(model_args, args, data_args, fit_args.seed)
    codebook = codebook_dir(args.codebook)
    name, train, heldout = persona_data(args, data_args, fit_args.seed)
    base, tokenizer = load_base(model_args)
    model = load_codebook(base, codebook)
    save_dir = Path(args.save_dir) if args.save_dir else codebook
    if name in list_persona_files(save_dir):
        logger.warning("Persona %r already has a file in %s; fitting it again from zero replaces it.", name, save_dir)
    text = {name: args.text_persona} if args.text_persona else None
    if text is None and read_json(codebook / PRETRAIN_INFO_NAME).get("text_personas"):
        logger.warning("This codebook was pretrained with text personas; pass --text_persona for the best fit.")
    results = fit_personas(model, tokenizer, train, fit_args, heldout, text, save_dir=save_dir)
    result = results[name]
    print(f"Fitted persona {name!r} on {result['train_examples']} examples in {seconds(start)}.")
    if "loss_before" in result:
        print(
            f"Held-out loss ({result['eval_examples']} examples): {result['loss_before']:.3f} before, "
            f"{result['loss_after']:.3f} after."
        )
    if result["file"]:
        print(f"Saved {result['file']}")
    return 0


def add_subnetwork_persona(model_args: ModelArguments, args: AddPersonaArguments, data_args, seed: int) -> int:
    """add-persona --method subnetwork: a mask calibrated from the persona's lines (no training, no codebook)."""
    from ..subnetwork import SubnetworkConfig
    from ..subnetwork.command import calibrate_and_save

    if args.method != "subnetwork":
        raise SystemExit(f"--method must be 'mixture' or 'subnetwork', got {args.method!r}.")
    try:
        config = SubnetworkConfig(sparsity=args.sparsity, granularity=args.granularity)
    except ValueError as err:  # sparsity outside (0, 1), unknown granularity: said before loading the model
        raise SystemExit(str(err).replace("`", "--", 1).replace("`", "", 1)) from None
    name, train, heldout = persona_data(args, data_args, seed)
    save_dir = Path(args.save_dir) if args.save_dir else codebook_dir(args.codebook)
    base, tokenizer = load_base(model_args)
    try:
        result = calibrate_and_save(base, tokenizer, name, list(train), list(heldout or []), save_dir, config)
    except ValueError as err:  # no usable lines
        raise SystemExit(str(err)) from None
    print(
        f"Calibrated the {args.granularity} subnetwork of {name!r} (sparsity {args.sparsity:g}) on "
        f"{result['examples']} examples in {result['seconds']:.1f} s."
    )
    if "loss_masked" in result:
        print(
            f"Held-out loss ({result['eval_examples']} examples): {result['loss_base']:.3f} base model, "
            f"{result['loss_masked']:.3f} with the mask."
        )
    print(f"Saved {result['file']} ({result['bytes']} bytes)")
    return 0


COMMAND = Command(
    "add-persona", add_persona, (ModelArguments, AddPersonaArguments, DataArguments, PersonaFitArguments)
)
