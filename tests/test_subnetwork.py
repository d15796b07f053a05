"""Persona subnetworks on tiny random models: scores, statistics, weight and channel masks, files, mixed batches."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import make_model as make_arch
from tiny_models import make_rows, make_tokenizer, tiny_base

from peft_personamux import PersonaFileError, PersonaMuxConfig
from peft_personamux.subnetwork import (
    ActivationStatistics,
    ChannelMask,
    Statistic,
    SubnetworkBank,
    SubnetworkConfig,
    WeightMask,
    active_weight_mask,
    apply_weight_mask,
    calibrate_subnetwork,
    collect_statistics,
    combine,
    model_fingerprint,
    subnetwork_path,
)
from peft_personamux.subnetwork.scores import (
    column_scores,
    contrast_weight,
    contrast_z,
    contrastive_scores,
    group_scores,
    kept_count,
    row_topk_mask,
    topk_keep,
    wanda_scores,
)
from peft_personamux.subnetwork.statistics import decoder_linears

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return make_rows(personas=("play/a", "play/b", "play/c"), per_persona=6)


@pytest.fixture
def base(tokenizer):
    return tiny_base(tokenizer)


def channel_config(sparsity: float = 0.5, **kwargs) -> SubnetworkConfig:
    return SubnetworkConfig(**{"sparsity": sparsity, "granularity": "channel", "batch_size": 4, **kwargs})


# -- config ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0, 1, 1.0, -0.1, 1.5, True, "0.3", float("nan")])
def test_sparsity_outside_0_1_is_refused(sparsity):
    with pytest.raises(ValueError, match="`sparsity` must be strictly between 0 and 1"):
        SubnetworkConfig(sparsity=sparsity)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("granularity", "row", "`granularity` must be one of 'weight', 'channel'"),
        ("statistic", "mean_abs", "`statistic` must be one of"),
        ("calibration_format", "xml", "`calibration_format` must be one of"),
        ("contrast", "tanh", "`contrast` must be one of"),
        ("tau", 0.0, "`tau` must be positive"),
        ("max_length", 0, "`max_length` must be a positive integer"),
        ("batch_size", 2.5, "`batch_size` must be a positive integer"),
        ("max_samples", 0, "`max_samples` must be a positive integer or None"),
    ],
)
def test_config_errors_name_field_and_value(field, value, match):
    with pytest.raises(ValueError, match=match):
        SubnetworkConfig(**{field: value})


def test_config_serialises_enums_as_strings():
    meta = SubnetworkConfig(granularity="weight", statistic="sample_rms").to_metadata()
    assert meta["granularity"] == "weight" and meta["statistic"] == "sample_rms" and meta["sparsity"] == "0.3"


# -- scores (pure functions, values by hand) -------------------------------------------------------------------------


def test_wanda_scores_and_row_topk_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, 0.0, 2.0]])
    act = torch.tensor([1.0, 1.0, 0.1, 2.0])
    scores = wanda_scores(weight, act)
    assert torch.allclose(scores, torch.tensor([[1.0, 2.0, 0.3, 1.0], [4.0, 1.0, 0.0, 4.0]]))
    assert kept_count(4, 0.5) == 2 and kept_count(4, 0.3) == 2 and kept_count(10, 0.3) == 7 and kept_count(3, 0.9) == 1
    mask = row_topk_mask(scores, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]] or mask.tolist() == [
        [True, True, False, False],
        [True, False, False, True],
    ]  # row 0 ties 1.0 vs 1.0: either is top-2
    assert mask.sum(1).tolist() == [2, 2]
    with pytest.raises(ValueError, match="has 4 inputs"):
        wanda_scores(weight, torch.ones(3))


def test_channel_and_head_scores_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, 0.0, 2.0]])
    act = torch.tensor([1.0, 1.0, 0.1, 2.0])
    cols = column_scores(weight, act)
    assert torch.allclose(cols, torch.tensor([5.0, 3.0, 0.3, 5.0]))
    assert torch.allclose(group_scores(cols, 2), torch.tensor([8.0, 5.3]))
    assert topk_keep(cols, 0.5).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="equal heads"):
        group_scores(cols, 3)


def test_contrastive_score_by_hand_and_relu_ties_follow_the_plain_score():
    z = contrast_z(
        torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0])
    )
    assert torch.allclose(z, torch.tensor([1.0 / (4.0 + 1e-6) ** 0.5, 0.0]))
    relu = contrast_weight(torch.tensor([-1.0, 0.0, 2.0]), "relu", 2.0)
    assert relu.tolist() == [0.0, 0.0, 2.0]
    soft = contrast_weight(torch.tensor([0.0]), "softplus", 2.0)
    assert torch.allclose(soft, torch.log(torch.tensor([2.0])))
    weight = torch.ones(1, 4)
    plain = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    scores = contrastive_scores(weight, torch.tensor([0.0, 0.0, 0.0, 5.0]), plain)
    assert row_topk_mask(scores, 0.5).tolist() == [[False, True, False, True]]  # 5.0, then the best plain tie


# -- statistics ------------------------------------------------------------------------------------------------------


def manual_norms(model, tokenizer, texts, name, rms=False):
    """Per-sample channel norms of Linear ``name``, each sample run alone (no padding)."""
    module = dict(model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].float()))
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    handle.remove()
    norms = [x.pow(2).sum(0) / (x.shape[0] if rms else 1) for x in seen]
    return torch.stack([n.sqrt() for n in norms])  # (samples, in)


@pytest.mark.parametrize("statistic", ["sample_l2", "sample_rms"])
def test_statistics_match_per_sample_norms_and_ignore_padding(base, tokenizer, rows, statistic):
    persona_rows = [r for r in rows if r["persona"] == "play/a"]
    persona_rows[0] = {**persona_rows[0], "response": persona_rows[0]["response"] + " and the night is long"}
    config = channel_config(statistic=statistic, batch_size=3)
    stats = collect_statistics(base, tokenizer, persona_rows, config, **QUIET)
    assert stats.count == len(persona_rows) and stats.statistic == Statistic(statistic)
    assert set(stats.sums) == set(decoder_linears(base)) and "lm_head" not in stats.sums
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        a = manual_norms(base, tokenizer, [r["response"] for r in persona_rows], name, rms=statistic == "sample_rms")
        assert torch.allclose(stats.mean(name), a.mean(0), rtol=1e-4, atol=1e-5)
        assert torch.allclose(stats.var(name), a.var(0, unbiased=False), rtol=1e-3, atol=1e-5)


def test_pooled_statistics_add_samples(base, tokenizer, rows):
    config = channel_config()
    a = collect_statistics(base, tokenizer, [r for r in rows if r["persona"] == "play/a"], config, **QUIET)
    b = collect_statistics(base, tokenizer, [r for r in rows if r["persona"] == "play/b"], config, **QUIET)
    both = collect_statistics(base, tokenizer, [r for r in rows if r["persona"] != "play/c"], config, **QUIET)
    pooled = ActivationStatistics.pooled([a, b])
    name = "model.layers.0.mlp.up_proj"
    assert pooled.count == both.count == 12
    assert torch.allclose(pooled.mean(name), both.mean(name), atol=1e-5)
    assert torch.allclose(pooled.var(name), both.var(name), atol=1e-5)
    with pytest.raises(ValueError, match="different kinds"):
        ActivationStatistics.pooled([a, ActivationStatistics(Statistic.SAMPLE_RMS, a.sums, a.squares, 1)])


def test_chat_format_counts_only_response_tokens(base, tokenizer, rows):
    persona_rows = [r for r in rows if r["persona"] == "play/a"]
    lines = collect_statistics(base, tokenizer, persona_rows, channel_config(), **QUIET)
    chat = collect_statistics(base, tokenizer, persona_rows, channel_config(calibration_format="chat"), **QUIET)
    name = "model.layers.0.mlp.down_proj"
    assert chat.count == lines.count and not torch.allclose(chat.mean(name), lines.mean(name))


def test_calibrating_an_unknown_persona_or_empty_lines_says_so(base, tokenizer, rows):
    with pytest.raises(ValueError, match="No rows of persona 'no/body'"):
        calibrate_subnetwork(base, tokenizer, rows, "no/body", **QUIET)
    empty = [{"persona": "x/y", "prompt": "Hi", "response": "  "}]
    with pytest.raises(ValueError, match="only empty responses"):
        calibrate_subnetwork(base, tokenizer, empty, "x/y", **QUIET)
    with pytest.raises(ValueError, match="`sparsity` must be strictly between 0 and 1, got 1.2"):
        calibrate_subnetwork(base, tokenizer, rows, "play/a", sparsity=1.2, **QUIET)


# -- faithful weight masks -------------------------------------------------------------------------------------------


@pytest.fixture
def weight_masks(base, tokenizer, rows):
    config = SubnetworkConfig(granularity="weight", sparsity=0.5, batch_size=4)
    a = calibrate_subnetwork(base, tokenizer, rows, "play/a", config=config, **QUIET)
    b = calibrate_subnetwork(base, tokenizer, rows, "play/b", config=config, **QUIET)
    return a, b


def test_weight_mask_keeps_each_rows_top_half(base, weight_masks):
    a, _ = weight_masks
    linears = decoder_linears(base)
    assert set(a.masks) == set(linears)  # every decoder Linear, not the LM head
    for name, bits in a.masks.items():
        assert bits.dtype == torch.bool and bits.shape == linears[name].weight.shape
        assert (bits.sum(1) == kept_count(bits.shape[1], 0.5)).all()
    assert a.num_bits == sum(m.weight.numel() for m in linears.values()) and a.packed_bytes == -(-a.num_bits // 8)


def test_weight_mask_applies_and_switches_back_exactly(base, weight_masks, tokenizer):
    a, b = weight_masks
    ids = torch.tensor([tokenizer("To be, or not to be")["input_ids"]])
    originals = {
        n: (m.weight, m.weight.data.data_ptr(), m.weight.detach().clone()) for n, m in decoder_linears(base).items()
    }
    with torch.no_grad():
        dense = base(input_ids=ids).logits
        with apply_weight_mask(base, a):
            assert active_weight_mask(base) == "play/a"
            masked_a = base(input_ids=ids).logits
            w = decoder_linears(base)["model.layers.0.mlp.up_proj"].weight
            assert torch.equal(
                w == 0, ~a.masks["model.layers.0.mlp.up_proj"] | (originals["model.layers.0.mlp.up_proj"][2] == 0)
            )
        assert active_weight_mask(base) is None
        assert torch.equal(base(input_ids=ids).logits, dense)
        handle = apply_weight_mask(base, a)
        apply_weight_mask(base, b)  # switching restores a first
        assert not handle.active and active_weight_mask(base) == "play/b"
        masked_b = base(input_ids=ids).logits
        apply_weight_mask(base, b).restore()
        with apply_weight_mask(base, b):
            assert torch.equal(base(input_ids=ids).logits, masked_b)
    for name, module in decoder_linears(base).items():
        param, ptr, value = originals[name]
        assert module.weight is param and module.weight.data.data_ptr() == ptr and torch.equal(module.weight, value)
    assert not torch.allclose(masked_a, dense) and not torch.allclose(masked_a, masked_b)


def test_weight_mask_file_round_trip_and_errors(base, weight_masks, tokenizer, tmp_path):
    a, _ = weight_masks
    path = a.save(subnetwork_path(tmp_path, a.name, "weight"))
    assert path.endswith("subnetworks/play/a.weights.safetensors")
    assert a.packed_bytes <= os.path.getsize(path) <= a.packed_bytes + 8192
    loaded = WeightMask.load(path, base)
    assert loaded.name == "play/a" and all(torch.equal(loaded.masks[k], v) for k, v in a.masks.items())
    assert loaded.metadata["granularity"] == "weight" and loaded.metadata["sparsity"] == "0.5"
    other = tiny_base(tokenizer, seed=1)
    with pytest.raises(PersonaFileError, match="was calibrated on model"):
        WeightMask.load(path, other)
    with pytest.raises(PersonaFileError, match="was calibrated on model"):
        apply_weight_mask(other, a)
    wider = tiny_base(tokenizer, intermediate=96)
    with pytest.raises(PersonaFileError, match="mask shapes do not fit this model"):
        WeightMask.load(path, wider, strict=False)
    bad = WeightMask(a.name, {"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)}, a.fingerprint)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\)"):
        apply_weight_mask(base, bad)


# -- channel masks and the bank --------------------------------------------------------------------------------------


@pytest.fixture
def bank_and_masks(base, tokenizer, rows):
    masks = [
        calibrate_subnetwork(base, tokenizer, rows, p, config=channel_config(), **QUIET) for p in ("play/a", "play/b")
    ]
    bank = SubnetworkBank(base)
    for mask in masks:
        bank.add(mask)
    return bank, masks


def test_channel_mask_shapes_counts_and_size(base, bank_and_masks):
    _, (a, b) = bank_and_masks
    assert a.neurons.shape == (2, 64) and a.heads.shape == (2, 4)
    assert (a.neurons.sum(1) == 32).all() and (a.heads.sum(1) == 2).all()
    assert a.packed_bytes == 64 * 2 // 8 + 1 and a.num_bits == 136
    assert a.fingerprint == model_fingerprint(base)


def test_channel_hook_equals_zeroing_weight_columns(base, bank_and_masks, tokenizer):
    bank, (a, _) = bank_and_masks
    ids = torch.tensor([tokenizer("Now is the winter of our discontent")["input_ids"]])
    with torch.no_grad(), bank.apply("play/a"):
        hooked = base(input_ids=ids).logits
    layout = bank.layout
    with torch.no_grad():
        saved = [(m.weight.data, o.weight.data) for (_, m), (_, o) in zip(layout.down, layout.out)]
        for layer, ((_, down), (_, out)) in enumerate(zip(layout.down, layout.out)):
            down.weight.data = down.weight.data * a.neurons[layer].float()
            out.weight.data = out.weight.data * a.heads[layer].float().repeat_interleave(layout.head_dim)
        zeroed = base(input_ids=ids).logits
        for (_, down), (_, out), (dw, ow) in zip(layout.down, layout.out, saved):
            down.weight.data, out.weight.data = dw, ow
    assert torch.allclose(hooked, zeroed, atol=1e-5)


def test_hooks_live_only_for_one_call(base, bank_and_masks, tokenizer):
    bank, _ = bank_and_masks
    ids = torch.tensor([tokenizer("Good night, sweet prince")["input_ids"]])
    with torch.no_grad():
        dense = base(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="boom"), bank.apply("play/a"):
            assert all(m._forward_pre_hooks for _, m in bank.layout.down)
            raise RuntimeError("boom")
        assert not any(m._forward_pre_hooks for _, m in bank.layout.down + bank.layout.out)
        assert torch.equal(base(input_ids=ids).logits, dense)
        with bank.apply([None]):
            assert torch.equal(base(input_ids=ids).logits, dense)  # row 0 keeps every channel: exact


def _padded(tokenizer, texts, left: bool):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], att[i, span] = torch.tensor(r), 1
    return ids, att


TEXTS = ["To be, or not to be", "Good night, sweet prince. The rest", "Now is the winter"]


def test_mixed_batch_forward_equals_per_row(base, bank_and_masks, tokenizer):
    bank, _ = bank_and_masks
    personas = ["play/a", None, "play/b"]
    ids, att = _padded(tokenizer, TEXTS, left=False)
    with torch.no_grad(), bank.apply(personas):
        mixed = base(input_ids=ids, attention_mask=att).logits
    for i, persona in enumerate(personas):
        n = int(att[i].sum())
        with torch.no_grad(), bank.apply(persona):
            alone = base(input_ids=ids[i : i + 1, :n]).logits
        assert torch.allclose(mixed[i, :n], alone[0], atol=1e-5), persona


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}])
def test_mixed_batch_generate_with_kv_cache_equals_per_row(base, bank_and_masks, tokenizer, extra):
    bank, _ = bank_and_masks
    personas = ["play/b", "play/a", None]
    ids, att = _padded(tokenizer, TEXTS, left=True)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "use_cache": True, **extra}
    if not kwargs.get("do_sample"):
        kwargs["do_sample"] = False
    torch.manual_seed(0)
    with torch.no_grad(), bank.apply(personas):
        mixed = base.generate(input_ids=ids, attention_mask=att, **kwargs)
    repeat = kwargs.get("num_return_sequences", 1)
    assert mixed.shape[0] == len(personas) * repeat
    if kwargs["do_sample"]:
        return  # sampling draws differ between batch shapes; shapes and the hook's repeat are what is checked
    for i, persona in enumerate(personas):
        n = int(att[i].sum())
        with torch.no_grad(), bank.apply(persona):
            alone = base.generate(input_ids=ids[i : i + 1, -n:], **kwargs)
        assert torch.equal(mixed[i, -5:], alone[0, -5:]), persona
    with torch.no_grad():
        plain = base.generate(input_ids=ids, attention_mask=att, **kwargs)
    assert torch.equal(plain[2], mixed[2])  # the unmasked row is the base model's


def test_bank_errors(base, bank_and_masks, tokenizer):
    bank, (a, _) = bank_and_masks
    with pytest.raises(KeyError, match="no/body"):
        bank.rows(["no/body"])
    assert bank.rows(["no/body", "play/b"], strict=False).tolist() == [0, 2]
    with pytest.raises(ValueError, match="already has a channel mask"):
        bank.add(a)
    with pytest.raises(ValueError, match=r"Mask rows must be integers in \[0, 2\]"):
        bank.rows(torch.tensor([3]))
    wrong = ChannelMask(a.name, torch.ones(2, 10, dtype=torch.bool), a.heads, a.fingerprint)
    with pytest.raises(ValueError, match=r"has shape \(2, 10\)"):
        bank.add(wrong, exist_ok=True)
    alien = ChannelMask(a.name, a.neurons, a.heads, "0123456789abcdef")
    with pytest.raises(PersonaFileError, match="calibrated on model '0123456789abcdef'"):
        bank.add(alien, exist_ok=True)
    ids = torch.tensor([tokenizer("To be")["input_ids"]] * 3)
    with pytest.raises(ValueError, match="2 persona masks for a batch of 3 rows"), bank.apply(["play/a", "play/b"]):
        base(input_ids=ids)
    bank.remove("play/a")
    assert bank.personas == ["play/b"] and bank.index("play/b") == 1
    with pytest.raises(ValueError, match="no Llama-style"):
        SubnetworkBank(make_arch("gpt2"))


def test_channel_mask_file_round_trip_and_validation(base, bank_and_masks, tokenizer, tmp_path):
    _, (a, _) = bank_and_masks
    path = a.save(subnetwork_path(tmp_path, a.name))
    assert path.endswith("subnetworks/play/a.channels.safetensors") and os.path.getsize(path) < 4096
    bank = SubnetworkBank(base)
    assert bank.load(path) == "play/a"
    loaded = ChannelMask.load(path, base)
    assert torch.equal(loaded.neurons, a.neurons) and torch.equal(loaded.heads, a.heads)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["model_fingerprint"] == model_fingerprint(base) and meta["format_version"] == "1"
    assert set(meta) >= {"digest", "shapes", "name", "sparsity", "statistic", "granularity"}
    with pytest.raises(PersonaFileError, match="was calibrated on model"):
        SubnetworkBank(tiny_base(tokenizer, seed=3)).load(path)
    with pytest.raises(PersonaFileError, match="mask shapes do not fit"):
        ChannelMask.load(path, tiny_base(tokenizer, intermediate=96), strict=False)
    flipped = dict(tensors, neurons=tensors["neurons"] ^ 1)
    save_file(flipped, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(PersonaFileError, match="do not match the stored digest"):
        ChannelMask.load(tmp_path / "edited.safetensors", base)
    short = dict(tensors, neurons=tensors["neurons"][:-1])
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(PersonaFileError, match="packed uint8 bytes"):
        ChannelMask.load(tmp_path / "short.safetensors", base)
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**meta, "format": "something/else"})
    with pytest.raises(PersonaFileError, match="expected a 'peft-personamux/subnetwork-channels' file"):
        ChannelMask.load(tmp_path / "other.safetensors", base)
    with pytest.raises(PersonaFileError, match="not found"):
        ChannelMask.load(tmp_path / "nope.safetensors", base)
    with pytest.raises(PersonaFileError, match="expected a 'peft-personamux/subnetwork-weights' file"):
        WeightMask.load(path, base)


def test_contrastive_channel_masks_push_two_personas_apart(base, tokenizer, rows):
    config = channel_config(sparsity=0.5, contrast="relu")
    a = calibrate_subnetwork(base, tokenizer, rows, "play/a", config=channel_config(), **QUIET)
    b = calibrate_subnetwork(base, tokenizer, rows, "play/b", config=channel_config(), **QUIET)
    ca = calibrate_subnetwork(base, tokenizer, rows, "play/a", config=config, contrast="play/b", **QUIET)
    cb = calibrate_subnetwork(
        base, tokenizer, rows, "play/b", config=config, statistics=b.statistics, contrast=a.statistics, **QUIET
    )
    plain_overlap = int((a.neurons & b.neurons).sum())
    contrast_overlap = int((ca.neurons & cb.neurons).sum())
    assert ca.metadata["contrastive"] == "True" and contrast_overlap <= plain_overlap
    rest = calibrate_subnetwork(base, tokenizer, rows, "play/a", config=config, contrast=["play/b", "play/c"], **QUIET)
    assert (rest.neurons.sum(1) == 32).all()


# -- with a Persona-Mux soft prompt ----------------------------------------------------------------------------------


def test_persona_with_mixture_and_mask_in_one_mixed_batch(tokenizer, rows, tmp_path):
    model = get_peft_model(
        tiny_base(tokenizer),
        PersonaMuxConfig(task_type="CAUSAL_LM", num_codes=4, tokens_per_code=2, num_bias_tokens=2),
    )
    model.add_personas(["play/a", "play/b"], mixtures=torch.randn(2, 4))
    mask = calibrate_subnetwork(model, tokenizer, rows, "play/a", config=channel_config(), **QUIET)
    bank = SubnetworkBank(model)
    bank.add(mask)
    assert mask.fingerprint == model_fingerprint(model.get_base_model())
    ids, att = _padded(tokenizer, TEXTS[:2], left=True)
    personas = ["play/a", "play/b"]  # a: mixture + mask; b: mixture only
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        both = combine.generate(model, bank, personas, input_ids=ids, attention_mask=att, **kwargs)
        logits = combine.forward(model, bank, personas, input_ids=ids, attention_mask=att).logits
        mux_only = model(input_ids=ids, attention_mask=att, persona_ids=personas).logits
    assert torch.equal(logits[1], mux_only[1]) and not torch.allclose(logits[0], mux_only[0])
    for i, persona in enumerate(personas):
        n = int(att[i].sum())
        with torch.no_grad():
            alone = combine.generate(model, bank, persona, input_ids=ids[i : i + 1, -n:], **kwargs)
        assert torch.equal(both[i, -4:], alone[0, -4:])
    model.save_persona("play/a", tmp_path)
    mask.save(subnetwork_path(tmp_path, "play/a"))
    model.remove_persona("play/a")
    fresh = SubnetworkBank(model)
    assert combine.load_persona_parts(model, fresh, tmp_path, "play/a") == {"mixture": True, "mask": True}
    assert "play/a" in model.personas and fresh.personas == ["play/a"]
    with pytest.raises(FileNotFoundError, match="Neither"):
        combine.load_persona_parts(model, fresh, tmp_path, "play/zzz")
