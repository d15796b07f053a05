"""Stage 2: fit new personas on a frozen Persona-Mux codebook with transformers.Trainer.

    python examples/add_persona.py --codebook runs/codebook --persona as_you_like_it/rosalind macbeth/macbeth

Every persona named is fitted in the same run (full batch: each step sees all their training rows), from zero
mixtures, with W and b frozen. Their persona files are written next to the codebook, and the held-out loss before
and after is printed. ``--help`` lists every flag, with all of `TrainingArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftModel
from transformers import HfArgumentParser

from peft_personamux.cli import ModelArguments
from peft_personamux.data import DataArguments, load_persona_dataset, split_persona_examples
from peft_personamux.models import load_base_model
from peft_personamux.training import PersonaFitArguments, fit_personas


@dataclass
class ScriptArguments:
    codebook: str = field(metadata={"help": "Folder written by pretrain_codebook.py (or `personamux pretrain`)."})
    persona: list[str] = field(metadata={"help": "Personas of --dataset to fit, e.g. as_you_like_it/rosalind."})
    num_train: int = field(default=100, metadata={"help": "Training rows per persona (paper: 100)."})
    num_eval: int = field(default=20, metadata={"help": "Held-out rows per persona for the loss before/after."})


def main(model_args: ModelArguments, script: ScriptArguments, data: DataArguments, args: PersonaFitArguments) -> None:
    ds = load_persona_dataset(data)
    wanted = set(script.persona)
    ds = ds.filter(lambda persona: persona in wanted, input_columns="persona")
    missing = wanted - set(ds["persona"])
    if missing:
        raise SystemExit(f"Not in {data.dataset}: {sorted(missing)}")
    train, heldout = split_persona_examples(ds, script.num_train, args.seed, max_test=script.num_eval)

    base, tokenizer = load_base_model(model_args.model_name_or_path, dtype=model_args.dtype)
    model = PeftModel.from_pretrained(base, script.codebook)
    results = fit_personas(model, tokenizer, train, args, heldout, save_dir=script.codebook)
    for name, r in results.items():
        print(f"{name}: {r['train_examples']} rows, held-out loss {r['loss_before']:.3f} -> {r['loss_after']:.3f}")


if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, ScriptArguments, DataArguments, PersonaFitArguments))
    main(*parser.parse_args_into_dataclasses())
