"""Stage 1: pretrain a Persona-Mux codebook with transformers.Trainer.

    python examples/pretrain_codebook.py --output_dir runs/codebook --max_personas 32 --max_examples_per_persona 50
    accelerate launch examples/pretrain_codebook.py --output_dir runs/codebook      # any accelerate setup

Rows need ``persona``, ``prompt`` and ``response`` (``--dataset`` is ``shakespeare`` or a .jsonl/.json/.csv file).
The flags are those of ``personamux pretrain`` (the same dataclasses); ``--help`` lists them with all of
`TrainingArguments`.
"""

from __future__ import annotations

from peft import get_peft_model
from transformers import HfArgumentParser

from peft_personamux import PersonaMuxConfig
from peft_personamux.cli import CodebookArguments, ModelArguments
from peft_personamux.cli.pretrain import text_personas_from_flags
from peft_personamux.data import DataArguments, load_persona_dataset, sample_per_persona, split_personas
from peft_personamux.models import load_base_model
from peft_personamux.training import CodebookTrainingArguments, pretrain_codebook


def main(
    model_args: ModelArguments, data: DataArguments, codebook: CodebookArguments, args: CodebookTrainingArguments
) -> None:
    ds = load_persona_dataset(data)
    train, _unseen = split_personas(ds, data.pretrain_fraction, data.split_seed)
    train = sample_per_persona(train, data.max_personas, data.max_examples_per_persona, data.split_seed)

    base, tokenizer = load_base_model(model_args.model_name_or_path, dtype=model_args.dtype)
    config = PersonaMuxConfig(
        task_type="CAUSAL_LM",
        num_codes=codebook.num_codes,
        tokens_per_code=codebook.tokens_per_code,
        num_bias_tokens=codebook.num_bias_tokens,
    )
    text_personas = text_personas_from_flags(data, base, tokenizer, train, args.output_dir)  # --text_personas
    model = get_peft_model(base, config)
    # registers every persona (rows at 0), trains b alone for args.warmup_epochs, then W, b and all mixtures;
    # checkpoints and output_dir get personas/<name>.safetensors next to the adapter
    trainer = pretrain_codebook(model, tokenizer, train, args, text_personas)
    if trainer.is_world_process_zero():
        print(f"{len(model.personas)} personas, {trainer.state.global_step} steps; saved to {args.output_dir}")


if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, DataArguments, CodebookArguments, CodebookTrainingArguments))
    main(*parser.parse_args_into_dataclasses())
