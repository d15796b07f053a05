"""Loss along the ray t * m from the zero mixture, m a pretraining persona's own mixture, on its own lines.

Run from the repository root: ``python docs/results/zero_ray.py`` (a few minutes on 2 CPU cores). It uses the split
of configs/eval_headroom.json (the pretraining sample: the personas with the most lines) and the shipped codebook,
and writes docs/results/zero_ray.json.
"""

from __future__ import annotations

import copy
import json
import tempfile

import torch
from peft import PeftModel

from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import per_persona, row_losses
from peft_personamux.evaluation.runner import Evaluation

SCALES = [0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 2.0]


def main(personas: int = 4, lines: int = 8) -> dict:
    config = EvalConfig(**{**read_config_file("configs/eval_headroom.json"), "output_dir": tempfile.mkdtemp()})
    evaluation = Evaluation(config)
    base, tokenizer = evaluation.base()
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(evaluation.codebook_dir))
    model.freeze()
    collator = PersonaMuxCollator.for_model(model, tokenizer, **evaluation.mux_collator_kwargs())
    files = model.available_persona_files()
    rows = evaluation.split.pretrain
    names = [n for n in sorted({r["persona"] for r in rows}) if n in files][:personas]
    out: dict = {"t": SCALES, "personas": {}}
    for name in names:
        model.load_persona(name)
        own = model.get_mixture(name).float().clone()  # (num_codes,)
        mine = [r for r in rows if r["persona"] == name][:lines]
        batch = collator(mine)
        curve = []
        for t in SCALES:
            model.set_mixture(name, own * t)
            curve.append(per_persona(mine, *row_losses(model, batch, 16))[name])
        out["personas"][name] = {"mixture_norm": float(own.norm()), "loss": curve}
        print(name, f"|m| = {own.norm():.2f}", " ".join(f"{t:g}: {v:.3f}" for t, v in zip(SCALES, curve)))
    with open("docs/results/zero_ray.json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
