"""The shipped codebook's files, as docs/pretrained/compute_codebook.py makes them (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from peft_personamux.persona_files import codebook_fingerprint, read_persona_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "peft_personamux" / "pretrained" / "shakespeare"
STAGE1 = ROOT / "docs" / "pretrained" / "stage1_codebook"
PREFIX = "base_model.model.model.embed_tokens.personamux_"


def tensors(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return weights[PREFIX + "codebook"], weights[PREFIX + "bias"]  # (64, 8, 576), (12, 576)


def mixtures(folder: Path, codebook: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    fingerprint = codebook_fingerprint(codebook, bias)
    files = sorted((folder / "personas").rglob("*.safetensors"))
    return dict(read_persona_file(str(path), codebook.shape[0], fingerprint) for path in files)


def test_shipped_codebook_starts_where_the_stage1_fits_started():
    codebook, bias = tensors(SHIPPED)
    stage1_codebook, stage1_bias = tensors(STAGE1)
    assert codebook.shape == stage1_codebook.shape == (64, 8, 576)
    torch.testing.assert_close(bias, stage1_bias, rtol=0, atol=0)  # the bias tokens are the stage-1 ones
    shipped, stage1 = mixtures(SHIPPED, codebook, bias), mixtures(STAGE1, stage1_codebook, stage1_bias)
    assert sorted(shipped) == sorted(stage1) and len(shipped) == 177  # every pretraining character, fingerprints ok
    start_prompt = torch.einsum("c,ckd->kd", torch.stack(list(stage1.values())).mean(0), stage1_codebook)
    torch.testing.assert_close(codebook[0], start_prompt, rtol=1e-4, atol=1e-4)  # code 0: the stage-1 start prompt
    mean = torch.stack(list(shipped.values())).mean(0)  # where new characters' fits start
    torch.testing.assert_close(mean, torch.eye(64)[0], rtol=0, atol=1e-5)
    spread = torch.stack(list(shipped.values())) - mean
    assert float(spread.norm(dim=1).min()) > 0  # the characters' mixtures differ
    info = json.loads((SHIPPED / "personamux_pretrain.json").read_text())
    assert info["computed"]["characters"] == 177 and info["personas"] == 177
