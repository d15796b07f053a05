"""Headroom stage pieces: the identity codebook spans every prompt, summaries and the capture ratio."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_loss import SMALL, batch_for
from tiny_models import make_model

from peft_personamux import PersonaMuxConfig
from peft_personamux.evaluation.headroom import (
    free_prompt_model,
    identity_codebook,
    row_losses,
    summarize_headroom,
)
from peft_personamux.evaluation.methods import codebook_tensors
from peft_personamux.loss import PLAIN, response_nll


def test_identity_codebook_maps_a_mixture_to_the_prompt_it_spells():
    codebook = identity_codebook(3, 4)  # (12, 3, 4)
    prompt = torch.randn(3, 4)
    mixed = torch.einsum("c,ckd->kd", prompt.flatten(), codebook)
    torch.testing.assert_close(mixed, prompt)


def test_free_prompts_reproduce_any_64_weight_prompt():
    base = make_model("llama")
    learned = get_peft_model(make_model("llama"), PersonaMuxConfig(**SMALL))
    learned.add_personas(
        ["a", "b", "c"], mixtures=torch.randn(3, SMALL["num_codes"], generator=torch.Generator().manual_seed(0))
    )
    free = free_prompt_model(base, learned, SMALL["tokens_per_code"])
    codebook, _ = codebook_tensors(learned)
    prompts = torch.einsum("pc,ckd->pkd", learned.base_model._layer.personamux_mixture["default"].detach(), codebook)
    free.add_personas(["a", "b", "c"], mixtures=prompts.flatten(1))  # the learned prompts, spelled out
    batch = batch_for(learned)
    expected, _ = response_nll(learned, batch, options=PLAIN)
    got, _ = response_nll(free, batch, options=PLAIN)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    nll, tokens = row_losses(free, batch, chunk_size=2)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == (batch["labels"][:, 1:] != -100).sum(-1).tolist()


def test_summary_capture_ratio_and_learned_over_random():
    personas = ["p", "q"]
    result = {"personas": personas}
    values = {"zero": (5.0, 6.0), "free8": (4.0, 5.0), "mix64": (4.5, 5.5), "random64": (4.9, 5.9)}
    for method, (p, q) in values.items():
        result[method] = {"train": {"p": p, "q": q}, "test": {"p": p + 0.1, "q": q + 0.1}}
    summary = summarize_headroom(result)["test"]
    assert summary["improvement"]["mix64"]["mean"] == pytest.approx(0.5)
    assert summary["capture_ratio_of_means"] == pytest.approx(0.5)
    assert summary["learned_over_random"] == pytest.approx(5.0)
    assert summary["capture_ratio_per_persona"]["mean"] == pytest.approx(0.5)
