"""``personamux demo``: fit an unseen Shakespeare character on the shipped codebook (or a small one trained first),
then print held-out losses and generations at three bias scales, with timings."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.flags import DataArguments, load_persona_dataset, sample_per_persona
from ..files import PRETRAIN_INFO_NAME, TEXT_PERSONAS_NAME, read_json
from ..persona_files import list_persona_files
from ..prompting import DEFAULT_INSTRUCTION
from ..training import CodebookTrainingArguments, PersonaFitArguments
from .common import Command, ModelArguments, codebook_dir, generate_texts, load_base, load_codebook, seconds


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
    num_train: int = field(
        default=100,
        metadata={
            "help": "Training lines of the new persona (paper: 100; at 16 the fitted gain did not reach held-out "
            "lines, docs/results.md)."
        },
    )
    num_eval: int = field(default=20, metadata={"help": "Held-out lines for the loss before/after."})
    fit_method: str = field(
        default="lbfgs",
        metadata={
            "help": "'lbfgs' (default): L-BFGS on the 64 weights, no learning rate (docs/fitting.md); 'fisher': "
            "Levenberg-Marquardt steps; 'adam': the paper's full-batch Adam recipe (use --steps 100)."
        },
    )
    steps: int = field(
        default=4,
        metadata={"help": "Fitting steps: L-BFGS iterations, Fisher steps, or full-batch Adam steps (paper: 100)."},
    )
    fit_start: str = field(
        default="mean",
        metadata={
            "help": "'mean' (default): start from the mean mixture of the codebook's pretraining personas; 'zero': "
            "the paper's start (a singular point of the model's first RMSNorm, docs/fitting.md). --from_scratch "
            "always starts from zero."
        },
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
    max_chars: int = field(
        default=120, metadata={"help": "Shakespeare lines are cut to this length (the shipped codebook's: 120)."}
    )
    max_prompt_tokens: int = field(default=80, metadata={"help": "Prompt token limit."})
    max_response_tokens: int = field(default=48, metadata={"help": "Response token limit (the codebook's: 48)."})
    scratch_personas: int = field(default=4, metadata={"help": "--from_scratch: pretraining personas."})
    scratch_lines: int = field(default=8, metadata={"help": "--from_scratch: lines per pretraining persona."})
    scratch_epochs: float = field(default=2.0, metadata={"help": "--from_scratch: epochs (the first is the warm-up)."})
    scratch_num_codes: int = field(default=16, metadata={"help": "--from_scratch: codes in the codebook."})
    seed: int = field(default=0, metadata={"help": "Seed of the persona split, sampling and training."})


def pick_unseen_persona(unseen, wanted: str | None, needed: int) -> str:
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

    from ..data import split_persona_examples, split_personas
    from ..training import evaluate_loss, fit_personas, pretrain_codebook
    from ..tuner import PersonaMuxConfig

    total = time.perf_counter()
    out = Path(args.output_dir)
    codebook = None if args.from_scratch else codebook_dir(args.codebook)
    info = read_json(codebook / PRETRAIN_INFO_NAME) if codebook else {}
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
    persona = pick_unseen_persona(unseen, args.persona, args.num_train + args.num_eval)
    train, heldout = split_persona_examples(
        unseen.filter(lambda p: p == persona, input_columns="persona"), args.num_train, args.seed, args.num_eval
    )
    print(f"Data: {len(ds)} Shakespeare lines, {len(set(unseen['persona']))} unseen characters ({seconds(step)}).")
    print(f"Unseen character: {persona} ({len(train)} training lines, {len(heldout)} held out).")

    step = time.perf_counter()
    base, tokenizer = load_base(model_args)
    print(f"Base model loaded in {seconds(step)}.")
    if args.from_scratch:
        step = time.perf_counter()
        small = sample_per_persona(pretrain_split, args.scratch_personas, args.scratch_lines, args.seed)
        config = PersonaMuxConfig(task_type="CAUSAL_LM", num_codes=args.scratch_num_codes)
        torch.manual_seed(args.seed)  # the codebook's and bias tokens' random start
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
            f"{args.scratch_lines} lines, {trainer.state.global_step} steps, in {seconds(step)}; training loss "
            f"{losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last."
        )
    else:
        model = load_codebook(base, codebook)
        print(f"Codebook: {codebook} ({len(list_persona_files(codebook))} pretrained personas).")
    max_prompt = info.get("max_prompt_tokens", args.max_prompt_tokens)
    text_personas = None
    if info.get("text_personas"):
        from ..data import describe_personas

        step = time.perf_counter()
        with model.disable_adapter():
            text_personas = describe_personas(model, tokenizer, train, out / TEXT_PERSONAS_NAME)
        print(f"Text persona ({seconds(step)}): {text_personas[persona]}")
    text = text_personas.get(persona) if text_personas else None
    instruction = info.get("instruction", DEFAULT_INSTRUCTION)
    start = "zero" if args.from_scratch else args.fit_start
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
        lbfgs_steps=args.steps,
        fit_start=start,
    )
    eval_kwargs = {
        "text_personas": text_personas,
        "instruction": instruction,
        "max_prompt_tokens": max_prompt,
        "max_response_tokens": args.max_response_tokens,
    }
    model.add_personas([persona], exist_ok=True)  # at the zero mixture until the fit resets it to its start
    zero = evaluate_loss(model, tokenizer, heldout, [persona], 1.0, **eval_kwargs)[persona]
    step = time.perf_counter()
    result = fit_personas(model, tokenizer, train, fit_args, heldout, text_personas, save_dir=out)[persona]
    fit_seconds = time.perf_counter() - step
    how = {"lbfgs": "L-BFGS iterations", "fisher": "Fisher steps", "adam": "full-batch Adam steps"}[args.fit_method]
    where = "the mean pretraining mixture" if start == "mean" else "the zero mixture"
    print(
        f"Fitted {persona} ({model.peft_config['default'].num_codes} weights) in {fit_seconds:.1f} s: {args.steps} "
        f"{how} over {len(train)} lines, from {where}."
    )
    gain = zero - result["loss_after"]
    print(
        f"Held-out loss: {zero:.3f} at the zero mixture, {result['loss_before']:.3f} at the start ({where}), "
        f"{result['loss_after']:.3f} fitted ({gain:+.3f} nats per token against zero, "
        f"{result['loss_before'] - result['loss_after']:+.3f} against the start)."
    )
    step = time.perf_counter()
    for scale in (0.5, 0.0):
        loss = evaluate_loss(model, tokenizer, heldout, [persona], scale, **eval_kwargs)[persona]
        print(f"Held-out loss at bias scale {scale:g}: {loss:.3f}")
    print(f"(bias-scale losses in {seconds(step)})")

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
        print(f"\n== bias scale {scale:g} ({seconds(step)}) ==")
        for prompt, reference, answer in zip(prompts["prompt"], prompts["response"], answers):
            print(f"Prompt:    {prompt}\nOriginal:  {reference}\nGenerated: {answer}\n")
    print(f"Persona file: {result['file']}")
    print(f"Demo finished in {seconds(total)}.")
    return 0


COMMAND = Command("demo", demo, (ModelArguments, DemoArguments))
