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


def headroom_inputs(tmp_path):
    """A tiny base model, its tokenizer and codebook folder, 2 unseen personas and their train / held-out rows."""
    from tiny_models import make_codebook, make_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, codebook_dir = make_codebook(tmp_path)
    personas = ["new/a", "new/b"]
    rows = make_rows(personas, per_persona=6)
    train = [r for i, r in enumerate(rows) if i % 6 < 4]
    test = [r for i, r in enumerate(rows) if i % 6 >= 4]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return base, AutoTokenizer.from_pretrained(model_dir), codebook_dir, personas, train, test


@pytest.mark.parametrize(
    "interrupt_at, refits",
    [
        # saves: zero, mean64, capture, mix64_zero (a, b, done), mix64 a | refit: mix64 b, random64, grad64, free8
        (7, 7),
        # ... mix64 (b, done), identification, random64 (a, b, done), identification_random64, grad64 a
        # | refit: grad64 b, free8 (a, b)
        (15, 3),
    ],
)
def test_headroom_run_continues_where_an_interrupted_one_stopped(tmp_path, monkeypatch, interrupt_at, refits):
    """Every save() holds what is done; a run given the last one fits only what is missing and ends with the same
    numbers (the grad64 codebook, rebuilt on resume, is the same span)."""
    import json

    from tiny_models import make_rows

    import peft_personamux.fitting as fitting
    from peft_personamux.evaluation.headroom import HeadroomSettings, run_headroom

    base, tokenizer, codebook_dir, personas, train, test = headroom_inputs(tmp_path)
    pretrain = make_rows(("play/p0", "play/p1"), per_persona=3)
    settings = HeadroomSettings(steps=2, chunk_size=4, gradient_personas=2, gradient_lines=3, zero_start=True)

    def run(**kwargs) -> dict:
        return run_headroom(
            base, tokenizer, codebook_dir, personas, train, test, {}, settings, pretrain_rows=pretrain, **kwargs
        )

    full = run()
    saves: list[dict] = []

    class Interrupted(Exception):
        pass

    def save(partial: dict) -> None:
        saves.append(json.loads(json.dumps(partial)))  # as the stage cache stores it
        if len(saves) == interrupt_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(save=save)
    calls = []
    real_fit = fitting.fit_mixtures
    monkeypatch.setattr(fitting, "fit_mixtures", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    resumed = run(partial=saves[-1])
    assert len(calls) == refits  # nothing done is fitted again
    for method in ("zero", "mean64", "mix64_zero", "mix64", "random64", "grad64", "free8"):
        assert resumed[method]["test"] == pytest.approx(full[method]["test"], abs=1e-6), method
    for key in ("identification", "identification_random64", "identification_grad64", "identification_free8"):
        flat = [v for row in resumed[key]["loss_matrix"] for v in row]
        assert flat == pytest.approx([v for row in full[key]["loss_matrix"] for v in row], abs=1e-6), key
    assert "mixtures" not in resumed["free8"] and not any(k.endswith("_in_progress") for k in resumed)


def test_free_prompt_is_fitted_in_float32_whatever_the_fits_autocast(tmp_path, monkeypatch):
    """bf16 loss noise stalls L-BFGS over 4,608 numbers: free8 drops the autocast, the 64-weight fits keep it."""
    import peft_personamux.fitting as fitting
    from peft_personamux.evaluation.headroom import HeadroomSettings, run_headroom
    from peft_personamux.loss import LossOptions

    base, tokenizer, codebook_dir, personas, train, test = headroom_inputs(tmp_path)
    bf16 = LossOptions(autocast_dtype=torch.bfloat16)
    settings = HeadroomSettings(
        steps=1, chunk_size=4, zero_start=False, identify_all=False, gradient_capture=False, fit_options=bf16
    )
    seen = []
    real_fit = fitting.fit_mixtures
    monkeypatch.setattr(
        fitting, "fit_mixtures", lambda model, *a, **k: seen.append((model, k["options"])) or real_fit(model, *a, **k)
    )
    run_headroom(base, tokenizer, codebook_dir, personas, train, test, {}, settings)
    dtypes = [options.autocast_dtype for _, options in seen]
    assert dtypes == [torch.bfloat16] * 4 + [None] * 2  # mix64, random64 for 2 personas each, then free8


def test_an_unfinished_headroom_stage_is_summarised_and_written(tmp_path):
    from peft_personamux.evaluation.headroom_report import write_headroom_outputs

    personas = ["p/a", "p/b", "p/c"]

    def row(train, test, curves=False):
        out = {"train": dict(zip(personas, train)), "test": dict(zip(personas, test))}
        return out | ({"curves": {p: [t + 0.1, t] for p, t in zip(personas, train)}} if curves else {})

    partial = {  # as stages/headroom.json holds it while random64 is being fitted
        "done": False,
        "personas": personas,
        "train_lines": 30,
        "test_lines": 9,
        "zero": row([4.0, 4.2, 4.4], [4.1, 4.3, 4.5]),
        "mean64": row([3.9, 4.1, 4.3], [4.0, 4.2, 4.4]),
        "mix64": row([3.7, 3.9, 4.1], [3.9, 4.1, 4.3], curves=True),
        "random64_in_progress": {"curves": {"p/a": [3.9, 3.8]}, "mixtures": {"p/a": [0.0]}},
        "identification": {"loss_matrix": [[1, 2, 3], [2, 1, 3], [3, 2, 1]], "accuracy": 1.0, "chance": 1 / 3},
    }
    out = write_headroom_outputs(partial, tmp_path, "test")
    gain = out["summary"]["test"]["gain_over_start"]["mix64"]
    assert gain["mean"] == pytest.approx(0.1) and gain["n"] == 3
    assert out["summary"]["test"]["capture_ratio_of_means"] is None  # no free8 yet: no ratio
    assert out["summary"]["test"]["learned_over_random"] is None
    text = (tmp_path / "headroom.md").read_text()
    assert "Partial" in text and "random64 (1)" in text and "| p/a | 4.100 | 4.000 | 3.900 |" in text
    assert (tmp_path / "headroom_curves.png").is_file() and (tmp_path / "identification.png").is_file()


def test_headroom_contrast_codebook_and_quadratic_predictions(tmp_path):
    """grad64 from the contrast codebook; every span's predicted converged gain, none above the free prompt's."""
    from tiny_models import make_rows

    from peft_personamux.contrast import DAMPING_FACTORS
    from peft_personamux.evaluation.headroom import HeadroomSettings, run_headroom

    base, tokenizer, codebook_dir, personas, train, test = headroom_inputs(tmp_path)
    pretrain = make_rows(("play/p0", "play/p1", "play/p2"), per_persona=4)
    settings = HeadroomSettings(
        steps=1, chunk_size=4, gradient_personas=3, gradient_lines=4, zero_start=False, identify_all=False,
        gradient_codebook="contrast", gradient_scale="whiten", quadratic=True,
    )  # fmt: skip
    result = run_headroom(base, tokenizer, codebook_dir, personas, train, test, {}, settings, pretrain_rows=pretrain)
    assert result["grad64_codebook"]["method"] == "contrast" and result["quadratic"]["grad64"] == "contrast64"
    predicted = result["quadratic"]
    for span in ("mix64", "random64", "pca64", "contrast64"):
        for name in personas:
            train_gain = predicted[span]["train"]["per_persona"][name]
            assert 0 <= train_gain <= predicted["free8"]["train"]["per_persona"][name] + 1e-9, (span, name)
    assert "grad64" in result["summary"]["test"]["gain_over_start"]
    # damped by cross-validation on each persona's own 4 training lines (4 folds)
    assert predicted["folds"] == 4 and set(predicted["capture_damped"]) == {"mix64", "random64", "pca64", "contrast64"}
    for span in ("mix64", "free8"):
        damped = predicted[span]["damped"]
        assert set(damped["per_persona"]) == set(personas)
        assert all(f in DAMPING_FACTORS for f in damped["damping_over_mean_eigenvalue"].values())
    ratio = predicted["mix64"]["damped"]["mean"] / predicted["free8"]["damped"]["mean"]
    assert predicted["capture_damped"]["mix64"] == pytest.approx(ratio)
    from peft_personamux.evaluation.headroom_report import write_headroom_outputs

    write_headroom_outputs(result, tmp_path, "test")
    text = (tmp_path / "headroom.md").read_text()
    assert "| contrast64 (fitted as grad64) |" in text and "the contrast codebook" in text
    assert "4-fold cross-validation" in text and f"mix64 {ratio:.2f}" in text
