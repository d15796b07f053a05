"""`heldout_losses` on a tiny Persona-Mux model: every variant, its sizes and timings, and the general-text loss."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_rows, make_tokenizer, tiny_base

from peft_personamux import PersonaMuxConfig
from peft_personamux.subnetwork import SubnetworkConfig
from peft_personamux.subnetwork.evaluate import general_loss, heldout_losses, plain_losses


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_heldout_losses_every_variant(tokenizer):
    torch.manual_seed(0)
    config = PersonaMuxConfig(task_type="CAUSAL_LM", num_codes=4, tokens_per_code=2, num_bias_tokens=2)
    model = get_peft_model(tiny_base(tokenizer), config)
    rows = make_rows(personas=("play/a", "play/b"), per_persona=6)
    train = [r for i, r in enumerate(rows) if i % 3]
    test = [r for i, r in enumerate(rows) if not i % 3]
    result = heldout_losses(
        model,
        tokenizer,
        train,
        test,
        sparsities=(0.25, 0.5),
        config=SubnetworkConfig(batch_size=2),
        fit_steps=1,
        progress=False,
    )
    assert result["personas"] == ["play/a", "play/b"] and set(model.personas) >= {"play/a", "play/b"}
    variants = {"base", "soft_prompt"} | {
        f"{kind}@{s}"
        for s in ("0.25", "0.5")
        for kind in (
            "weight_mask",
            "channel_mask",
            "channel_mask+soft_prompt",
            "weight_mask_other",
            "channel_mask_other",
        )
    }
    assert set(result["heldout"]) == variants
    assert all(math.isfinite(v) for losses in result["heldout"].values() for v in losses.values())
    assert set(result["general"]) == {"base"} | {v for v in variants if "_mask@" in v and "soft" not in v}
    assert result["heldout"]["weight_mask@0.5"] != result["heldout"]["base"]
    base = model.get_base_model()
    assert result["heldout"]["base"] == pytest.approx(plain_losses(base, tokenizer, test))
    assert result["general"]["base"] == pytest.approx(general_loss(base, tokenizer))
    assert result["bytes"]["channel_mask"] == 2 * 64 // 8 + 1 and result["bytes"]["mixture"] == 16
    assert set(result["seconds"]) == {"statistics", "mixture_fit", "weight_mask_build", "channel_mask_build"}
    with pytest.raises(ValueError, match="`sparsity` must be strictly between 0 and 1"):
        heldout_losses(model, tokenizer, train, test, sparsities=(0.0,), progress=False)
