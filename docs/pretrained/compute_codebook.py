"""Compute the shipped codebook from the stage-1 codebook and every pretraining character's prompt gradients.

Issue 9's eighth pass measured a codebook that was computed, not trained, capturing more of the persona signal on
unseen characters than the trained one (docs/results.md): the principal directions of the pretraining characters'
gradients with respect to the 8 mixed tokens, taken at the stage-1 codebook's start prompt (its mean pretraining
mixture). This script builds that codebook in the shape the method ships (64 codes of 8 tokens, 12 bias tokens):

- code 0 is the stage-1 start prompt, so a mixture of ``e_0`` gives the prompt the stage-1 fits started from;
- codes 1-63 are the top 63 principal directions of the 177 characters' mean gradients (40 lines each, cached by
  docs/results/span_scaling.py), whitened (`codebook_init.codebook_from_gradients(scale="whiten")`);
- the bias tokens are the stage-1 ones, unchanged;
- each pretraining character's mixture is ``e_0`` plus its fit under the quadratic model
  (`contrast.quadratic_steps`), damped by 5-fold cross-validation on its own 40 lines
  (`contrast.cross_validated_damping`), minus the mean of those fits, so that the mean pretraining mixture, where
  new characters' fits start, stays ``e_0``.

It then scores the persona-identity diagnostic (`diagnostics.identity_gap`: held-out loss with each character's own
mixture against another's) for the stage-1 and the computed codebook on the same lines: up to 2 lines per pretraining
character that neither the 40 gradient lines nor the stage-1 run's training sample includes (``--identity_only``
scores it alone). Run from the repository root after span_scaling.py (a minute
or two for the codebook, about 10 more for the diagnostic on 2 CPU cores):

    python docs/pretrained/compute_codebook.py

Writes src/peft_personamux/pretrained/shakespeare (adapter, persona files, personamux_pretrain.json with a
"computed" section) and docs/pretrained/computed_codebook.json (the dampings, explained variance and diagnostic).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from peft import PeftModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs" / "results"))  # span_scaling.py's gradient cache and config

from span_analysis import SHRINKAGE  # noqa: E402
from span_scaling import pretraining_gradients, scaling_config  # noqa: E402

from peft_personamux.codebook_init import codebook_from_gradients  # noqa: E402
from peft_personamux.collator import PersonaMuxCollator  # noqa: E402
from peft_personamux.contrast import (  # noqa: E402
    DAMPING_FACTORS,
    cross_validated_damping,
    curvature,
    quadratic_steps,
)
from peft_personamux.data import split_personas  # noqa: E402
from peft_personamux.data.flags import DataArguments, load_persona_dataset, sample_per_persona  # noqa: E402
from peft_personamux.diagnostics import identity_gap  # noqa: E402
from peft_personamux.evaluation.data import make_split  # noqa: E402
from peft_personamux.evaluation.methods import codebook_tensors  # noqa: E402
from peft_personamux.evaluation.runner import Evaluation  # noqa: E402
from peft_personamux.fitting import mean_persona_mixture  # noqa: E402
from peft_personamux.loss import FAST  # noqa: E402
from peft_personamux.tuner.model import as_tuner  # noqa: E402

STAGE1 = ROOT / "docs" / "pretrained" / "stage1_codebook"
PACKAGE = ROOT / "src" / "peft_personamux" / "pretrained" / "shakespeare"
REPORT = ROOT / "docs" / "pretrained" / "computed_codebook.json"
IDENTITY_LINES = 2  # held-out lines per pretraining character for the diagnostic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_headroom100_contrast.json")
    parser.add_argument("--stage1", default=str(STAGE1), help="The stage-1 codebook folder (adapter + personas/).")
    parser.add_argument("--out", default=str(PACKAGE), help="Where the computed codebook is written (replaced).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--identity_only", action="store_true", help="Only score the identity diagnostic of --stage1 and --out."
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    config = scaling_config(args.config)
    evaluation = Evaluation(config)
    base, tokenizer = evaluation.base()
    stage1 = PeftModel.from_pretrained(copy.deepcopy(base), args.stage1)
    stage1.freeze()
    info = json.loads((Path(args.stage1) / "personamux_pretrain.json").read_text())
    if args.identity_only:
        computed = PeftModel.from_pretrained(copy.deepcopy(base), args.out)
        computed.freeze()
        summary = json.loads(REPORT.read_text())
        names = sorted({r["persona"] for r in evaluation.split.pretrain})
        return measure_identity(evaluation, config, stage1, computed, tokenizer, names, info, summary)
    codebook, _ = codebook_tensors(stage1)  # (64, 8, hidden)
    num_codes = codebook.shape[0]
    start = mean_persona_mixture(stage1)  # (64,)
    start_prompt = torch.einsum("c,ckd->kd", start, codebook.detach().float())  # (8, hidden)

    lines, names = pretraining_gradients(config)  # 177 characters x 40 lines, at the start prompt
    curv = curvature(lines, SHRINKAGE)
    code_norm = float(codebook.detach().float().flatten(1).norm(dim=1).mean())
    pca, explained = codebook_from_gradients(
        lines.persona_means(), num_codes - 1, code_norm, seed=args.seed, scale="whiten"
    )
    codes = torch.cat([start_prompt[None], pca])  # (64, 8, hidden): code 0 is the start prompt

    unit = curv.mean_eigenvalue
    dampings = cross_validated_damping(codes, curv, lines, [f * unit for f in DAMPING_FACTORS])
    missing = sorted(set(range(len(names))) - set(dampings))
    if missing:
        raise ValueError(f"No cross-validated damping for {[names[r] for r in missing]}: fewer than 5 lines each.")
    means = lines.persona_means()
    steps = torch.zeros(len(names), num_codes, dtype=torch.float64)  # (characters, 64)
    for damping in sorted(set(dampings.values())):
        rows = [r for r, d in dampings.items() if d == damping]
        steps[rows] = quadratic_steps(codes, curv, torch.stack([means[r] for r in rows]), damping)
    mixtures = steps - steps.mean(0, keepdim=True)
    mixtures[:, 0] += 1.0  # e_0 + centred fits: the mean mixture is the start prompt

    computed = PeftModel.from_pretrained(copy.deepcopy(base), args.stage1)
    computed.freeze()
    tuner = as_tuner(computed)
    layer, adapter = tuner.personamux_layer, tuner.current_adapter
    with torch.no_grad():
        layer.personamux_codebook[adapter].copy_(codes.to(layer.personamux_codebook[adapter].dtype))
    computed.add_personas(names, exist_ok=True)
    for row, name in enumerate(names):
        computed.set_mixture(name, mixtures[row].float())

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    computed.save_pretrained(str(out))
    computed.save_personas(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's model card: the package documents the codebook
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "smollm2-135m-instruct"
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    summary = {
        "command": "python docs/pretrained/compute_codebook.py",
        "stage1": str(Path(args.stage1).resolve().relative_to(ROOT)),
        "gradient_lines": int(lines.gradients.shape[0]),
        "characters": len(names),
        "codes": "0: the stage-1 start prompt; 1-63: whitened principal directions of the characters' mean gradients",
        "explained": explained,
        "shrinkage": SHRINKAGE,
        "damping_over_mean_eigenvalue": dict(Counter(d / unit for d in dampings.values())),
        "mixture_norm": {
            "mean_step": float(steps.mean(0).norm()),
            "mean_centred_step": float((steps - steps.mean(0)).norm(dim=1).mean()),
        },
        "seed": args.seed,
    }
    (out / "personamux_pretrain.json").write_text(json.dumps({**info, "computed": summary}, indent=2) + "\n")
    print(f"Wrote {out}: {len(names)} personas; the codes hold {100 * explained:.1f}% of the gradients' variance.")

    measure_identity(evaluation, config, stage1, computed, tokenizer, names, info, summary)


def measure_identity(evaluation, config, stage1, computed, tokenizer, names, info, summary: dict) -> None:
    rows = identity_rows(evaluation, config, names, info, IDENTITY_LINES)  # once: both codebooks score the same lines
    summary["identity"] = {
        label: identity(evaluation, model, tokenizer, names, rows)
        for label, model in (("stage1", stage1), ("computed", computed))
    }
    REPORT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["identity"], indent=1))


def identity_rows(evaluation, config, names: list[str], info: dict, lines_per_persona: int) -> list[dict]:
    """Up to ``lines_per_persona`` lines of each pretraining character that neither codebook saw: outside the cached
    gradient lines and outside the stage-1 run's training sample (rebuilt from its recorded data flags)."""
    data_args = DataArguments(**info["data"])
    pretrain_ds, _ = split_personas(load_persona_dataset(data_args), data_args.pretrain_fraction, data_args.split_seed)
    stage1_rows = sample_per_persona(
        pretrain_ds, data_args.max_personas, data_args.max_examples_per_persona, data_args.split_seed
    )
    key = ("persona", "prompt", "response")
    seen = {tuple(r[k] for k in key) for r in evaluation.split.pretrain}
    seen |= set(zip(*(stage1_rows[k] for k in key)))
    everything = make_split(dataclasses.replace(config, pretrain_lines_per_persona=None)).pretrain
    held: dict[str, list[dict]] = defaultdict(list)
    for row in everything:
        if tuple(row[k] for k in key) not in seen and len(held[row["persona"]]) < lines_per_persona:
            held[row["persona"]].append(row)
    return [r for name in names for r in held.get(name, [])]


def identity(evaluation, model, tokenizer, names: list[str], rows: list[dict]) -> dict:
    """`diagnostics.identity_gap` of ``model``'s persona mixtures on ``rows`` (`identity_rows`), float32."""
    for name in names:
        if name not in model.personas:
            model.load_persona(name, activate=False)  # the codebook folder's own persona files
    collator = PersonaMuxCollator.for_model(model, tokenizer, **evaluation.mux_collator_kwargs())
    batches = [collator(rows[i : i + 16]) for i in range(0, len(rows), 16)]
    gap = identity_gap(model, batches, options=FAST)
    return {**gap, "lines": len(rows), "characters": len({r["persona"] for r in rows})}


if __name__ == "__main__":
    main()
