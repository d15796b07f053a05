"""Headroom stage pieces: the identity codebook spans every prompt, summaries and the capture ratio."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import SMALL, batch_for, make_model

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
    prompts = torch.einsum("pc,ckd->pkd", learned.base_model.mixture_table("default").detach(), codebook)
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
    result["free8"]["test"] = {"p": 4.8, "q": 6.2}  # free-prompt gains +0.3 and -0.1: mean 0.1, its CI includes 0
    assert summarize_headroom(result)["test"]["capture_ratios"]["mix64"] is None


def test_gradient_capture_of_a_span_that_holds_the_gradient_and_of_one_orthogonal_to_it():
    from peft_personamux.evaluation.headroom import gradient_capture

    gradients = torch.zeros(3, 6)
    gradients[0, 0], gradients[1, 1], gradients[2, 0] = 1.0, 2.0, -3.0  # (personas, tokens * hidden)
    inside = torch.eye(6)[:2].reshape(2, 2, 3)  # spans coordinates 0 and 1
    outside = torch.eye(6)[2:4].reshape(2, 2, 3)
    full = gradient_capture(inside, gradients, ["a", "b", "c"])
    assert full["raw"]["per_persona"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert full["centred"]["mean"] == pytest.approx(1.0)  # the centred gradients stay in coordinates 0 and 1
    none = gradient_capture(outside, gradients, ["a", "b", "c"])
    assert none["raw"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_span_model_offset_code_starts_every_span_at_the_same_prompt():
    from peft_personamux.evaluation.headroom import span_model

    base = make_model("llama")
    learned = get_peft_model(make_model("llama"), PersonaMuxConfig(**SMALL))
    mixture = torch.randn(SMALL["num_codes"], generator=torch.Generator().manual_seed(0))
    learned.add_personas(["a", "b", "c"], mixtures=mixture.expand(3, -1).clone())  # the rows of batch_for
    codebook, _ = codebook_tensors(learned)
    prompt = torch.einsum("c,ckd->kd", learned.get_mixture("a").float(), codebook.detach().float())
    other = torch.randn_like(codebook.detach())
    spanned = span_model(base, learned, torch.cat([other, prompt[None]]))  # the random span + the start prompt
    start = torch.zeros(SMALL["num_codes"] + 1)
    start[-1] = 1.0
    spanned.add_personas(["a", "b", "c"], mixtures=start.expand(3, -1).clone())
    batch = batch_for(learned)
    expected, _ = response_nll(learned, batch, options=PLAIN)
    got, _ = response_nll(spanned, batch, options=PLAIN)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in spanned.parameters())


def test_pretraining_sample_takes_the_personas_with_most_lines():
    from peft_personamux.evaluation.headroom import pretraining_sample

    rows = [{"persona": p, "line": str(i)} for p, n in (("x", 3), ("y", 5), ("z", 1)) for i in range(n)]
    sample = pretraining_sample(rows, personas=2, lines=2)
    assert [(r["persona"], r["line"]) for r in sample] == [("x", "0"), ("x", "1"), ("y", "0"), ("y", "1")]
