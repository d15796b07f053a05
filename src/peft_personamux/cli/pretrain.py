"""``personamux pretrain``: stage 1, a codebook trained on the pretraining personas of a dataset."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ..data.flags import DataArguments, load_persona_dataset, sample_per_persona
from ..files import PRETRAIN_INFO_NAME, TEXT_PERSONAS_NAME, read_json, write_json
from ..training import CodebookTrainingArguments
from .common import CodebookArguments, Command, ModelArguments, load_base, seconds


def text_personas_from_flags(data_args: DataArguments, model, tokenizer, ds, output_dir: str) -> dict[str, str] | None:
    """``--text_personas`` read from its file, or written by the base model with ``--describe_personas``."""
    if data_args.text_personas:
        return read_json(Path(data_args.text_personas))
    if data_args.describe_personas:
        from ..data import describe_personas

        return describe_personas(model, tokenizer, ds, Path(output_dir) / TEXT_PERSONAS_NAME)
    return None


def pretrain(
    model_args: ModelArguments,
    data_args: DataArguments,
    codebook_args: CodebookArguments,
    training_args: CodebookTrainingArguments,
) -> int:
    """Stage 1: pretrain a codebook on the pretraining personas of a dataset."""
    from peft import get_peft_model
    from transformers import set_seed

    from ..data import split_personas
    from ..training import pretrain_codebook
    from ..tuner import PersonaMuxConfig

    start = time.perf_counter()
    ds = load_persona_dataset(data_args)
    train, unseen = split_personas(ds, data_args.pretrain_fraction, data_args.split_seed)
    train = sample_per_persona(train, data_args.max_personas, data_args.max_examples_per_persona, data_args.split_seed)
    base, tokenizer = load_base(model_args)
    text_personas = text_personas_from_flags(data_args, base, tokenizer, train, training_args.output_dir)
    config = PersonaMuxConfig(
        task_type="CAUSAL_LM",
        num_codes=codebook_args.num_codes,
        tokens_per_code=codebook_args.tokens_per_code,
        num_bias_tokens=codebook_args.num_bias_tokens,
    )
    set_seed(training_args.seed)  # the codebook's and bias tokens' random start, as the Trainer seeds the rest
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
        write_json(out / PRETRAIN_INFO_NAME, info)
        if text_personas is not None:
            write_json(out / TEXT_PERSONAS_NAME, {p: text_personas[p] for p in model.personas if p in text_personas})
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(f"Pretrained a codebook on {len(model.personas)} personas, {len(train)} examples, in {seconds(start)}.")
        if losses:
            print(f"Training loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}.")
        print(f"Saved to {out} (adapter + {len(model.personas)} persona files).")
    return 0


COMMAND = Command("pretrain", pretrain, (ModelArguments, DataArguments, CodebookArguments, CodebookTrainingArguments))
