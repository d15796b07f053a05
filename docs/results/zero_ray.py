"""Loss along the ray t * m from the zero mixture, m a pretraining persona's own mixture, on its own lines; and the
norms of the pretraining mixtures and of their prompt tokens against a vocabulary embedding's.

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
    out: dict = {"norms": norms(model, base), "t": SCALES, "personas": {}}
    print(out["norms"])
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


def norms(model, base) -> dict:
    """Mean norms: the persona files' mixtures, their prompt tokens, the mean mixture and its tokens, embeddings."""
    from peft_personamux.evaluation.methods import codebook_tensors
    from peft_personamux.fitting import mean_persona_mixture
    from peft_personamux.persona_files import read_persona_file

    codebook = codebook_tensors(model)[0].detach().float()  # (codes, tokens, hidden)
    num_codes, fingerprint = codebook.shape[0], model.codebook_fingerprint()
    files = model.available_persona_files().values()
    rows = torch.stack([read_persona_file(path, num_codes, fingerprint)[1].float() for path in files])
    mean = mean_persona_mixture(model)
    return {
        "personas": rows.shape[0],
        "mixture_norm": float(rows.norm(dim=1).mean()),
        "prompt_token_norm": float(torch.einsum("pc,ckd->pkd", rows, codebook).norm(dim=-1).mean()),
        "mean_mixture_norm": float(mean.norm()),
        "mean_prompt_token_norms": torch.einsum("c,ckd->kd", mean, codebook).norm(dim=-1).tolist(),
        "embedding_norm": float(base.get_input_embeddings().weight.detach().norm(dim=1).mean()),
        "rms_norm_eps": base.config.rms_norm_eps,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
