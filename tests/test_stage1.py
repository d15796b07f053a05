"""Stage 1 beyond the paper: grouped batches, mixture learning rate, gradient codebook, identity diagnostic."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from datasets import Dataset
from tiny_models import QUIET, codebook_args, make_rows, make_tokenizer
from tiny_models import make_mux_model as make_model

from peft_personamux.codebook_init import codebook_from_gradients
from peft_personamux.diagnostics import derangement
from peft_personamux.sampling import PersonaBatchSampler
from peft_personamux.training import CodebookTrainingArguments, pretrain_codebook, split_identity_lines

PERSONAS = ("play/a", "play/b", "play/c", "play/d")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def batches_of(sampler: PersonaBatchSampler) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


def test_persona_batches_hold_few_personas_and_every_row_once():
    names = [p for p in PERSONAS for _ in range(8)]
    sampler = PersonaBatchSampler(names, batch_size=4, personas_per_batch=2, seed=3)
    batches = batches_of(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(names)))
    assert all(len({names[i] for i in b}) <= 2 for b in batches)
    sampler.set_epoch(1)
    assert batches_of(sampler) != batches  # another epoch, another order
    sampler.set_epoch(0)
    assert batches_of(sampler) == batches  # a resumed epoch replays its order


def test_length_grouping_cuts_padding():
    lengths = [1, 100] * 16
    names = ["p"] * 32
    grouped = batches_of(PersonaBatchSampler(names, 4, lengths=lengths, seed=0))
    padded = sum(4 * max(lengths[i] for i in b) for b in grouped)
    assert padded < 0.6 * sum(4 * 100 for _ in grouped)  # random batches of 1s and 100s almost always pad to 100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 4, "personas_per_batch": 5}, "personas_per_batch"),
        ({"batch_size": 4, "lengths": [1]}, "lengths"),
    ],
)
def test_sampler_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PersonaBatchSampler(["a", "b"], **kwargs)


def test_gradient_codebook_spans_the_top_directions():
    torch.manual_seed(0)
    direction = torch.randn(3, 8)
    gradients = {i: (i - 2.5) * direction + 0.01 * torch.randn(3, 8) for i in range(6)}
    codebook, explained = codebook_from_gradients(gradients, num_codes=4, code_norm=2.0)
    assert codebook.shape == (4, 3, 8)
    flat = codebook.flatten(1)
    torch.testing.assert_close(flat.norm(dim=1), torch.full((4,), 2.0))  # equal-norm codes
    torch.testing.assert_close(flat @ flat.T / 4.0, torch.eye(4), atol=1e-5, rtol=0)  # orthogonal
    cosine = (flat[0] @ direction.flatten()).abs() / (2.0 * direction.norm())
    assert cosine > 0.99 and explained > 0.99


def test_whitened_gradient_codebook_scales_codes_by_inverse_singular_values():
    torch.manual_seed(0)
    steep, flat_dir = torch.randn(24), torch.randn(24)
    flat_dir -= (flat_dir @ steep) / (steep @ steep) * steep  # orthogonal to ``steep``
    # persona gradients vary 10x more along ``steep``: its code should come out 10x shorter
    gradients = {
        i: (10 * (i % 2 - 0.5) * steep / steep.norm() + (i // 2 - 0.5) * flat_dir / flat_dir.norm()).reshape(3, 8)
        for i in range(4)
    }
    equal, _ = codebook_from_gradients(gradients, num_codes=3, code_norm=2.0, seed=0)
    whitened, explained = codebook_from_gradients(gradients, num_codes=3, code_norm=2.0, seed=0, scale="whiten")
    norms = whitened.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms.mean(), torch.tensor(2.0))
    torch.testing.assert_close(norms[1] / norms[0], torch.tensor(10.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(norms[2], norms[1])  # the random remainder code gets the flattest direction's norm
    # the same directions as the equal-norm codebook, only rescaled
    cosine = torch.nn.functional.cosine_similarity(whitened.flatten(1), equal.flatten(1), dim=1)
    torch.testing.assert_close(cosine, torch.ones(3))
    assert explained > 0.99
    with pytest.raises(ValueError, match="scale"):
        codebook_from_gradients(gradients, num_codes=3, code_norm=2.0, scale="unit")


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10):
        perm = derangement(n, seed=n)
        assert sorted(perm.tolist()) == list(range(n)) and bool((perm != torch.arange(n)).all())
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_split_identity_lines_holds_out_the_last_lines():
    rows = make_rows(PERSONAS, per_persona=7)
    train, held = split_identity_lines(Dataset.from_list(rows), lines=2, personas=3)
    assert len(train) + len(held) == len(rows)
    assert set(Counter(held["persona"]).values()) == {2} and len(set(held["persona"])) == 3
    with pytest.raises(ValueError, match="identity diagnostic"):
        split_identity_lines(Dataset.from_list(make_rows(PERSONAS, per_persona=3)), lines=2, personas=3)


@pytest.mark.parametrize("scale", ["equal", "whiten"])
def test_pretraining_with_every_stage1_option_logs_the_diagnostic(tmp_path, tokenizer, scale):
    model = make_model(tokenizer)
    data = Dataset.from_list(make_rows(PERSONAS, per_persona=8))
    args = codebook_args(
        tmp_path,
        num_train_epochs=2,
        warmup_epochs=1,
        mixture_learning_rate=0.3,
        personas_per_batch=2,
        length_grouped=True,
        gradient_codebook=True,
        gradient_codebook_lines=3,
        gradient_codebook_scale=scale,
        identity_every=2,
        identity_lines=2,
    )
    trainer = pretrain_codebook(model, tokenizer, data, args)
    history = trainer.state.log_history
    identity = [e for e in history if "identity_gap" in e]
    assert identity and all(e["identity_shuffled_loss"] > 0 for e in identity)
    init = [e for e in history if "gradient_codebook_explained" in e]
    assert len(init) == 1 and 0 < init[0]["gradient_codebook_explained"] <= 1
    assert init[0]["gradient_codebook_passes"] == 3 * len(PERSONAS)
    lrs = sorted(g["initial_lr"] for g in trainer.optimizer.param_groups)  # before the schedule decays them
    assert len(lrs) == 2 and lrs[1] / lrs[0] == pytest.approx(0.3 / 3e-2)  # the mixture group's own rate
    logged = [json.loads(line) for line in (tmp_path / "identity_log.jsonl").read_text().splitlines()]
    assert len(logged) == len(identity)
    assert len(model.personas) == len(PERSONAS)


def test_stage1_argument_validation(tmp_path):
    for kwargs, match in [
        ({"mixture_learning_rate": 0.0}, "mixture_learning_rate"),
        ({"personas_per_batch": 0}, "personas_per_batch"),
        ({"autocast": "fp8"}, "autocast"),
        ({"identity_every": -1}, "identity_every"),
        ({"gradient_codebook_lines": 0}, "gradient_codebook_lines"),
        ({"gradient_codebook_scale": "unit"}, "gradient_codebook_scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            CodebookTrainingArguments(output_dir=str(tmp_path), **QUIET, **kwargs)
