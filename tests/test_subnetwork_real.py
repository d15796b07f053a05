"""Persona subnetworks on the real SmolLM2-135M-Instruct (slow: loads the GGUF model)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from peft_personamux.models import load_base_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return load_base_model(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def lines():
    from peft_personamux.data import load_shakespeare

    ds = load_shakespeare(max_chars=120)
    return {
        p: [r for r in ds.filter(lambda x, p=p: x == p, input_columns="persona")][:12]
        for p in ("hamlet/hamlet", "hamlet/ophelia")
    }


def test_channel_masks_on_smollm2_mix_per_row_and_fit_in_kilobytes(smollm2, lines, tmp_path):
    from peft_personamux.collator import build_generation_inputs
    from peft_personamux.subnetwork import ChannelMask, SubnetworkBank, calibrate_subnetwork, subnetwork_path

    model, tokenizer = smollm2
    bank = SubnetworkBank(model)
    for persona, rows in lines.items():
        mask = calibrate_subnetwork(model, tokenizer, rows, persona, sparsity=0.1, progress=False)
        assert mask.neurons.shape == (30, 1536) and mask.heads.shape == (30, 9)
        assert mask.packed_bytes == 30 * 1536 // 8 + 34
        path = mask.save(subnetwork_path(tmp_path, persona))
        assert os.path.getsize(path) < 8192
        bank.add(ChannelMask.load(path, model))
    inputs = build_generation_inputs(tokenizer, ["How now, my lord?", "What say you?"], None, 49151)
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    personas = list(lines)
    with torch.no_grad(), bank.apply(personas):
        mixed = model.generate(**inputs, **kwargs)
    for i, persona in enumerate(personas):
        n = int(inputs["attention_mask"][i].sum())
        with torch.no_grad(), bank.apply(persona):
            alone = model.generate(input_ids=inputs["input_ids"][i : i + 1, -n:], **kwargs)
        assert torch.equal(mixed[i, -6:], alone[0, -6:])


def test_weight_mask_on_smollm2_is_13_mb_and_switches_back_exactly(smollm2, lines):
    from peft_personamux.subnetwork import SubnetworkConfig, apply_weight_mask, calibrate_subnetwork

    model, tokenizer = smollm2
    config = SubnetworkConfig(granularity="weight", sparsity=0.3)
    mask = calibrate_subnetwork(
        model, tokenizer, lines["hamlet/hamlet"], "hamlet/hamlet", config=config, progress=False
    )
    assert mask.packed_bytes == 13_271_040  # 106,168,320 bits: every decoder Linear, not the tied LM head
    ids = torch.tensor([tokenizer("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with apply_weight_mask(model, mask):
            masked = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, dense) and not torch.allclose(masked, dense)
