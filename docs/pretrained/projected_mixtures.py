"""The alternative to compute_codebook.py's pretraining mixtures that was tried and not shipped: each stage-1
character's prompt deviation projected onto the computed codes in the curvature metric.

For character i with stage-1 mixture m_i, the deviation ``d_i = W1^T (m_i - mean m)`` (D numbers) is projected to
``argmin_w |Q w - d_i|_H`` (Q: the computed codes, H: the pretraining lines' curvature), centred, plus ``e_0``, and
scored with compute_codebook.py's persona-identity diagnostic on the same lines. Run from the repository root after
compute_codebook.py (about 10 minutes on 2 CPU cores):

    python docs/pretrained/projected_mixtures.py

Adds ``identity.projected`` (and the share of the deviations' curvature energy the projection keeps) to
docs/pretrained/computed_codebook.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs" / "results"))
sys.path.insert(0, str(ROOT / "docs" / "pretrained"))

import compute_codebook as cc  # noqa: E402
from span_analysis import SHRINKAGE  # noqa: E402
from span_scaling import pretraining_gradients, scaling_config  # noqa: E402

from peft_personamux.contrast import curvature  # noqa: E402
from peft_personamux.evaluation.methods import codebook_tensors  # noqa: E402
from peft_personamux.evaluation.runner import Evaluation  # noqa: E402


def main() -> None:
    config = scaling_config("configs/eval_headroom100_contrast.json")
    evaluation = Evaluation(config)
    base, tokenizer = evaluation.base()
    names = sorted({r["persona"] for r in evaluation.split.pretrain})
    stage1 = PeftModel.from_pretrained(copy.deepcopy(base), str(cc.STAGE1))
    stage1.freeze()
    for name in names:
        stage1.load_persona(name, activate=False)
    w1 = codebook_tensors(stage1)[0].detach().double().flatten(1)  # (64, D)
    table = torch.stack([stage1.get_mixture(n).detach().double() for n in names])  # (177, 64)
    deviations = ((table - table.mean(0)) @ w1).T  # (D, 177)
    computed = PeftModel.from_pretrained(copy.deepcopy(base), str(cc.PACKAGE))
    computed.freeze()
    q = codebook_tensors(computed)[0].detach().double().flatten(1).T  # (D, 64)
    lines, _ = pretraining_gradients(config)
    curv = curvature(lines, SHRINKAGE)
    weights = torch.linalg.solve(curv.project(q), q.T @ curv.apply(deviations)).T  # (177, 64)
    weights -= weights.mean(0)
    projected = q @ weights.T  # (D, 177)
    kept = float((curv.apply(projected) * projected).sum() / (curv.apply(deviations) * deviations).sum())
    weights[:, 0] += 1.0
    computed.add_personas(names, exist_ok=True)
    for row, name in enumerate(names):
        computed.set_mixture(name, weights[row].float())
    info = json.loads((cc.STAGE1 / "personamux_pretrain.json").read_text())
    rows = cc.identity_rows(evaluation, config, names, info, cc.IDENTITY_LINES)
    gap = cc.identity(evaluation, computed, tokenizer, names, rows)
    report = json.loads(cc.REPORT.read_text())
    report["identity"]["projected"] = {**gap, "curvature_energy_kept": kept}
    cc.REPORT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["identity"]["projected"], indent=1))


if __name__ == "__main__":
    main()
