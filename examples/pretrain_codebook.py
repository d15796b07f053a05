"""Stage 1: pretrain a Persona-Mux codebook with transformers.Trainer.

    python examples/pretrain_codebook.py --output_dir runs/codebook --max_personas 32 --max_examples_per_persona 50
    accelerate launch examples/pretrain_codebook.py --output_dir runs/codebook      # any accelerate setup

Rows need ``persona``, ``prompt`` and ``response`` (``--dataset`` is ``shakespeare`` or a .jsonl/.json/.csv file).
Every field below is a command-line flag; ``--help`` lists them with all of `TrainingArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import get_peft_model
from transformers import HfArgumentParser

from peft_personamux import PersonaMuxConfig
from peft_personamux.cli import DataArguments, load_persona_dataset, sample_per_persona
from peft_personamux.data import split_personas
from peft_personamux.models import load_base_model
from peft_personamux.training import CodebookTrainingArguments, pretrain_codebook


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default SmolLM2-135M."})
    dataset: str = field(default="shakespeare", metadata={"help": "'shakespeare' or a .jsonl/.json/.csv file."})
    pretrain_fraction: float = field(default=0.9, metadata={"help": "Fraction of personas to pretrain on."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the persona split."})
    max_personas: int | None = field(default=None, metadata={"help": "Keep the personas with the most rows."})
    max_examples_per_persona: int | None = field(default=None, metadata={"help": "Rows per persona."})
    num_codes: int = field(default=64, metadata={"help": "Codes = weights per persona (paper: 64)."})
    tokens_per_code: int = field(default=8, metadata={"help": "Mixed soft-prompt tokens (paper: 8)."})
    num_bias_tokens: int = field(default=12, metadata={"help": "Shared bias tokens (paper: 12)."})


def main(script: ScriptArguments, args: CodebookTrainingArguments) -> None:
    ds = load_persona_dataset(DataArguments(dataset=script.dataset))
    train, _unseen = split_personas(ds, script.pretrain_fraction, script.split_seed)
    train = sample_per_persona(train, script.max_personas, script.max_examples_per_persona, script.split_seed)

    base, tokenizer = load_base_model(script.model_name_or_path)
    config = PersonaMuxConfig(
        task_type="CAUSAL_LM",
        num_codes=script.num_codes,
        tokens_per_code=script.tokens_per_code,
        num_bias_tokens=script.num_bias_tokens,
    )
    model = get_peft_model(base, config)
    # registers every persona (rows at 0), trains b alone for args.warmup_epochs, then W, b and all mixtures;
    # checkpoints and output_dir get personas/<name>.safetensors next to the adapter
    trainer = pretrain_codebook(model, tokenizer, train, args)
    if trainer.is_world_process_zero():
        print(f"{len(model.personas)} personas, {trainer.state.global_step} steps; saved to {args.output_dir}")


if __name__ == "__main__":
    main(*HfArgumentParser((ScriptArguments, CodebookTrainingArguments)).parse_args_into_dataclasses())
