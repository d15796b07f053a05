"""One character, three fits from the zero mixture: how far does each optimiser move the soft prompt?

Run from the repository root: ``python docs/results/fit_probe.py`` (a few minutes on 2 CPU cores). The first unseen
character of configs/eval_headroom.json (its 16 training and 12 held-out lines), fitted from zero with L-BFGS (the 64
weights on the shipped codebook, and 8 free prompt vectors) and with Adam (the free prompt, lr 3e-3, 15 steps).
Prints each fit's training curve, held-out loss and the norm of the fitted mixture; writes docs/results/fit_probe.json.
"""

from __future__ import annotations

import copy
import json
import tempfile

import torch
from peft import PeftModel

from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import free_prompt_model, per_persona, row_losses
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.fitting import fit_mixtures

FITS = [("mix64", "lbfgs", 1.0, 12), ("free8", "lbfgs", 1.0, 12), ("free8", "adam", 3e-3, 15)]


def main() -> dict:
    config = EvalConfig(**{**read_config_file("configs/eval_headroom.json"), "output_dir": tempfile.mkdtemp()})
    evaluation = Evaluation(config)
    base, tokenizer = evaluation.base()
    persona = evaluation.personas[0]
    train_rows = evaluation.split.rows_of("train", persona)
    test_rows = evaluation.split.rows_of("test", persona)
    learned = PeftModel.from_pretrained(copy.deepcopy(base), str(evaluation.codebook_dir))
    learned.add_personas([persona], exist_ok=True)
    learned.freeze()
    free = free_prompt_model(base, learned, learned.adapter_config().tokens_per_code)
    free.add_personas([persona])
    models = {"mix64": learned, "free8": free}
    out: dict = {"persona": persona, "fits": []}
    for label, method, lr, steps in FITS:
        model = models[label]
        collator = PersonaMuxCollator.for_model(model, tokenizer, **evaluation.mux_collator_kwargs())
        train, test = collator(train_rows), collator(test_rows)
        model.set_mixture(persona, torch.zeros(model.adapter_config().num_codes))
        zero = per_persona(test_rows, *row_losses(model, test, 16))[persona]
        fit = fit_mixtures(model, train, method=method, steps=steps, lr=lr, bias_scale=1.0, progress=False)
        row = {
            "span": label,
            "method": method,
            "lr": lr,
            "steps": steps,
            "train_curve": next(iter(fit.persona_curves.values())),
            "test_zero": zero,
            "test_fitted": per_persona(test_rows, *row_losses(model, test, 16))[persona],
            "mixture_norm": float(model.get_mixture(persona).float().norm()),
        }
        out["fits"].append(row)
        print(label, method, lr, steps, {k: v for k, v in row.items() if k not in ("span", "method", "lr", "steps")})
    with open("docs/results/fit_probe.json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
