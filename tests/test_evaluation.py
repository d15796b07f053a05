"""Evaluation harness: metric functions, the judge's scoring, prompt formats, config files, and (slow) the quick
config end to end on tiny random models and synthetic personas."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter

import pytest
import torch
from tiny_models import make_model, right_padded

from peft_personamux.evaluation import (
    EvalConfig,
    Judge,
    WhoSaidIt,
    discrimination_context,
    discrimination_trial,
    generated_is_caught,
    load_config,
    pick_fake,
    run_evaluation,
    summarize,
)
from peft_personamux.evaluation.command import main, parse_args
from peft_personamux.evaluation.config import config_dir, read_config_file
from peft_personamux.evaluation.loading import load_causal_lm, save_tiny_model
from peft_personamux.evaluation.methods import (
    SoftPrompts,
    encode_rows,
    keeps_logits,
    persona_losses,
    plain_format,
    random_codebook_like,
    row_nll,
)
from peft_personamux.evaluation.metrics import gain_ratio, identification_summary, paired_difference
from peft_personamux.evaluation.report import ratio_cell
from peft_personamux.inputs import PERSONA_PLACEHOLDER
from peft_personamux.loss import token_nll
from peft_personamux.prompting import DEFAULT_INSTRUCTION

COMMON = "the a and of to in that it is was for on with as his be at by i you my".split()


def synthetic_rows(groups: int = 6, per_group: int = 2, lines: int = 22, seed: int = 0) -> list[dict[str, str]]:
    """Personas ``g<i>/p<k>`` whose lines mix common words with six words of their own (so style is learnable)."""
    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        for k in range(per_group):
            own = [f"{w}{g}{k}" for w in ("zor", "mel", "tak", "quin", "bra", "flo")]
            for _ in range(lines):
                words = [rng.choice(own if rng.random() < 0.4 else COMMON) for _ in range(rng.randint(5, 9))]
                prompt = " ".join(rng.choice(COMMON) for _ in range(rng.randint(4, 7))) + "?"
                rows.append(
                    {"persona": f"g{g}/p{k}", "prompt": prompt, "response": " ".join(words) + ".", "group": f"g{g}"}
                )
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and its tokenizer, trained on the synthetic lines."""
    texts = [DEFAULT_INSTRUCTION] + [r["prompt"] + " " + r["response"] for r in synthetic_rows()]
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", texts, "llama")
    return load_causal_lm(str(path))


# -- spread over personas ------------------------------------------------------------------------------------------


def test_summarize_gives_student_t_interval():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(1.2909944)
    assert s["ci95"] == pytest.approx(3.1824463 * 1.2909944 / 2)  # t(0.975, df=3) * std / sqrt(n)
    assert s["ci_low"] == pytest.approx(2.5 - s["ci95"]) and s["ci_high"] == pytest.approx(2.5 + s["ci95"])


@pytest.mark.parametrize("values, n", [([], 0), ([float("nan"), None], 0), ([2.0], 1), ([2.0, float("nan"), 4.0], 2)])
def test_summarize_leaves_out_missing_values_and_never_invents_a_spread(values, n):
    s = summarize(values)
    assert s["n"] == n
    if n < 2:
        assert s["std"] is None and s["ci95"] is None
    if n == 0:
        assert s["mean"] is None
    json.dumps(s, allow_nan=False)  # results.json stays strict JSON


# -- discrimination --------------------------------------------------------------------------------------------------


def test_pick_fake_takes_the_least_likely_candidate():
    assert pick_fake([1.0, 3.0, 2.0]) == 1
    assert pick_fake([1.0, float("nan"), 5.0]) == 1  # no tokens at all: most suspicious
    assert pick_fake([2.0, 2.0]) == 0  # ties go to the first
    assert generated_is_caught([1.0, 1.5, 2.0], 2.5)
    assert not generated_is_caught([1.0, 1.5, 2.0], 2.0)  # a tie is not a catch
    assert generated_is_caught([1.0, 1.5, 2.0], float("nan"))  # an empty generation is always caught
    with pytest.raises(ValueError, match="at least one"):
        pick_fake([])


def toy_judge(context: str, candidates) -> list[float]:
    """Character unigram model of the context, add-one smoothed: mean NLL per character of each candidate."""
    counts = Counter(context.lower())
    total, vocab = sum(counts.values()), 64
    return [
        sum(-math.log((counts[ch] + 1) / (total + vocab)) for ch in c.lower()) / max(len(c), 1) for c in candidates
    ]


def test_discrimination_catches_an_odd_line_on_a_toy_judge():
    context = ["to be or not to be", "the rest is silence", "good night sweet prince"]
    real = ["to sleep perchance to dream", "the readiness is all", "alas poor yorick"]
    assert discrimination_trial(toy_judge, context, real, "qzxj vkqz wxqj")  # nothing like the persona
    assert not discrimination_trial(toy_judge, context, real, "to be or not to be that is the rest")
    assert discrimination_context(context).startswith("Lines spoken by one character:\n- to be or not to be\n")


# -- who said it -----------------------------------------------------------------------------------------------------


def test_who_said_it_learns_personas_from_their_lines():
    rows = synthetic_rows(groups=2, per_group=2, lines=30)
    train = [r for i, r in enumerate(rows) if i % 3]
    test = [r for i, r in enumerate(rows) if not i % 3]
    clf = WhoSaidIt().fit([r["response"] for r in train], [r["persona"] for r in train])
    accuracy = clf.accuracy_per_label([r["response"] for r in test], [r["persona"] for r in test])
    assert set(accuracy) == {"g0/p0", "g0/p1", "g1/p0", "g1/p1"}
    assert min(accuracy.values()) >= 0.7
    assert clf.predict(["", "zor10 mel10 tak10"])[1] == "g1/p0"  # empty text is allowed
    with pytest.raises(ValueError, match="at least 2 personas"):
        WhoSaidIt().fit(["a", "b"], ["x", "x"])


# -- judge and losses on a tiny model ---------------------------------------------------------------------------------


def test_judge_scores_match_an_unpadded_forward(tiny):
    model, tokenizer = tiny
    judge = Judge(model, tokenizer, batch_size=3)
    pairs = [("Lines:\n- zor00 mel00\n- ", "tak00 the of."), ("A", "the a and of to in that it is"), ("Q\n", "")]
    scores = judge.continuation_nll(pairs)
    assert math.isnan(scores[2])  # empty target
    for (context, target), score in zip(pairs[:2], scores):
        ctx = tokenizer(context)["input_ids"]
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + tgt])).logits[0]
        expected = torch.nn.functional.cross_entropy(logits[len(ctx) - 1 : -1], torch.tensor(tgt))
        assert score == pytest.approx(float(expected), abs=1e-4)


def test_plain_and_soft_prompt_losses_match_the_models_own_loss(tiny):
    model, tokenizer = tiny
    config = EvalConfig(num_train=8, sp_steps=2)
    rows = [r for r in synthetic_rows() if r["persona"] == "g0/p0"][:3]
    formats = {"g0/p0": plain_format(config.instruction, "A terse soldier.")}
    placeholder = model.config.vocab_size - 1
    batch = encode_rows(tokenizer, rows, formats, placeholder, config)
    with torch.no_grad():
        expected = model(**batch).loss  # mean over response tokens of the batch
    assert persona_losses(model, tokenizer, rows, formats, placeholder, config)["g0/p0"] == pytest.approx(
        float(expected), abs=1e-5
    )
    prompts = SoftPrompts(model, config)
    prompts.reset(0)
    with torch.no_grad():
        expected = prompts.model(**batch).loss  # peft prepends the virtual tokens and masks their labels
    got = persona_losses(prompts.model, tokenizer, rows, formats, placeholder, config, prompts.num_virtual_tokens)
    assert got["g0/p0"] == pytest.approx(float(expected), abs=1e-5)
    curve = prompts.fit(batch, seed=0)
    assert len(curve) == 2 and curve[0] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_row_nll_keeps_only_label_logits_with_the_same_numbers(arch):
    model = make_model(arch)
    rows = [[1, 5, 6, 7, 8, 9, 10, 2], [1, 11, 12, 13, 2], [1, 14, 15, 16, 17, 18, 2]]  # responses end each row
    labels = [[-100] * 5 + [9, 10, 2], [-100, -100, 12, 13, 2], [-100] * 4 + [17, 18, 2]]
    batch = right_padded(rows, labels, [0, 0, 0])
    prompts = SoftPrompts(model, EvalConfig(sp_num_virtual_tokens=3))
    prompts.reset(0)
    for net, prefix in ((model, 0), (prompts.model, prompts.num_virtual_tokens)):
        with torch.no_grad():
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, prefix:]
        expected = token_nll(logits, batch["labels"]).sum(-1)  # every position through the head
        assert keeps_logits(net)  # the shortcut is what is tested
        nll, tokens = row_nll(net, batch, prefix)
        assert tokens.tolist() == [3, 3, 3]
        torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    nll.sum().backward()  # SP training: the gradient reaches the prompt through the kept positions
    assert prompts.embedding.weight.grad.abs().sum() > 0


def test_prompt_formats():
    plain = plain_format("Roleplay.", "A sad prince.", ["Alas.", "To be."])
    assert plain.text_persona is None and PERSONA_PLACEHOLDER not in plain.instruction
    assert not plain.truncate and plain_format("Roleplay.", None).truncate  # ICL prompts are not cut
    assert plain.instruction == "A sad prince. Roleplay.\n\nExample lines of this character:\n- Alas.\n- To be."
    assert plain_format("Roleplay.", None).instruction == "Roleplay."


def test_random_codebook_keeps_shape_and_code_norms():
    codebook = torch.randn(5, 3, 8) * torch.arange(1, 6).float()[:, None, None]
    noise = random_codebook_like(codebook, seed=1)
    assert noise.shape == codebook.shape
    torch.testing.assert_close(noise.flatten(1).norm(dim=1), codebook.flatten(1).norm(dim=1))
    assert not torch.allclose(noise, codebook)
    torch.testing.assert_close(noise, random_codebook_like(codebook, seed=1))


# -- configs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eval_quick.json", "eval_full.json"])
def test_shipped_configs_are_valid(name):
    config = load_config(config_dir() / name)
    assert config.bias_scales == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_train", 0, "`num_train` must be a positive integer"),
        ("num_train", 5, "`num_train` .* must be at least"),
        ("pretrain_fraction", 1.0, "`pretrain_fraction`"),
        ("bias_scales", [0.5], "`bias_scales`"),
        ("random_codebook_method", "sgd", "`random_codebook_method`"),
        ("text_personas", "sometimes", "`text_personas`"),
        ("sp_init", "TEXT", "`sp_init`"),
        ("codebook_warmup_epochs", 5.0, "`codebook_epochs`"),
        ("fit_lr", 0.0, "`fit_lr` must be positive"),
        ("num_unseen_personas", 0, "`num_unseen_personas`"),
        ("subnetwork_sparsities", [0.0], "`subnetwork_sparsities` must hold numbers strictly between 0 and 1"),
        ("subnetwork_sparsities", [0.3, 0.3], "`subnetwork_sparsities` has duplicates"),
        ("subnetwork_sparsities", 0.3, "`subnetwork_sparsities` must be a list"),
        ("subnetwork_statistic", "l1", "`subnetwork_statistic`"),
        ("fit_autocast", "fp16", "`fit_autocast` must be 'auto', 'bf16' or 'no'"),
        ("headroom_gradient_scale", "unit", "`headroom_gradient_scale` must be one of"),
        ("headroom_gradient_codebook", "lda", "`headroom_gradient_codebook` must be one of"),
        ("headroom_quadratic", True, "`headroom_quadratic` needs `headroom_gradient_personas` > 0"),
        ("data_efficiency_fits", ["adam"], "`data_efficiency_fits` must be a list of distinct names from"),
        ("data_efficiency_fits", ["lbfgs", "lbfgs"], "`data_efficiency_fits` must be a list of distinct names"),
        ("data_efficiency_fits", "fisher", "`data_efficiency_fits` must be a list"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**{field: value})


def test_data_efficiency_fits_keep_older_fingerprints():
    assert EvalConfig(data_efficiency_fits=["fisher"]).fingerprint() == EvalConfig().fingerprint()
    assert EvalConfig(data_efficiency_fits=["lbfgs", "random"]).fingerprint() != EvalConfig().fingerprint()
    with pytest.raises(ValueError, match="`lbfgs_steps` is 0"):
        EvalConfig(data_efficiency_fits=["lbfgs"], lbfgs_steps=0)


def test_fit_autocast_keeps_older_fingerprints_and_reaches_the_fits():
    from peft_personamux.evaluation.headroom import HeadroomSettings

    assert EvalConfig(fit_autocast="no").fingerprint() == EvalConfig().fingerprint()
    assert EvalConfig(fit_autocast="bf16").fingerprint() != EvalConfig().fingerprint()  # fits change: a new run
    options = HeadroomSettings.from_config(EvalConfig(fit_autocast="bf16"), "cpu").fit_options
    assert options.autocast_dtype is torch.bfloat16 and options.attention == "eager"
    assert HeadroomSettings.from_config(EvalConfig(), "cpu").fit_options.autocast_dtype is None


@pytest.mark.parametrize(
    "field, before, after, setting",
    [
        ("headroom_gradient_scale", "equal", "whiten", "gradient_scale"),
        ("headroom_gradient_codebook", "pca", "contrast", "gradient_codebook"),
        ("headroom_quadratic", False, True, "quadratic"),
    ],
)
def test_added_headroom_fields_keep_older_fingerprints_and_reach_the_settings(field, before, after, setting):
    from peft_personamux.evaluation.headroom import HeadroomSettings

    grad = {"headroom_gradient_personas": 8}  # the quadratic model's curvature needs pretraining lines
    assert EvalConfig(**grad, **{field: before}).fingerprint() == EvalConfig(**grad).fingerprint()
    assert EvalConfig(**grad, **{field: after}).fingerprint() != EvalConfig(**grad).fingerprint()
    assert getattr(HeadroomSettings.from_config(EvalConfig(**grad, **{field: after}), "cpu"), setting) == after


def test_config_files_reject_unknown_fields_and_allow_comments(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "ignored", "num_train": 7}))
    assert read_config_file(path) == {"num_train": 7}
    path.write_text(json.dumps({"num_trian": 7}))
    with pytest.raises(ValueError, match="unknown fields \\['num_trian'\\]"):
        read_config_file(path)


def test_command_line_overrides_the_config_file():
    config, run = parse_args(["--quick", "--num_train", "20", "--bias_scales", "1.0", "0.0", "--overwrite"])
    quick = load_config(config_dir() / "eval_quick.json")
    assert config.num_train == 20 and config.bias_scales == [1.0, 0.0] and run.overwrite
    assert config.model_name_or_path == quick.model_name_or_path == "tiny-random-llama"
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--config", "x.json"])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{f.name}" in out for f in dataclasses.fields(EvalConfig))


# -- end to end ------------------------------------------------------------------------------------------------------

METHOD_ROWS = [
    "base",
    "icl",
    "lora",
    "sp",
    "personamux_adam_bias1",
    "personamux_adam_bias0.5",
    "personamux_adam_bias0",
    "personamux_fisher_bias1",
    "personamux_fisher_bias0.5",
    "personamux_fisher_bias0",
    "personamux_lbfgs_bias1",
    "personamux_lbfgs_bias0.5",
    "personamux_lbfgs_bias0",
    "random_codebook",
    *(f"{v}@{s}" for s in ("0.1", "0.3") for v in ("weight_mask", "channel_mask", "channel_mask+soft_prompt")),
    "reference",
]


def test_subnetwork_identification_summary_by_hand():
    matrix = [[1.0, 2.0, 4.0], [3.0, 2.5, 1.5], [2.0, 3.0, 1.0]]  # row i: persona i's lines under each mask
    out = identification_summary(matrix, ["a", "b", "c"])
    assert out["predicted"] == ["a", "c", "c"]
    assert out["accuracy"] == pytest.approx(2 / 3) and out["chance"] == pytest.approx(1 / 3)
    assert out["own_mask_advantage"] == pytest.approx([2.0, -0.25, 1.5])  # (2+4)/2-1, (3+1.5)/2-2.5, (2+3)/2-1
    assert identification_summary([[3.0]], ["a"])["own_mask_advantage"] == [None]  # nobody to compare with


def test_paired_difference_and_gain_ratio_by_hand():
    personas = ["a", "b", "c", "d"]
    fit = {"a": 1.0, "b": 2.0, "c": 3.0, "d": None}  # d has no score: left out of every pair
    ref = {"a": 1.5, "b": 2.5, "c": 2.0, "d": 4.0}
    out = paired_difference(fit, ref, personas)
    assert out["n"] == 3 and out["lower"] == 2 and out["mean"] == pytest.approx((-0.5 - 0.5 + 1.0) / 3)
    assert out["ci95"] is not None and out["ci_low"] < out["mean"] < out["ci_high"]
    zero = {"a": 2.0, "b": 3.0, "c": 4.0, "d": 5.0}
    random = {"a": 1.9, "b": 2.9, "c": 3.6, "d": 4.0}  # gains 0.1, 0.1, 0.4 where fit has a score
    ratio = gain_ratio(zero, fit, random, personas)
    assert ratio["ratio"] == pytest.approx(1.0 / 0.2) and ratio["n"] == 3  # mean gains 1.0 and 0.2
    assert ratio["ci_low"] <= ratio["ratio"] <= ratio["ci_high"] and ratio["unbounded_share"] == 0.0
    assert 1.0 / 0.4 <= ratio["ci_low"] and ratio["ci_high"] <= 1.0 / 0.1  # within the ratios of any resample
    flat = gain_ratio(zero, fit, zero, personas)  # a reference that gains nothing: no ratio, no interval
    assert flat["ratio"] is None and flat["ci_low"] is None and flat["ci_high"] is None
    assert gain_ratio(zero, fit, random, ["a"])["ci_low"] is None  # one persona: a ratio, no interval
    # a reference that gains on average but not in every resample: the interval's upper end is unbounded
    shaky = gain_ratio(zero, fit, {"a": 2.5, "b": 3.5, "c": 2.0, "d": 4.0}, personas)  # gains -0.5, -0.5, 2.0
    assert shaky["ratio"] == pytest.approx(1.0 / (1.0 / 3)) and shaky["ci_high"] == "+inf"
    assert 0 < shaky["unbounded_share"] < 1
    json.dumps(shaky, allow_nan=False)  # results.json stays strict JSON
    assert ratio_cell(shaky).endswith(" to ∞x)") and ratio_cell(flat) == "—"
    assert ratio_cell(ratio) == f"5.00x ({ratio['ci_low']:.2f} to {ratio['ci_high']:.2f}x)"


@pytest.mark.slow
def test_quick_config_end_to_end_and_resume(tmp_path):
    data = tmp_path / "personas.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    overrides = dict(dataset=str(data), min_lines=20, pretrain_fraction=0.6, output_dir=str(tmp_path / "out"))
    config = load_config(config_dir() / "eval_quick.json", **overrides)
    results = run_evaluation(config, command="pytest")

    out = tmp_path / "out"
    for name in ("results.json", "results.md", "generations.json", "heldout_loss.png", "bias_scale.png"):
        assert (out / name).is_file(), name
    assert (out / "fitting_curves.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    personas = results["data"]["unseen_personas"]
    assert len(personas) == config.num_unseen_personas
    assert list(results["methods"]) == METHOD_ROWS
    for key in METHOD_ROWS[:-1]:
        row = results["methods"][key]
        for metric in ("heldout_loss", "judge_loss", "discrimination_caught", "who_said_it"):
            assert row[metric]["n"] == len(personas), (key, metric)
            assert row[metric]["ci95"] is not None
        assert row["generations"] == config.num_generations * len(personas)
    pm = results["methods"]["personamux_adam_bias1"]
    assert pm["params_per_persona"] == config.num_codes
    assert pm["params_global"] == config.num_codes * config.tokens_per_code * 32 + config.num_bias_tokens * 32
    assert pm["bytes_per_persona"] > 4 * config.num_codes
    assert results["methods"]["sp"]["params_per_persona"] == config.sp_num_virtual_tokens * 32
    assert set(results["loss_improvement"]) == {
        "sp",
        "personamux_adam",
        "personamux_fisher",
        "personamux_lbfgs",
        "random_codebook",
    }
    paired = results["paired"]  # every fit against every reference, persona by persona
    assert set(paired) == {"personamux_adam", "personamux_fisher", "personamux_lbfgs"}
    for row in paired.values():
        assert set(row["minus"]) == {"zero", "random_codebook", "sp", "lora", "base"}
        assert all(d["n"] == len(personas) and 0 <= d["lower"] <= d["n"] for d in row["minus"].values())
    sp_minus = paired["personamux_adam"]["minus"]["sp"]["mean"]
    sp_loss = results["methods"]["sp"]["heldout_loss"]["mean"]
    assert sp_minus == pytest.approx(results["methods"]["personamux_adam_bias1"]["heldout_loss"]["mean"] - sp_loss)
    assert "## Persona-Mux against each reference, paired by persona" in (out / "results.md").read_text()
    fitting = results["fitting"]
    lbfgs = fitting["personamux_lbfgs"]  # each persona on its own, from the mean of the pretraining personas
    assert lbfgs["start"] == "mean" and set(lbfgs["curves"]) == set(personas)
    assert all(len(c) >= 2 and min(c) <= c[0] for c in lbfgs["curves"].values())  # never ends above its start
    evals = math.ceil(1.25 * config.lbfgs_steps)
    assert config.num_train * len(personas) <= lbfgs["example_passes"] <= evals * config.num_train * len(personas)
    assert fitting["personamux_adam"]["example_passes"] == config.fit_steps * config.num_train * len(personas)
    assert len(fitting["personamux_adam"]["curve"]) == config.fit_steps
    assert fitting["personamux_fisher"]["seconds"] > 0 and "codebook_pretraining" in fitting
    zero_shot = results["zero_shot"]
    assert list(zero_shot["rows"]) == [
        "zero",
        "mean_mixture",
        "embedding",
        "personamux_fisher",
        "personamux_adam",
        "personamux_lbfgs",
    ]

    assert all(row["heldout_loss"]["n"] == len(personas) for row in zero_shot["rows"].values())
    assert zero_shot["rows"]["embedding"]["distance_to_fitted"]["n"] == len(personas)
    assert zero_shot["map"]["personas"] >= 3 and zero_shot["map"]["embedding_dim"] == 32
    assert (out / "artifacts" / "embedding_map.safetensors").is_file()
    assert "| Embedding map, zero-shot (no gradient step) |" in (out / "results.md").read_text()

    headroom = results["headroom"]
    assert set(headroom["personas"]) == set(personas)
    for method in ("free8", "mix64", "mix64_zero", "random64"):
        curves = headroom[method]["curves"]  # one loss per evaluation of the fit; it never ends above its start
        assert set(curves) == set(personas) and all(len(c) >= 2 and min(c) <= c[0] for c in curves.values())
    assert len(headroom["identification"]["loss_matrix"]) == len(personas)
    assert headroom["identification"]["chance"] == pytest.approx(1 / len(personas))
    efficiency = results["data_efficiency"]
    assert efficiency["sizes"] == [n for n in config.data_efficiency_sizes if n <= config.num_train]
    for key in ("personamux", "personamux_lbfgs", "random_codebook", "sp"):  # every configured fit, every size
        assert all(efficiency[key][str(n)]["n"] == len(personas) for n in efficiency["sizes"]), key
    ratios = efficiency["gain_over_random"]  # learned over random codebook, per size, for both Persona-Mux fits
    assert set(ratios) == {"personamux", "personamux_lbfgs"}
    assert all(set(by_size) == {str(n) for n in efficiency["sizes"]} for by_size in ratios.values())
    assert "Random codebook (64 weights)" in (out / "results.md").read_text()
    for name in ("headroom_curves.png", "identification.png", "data_efficiency.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "## Headroom and likelihood identification" in (out / "results.md").read_text()
    sub = results["subnetwork"]  # masks: same split and metrics as every other row
    assert set(sub["rows"]) == {k for k in METHOD_ROWS if "@" in k}
    for row in sub["rows"].values():
        assert (row["identification_accuracy"] * len(personas)).is_integer()  # a share of the personas
        assert row["own_mask_advantage"]["n"] == len(personas)
        assert row["general_loss"]["n"] == len(personas) and row["seconds_per_persona"]["mean"] > 0
    masks = results["methods"]
    assert masks["channel_mask@0.3"]["bytes_per_persona"] < masks["weight_mask@0.3"]["bytes_per_persona"]
    assert masks["channel_mask+soft_prompt@0.3"]["params_per_persona"] == (
        masks["channel_mask@0.3"]["params_per_persona"] + config.num_codes
    )
    assert "## Persona subnetworks (masks, no training)" in (out / "results.md").read_text()

    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    main = table[: len(METHOD_ROWS) + 1]  # header + one row per method
    assert all(line.count("|") == 10 for line in main)
    assert "Persona-Mux (fisher), half bias" in main[9]

    # a second call reads every stage back; after losing one stage, only that one runs again
    (out / "stages" / "judge.json").unlink()
    again = run_evaluation(config, command="pytest")
    assert again["methods"] == results["methods"]
    assert again["stage_seconds"]["lora"] == results["stage_seconds"]["lora"]
    # a field of the whole run: every stage is stale, and only --overwrite starts over
    with pytest.raises(ValueError, match="other values of num_train: base_icl, codebook, data, .*Pass --overwrite"):
        run_evaluation(load_config(config_dir() / "eval_quick.json", **{**overrides, "num_train": 13}))


def test_lbfgs_rows_follow_lbfgs_steps():
    from peft_personamux.evaluation.common import method_keys

    config = load_config(config_dir() / "eval_quick.json")
    keys = [key for key, *_ in method_keys(config)]
    assert keys == METHOD_ROWS[:-1]
    off = [key for key, *_ in method_keys(dataclasses.replace(config, lbfgs_steps=0, data_efficiency_fits=["fisher"]))]
    assert off == [k for k in keys if "lbfgs" not in k]
    with pytest.raises(ValueError, match="lbfgs_steps"):
        load_config(config_dir() / "eval_quick.json", lbfgs_steps=-1)


def test_plan_counts_headroom_data_efficiency_and_subnetwork_stages():
    from peft_personamux.evaluation.cache import plan
    from peft_personamux.evaluation.data import make_split

    config = load_config(config_dir() / "eval_quick.json", headroom_gradient_personas=0, headroom_zero_start=False)
    split = make_split(config)
    n, t, u = len(split.train), len(split.test), len(split.personas)
    full = plan(config, split, pretrain_here=True)
    evals = math.ceil(1.25 * config.headroom_steps)  # the L-BFGS evaluation budget
    assert full["headroom"]["backward"] == 3 * evals * n + n  # free8, mix64, random64; one gradient pass
    # 2 sparsities x 3 rows: all held-out lines under each of the u masks; 2 generations per persona and row
    assert full["subnetwork"] == {"backward": 0, "forward": n + 2 * 3 * u * t, "generations": 2 * 3 * u * 2}
    assert full["pm_lbfgs"]["backward"] == math.ceil(1.25 * config.lbfgs_steps) * n  # each persona on its own
    assert "pm_lbfgs" not in plan(
        dataclasses.replace(config, lbfgs_steps=0, data_efficiency_fits=["fisher"]), split, pretrain_here=True
    )
    assert "data_efficiency" in full and full["total"]["backward"] == sum(
        s["backward"] for k, s in full.items() if k != "total"
    )
    # rows fitted over the sizes; at every line (num_train) the curve takes the evaluation's own rows
    lines = sum(k * u for k in config.data_efficiency_sizes if k < config.num_train)
    assert lines < sum(min(k, config.num_train) * u for k in config.data_efficiency_sizes)  # the config has one
    per_line = {  # backward passes per fitted line of each configured fit; SP's Adam steps
        "fisher": config.fisher_steps + 1,
        "lbfgs": math.ceil(1.25 * config.lbfgs_steps),
        "random": config.fit_steps if config.random_codebook_method == "adam" else config.fisher_steps + 1,
    }
    fits = sum(per_line[f] for f in config.data_efficiency_fits)
    assert full["data_efficiency"]["backward"] == lines * (config.sp_steps + fits)
    fisher_only = plan(dataclasses.replace(config, data_efficiency_fits=["fisher"]), split, pretrain_here=True)
    assert fisher_only["data_efficiency"]["backward"] == lines * (config.sp_steps + config.fisher_steps + 1)
    only = plan(dataclasses.replace(config, only_headroom=True), split, pretrain_here=False)
    assert set(only) == {"codebook", "headroom", "total"} and only["total"]["judge_sequences"] == 0


def test_sp_start_draws_vocabulary_rows_per_seed():
    from peft_personamux.evaluation.methods import sp_start

    table = torch.randn(50, 6)
    start = sp_start(table, 4, seed=3)
    assert start.shape == (4, 6)
    assert all(any(torch.equal(row, t) for t in table) for row in start)  # each token is a vocabulary embedding
    torch.testing.assert_close(sp_start(table, 4, seed=3), start)
    assert not torch.equal(sp_start(table, 4, seed=4), start)
    assert sp_start(table, 4, seed=3, init="RANDOM").shape == (4, 6)


class _CurveStub:
    """Just what `run_data_efficiency` calls on a `runner.Evaluation`, counting the fits it runs."""

    def __init__(self, fail_on: tuple[str, int] | None = None):
        self.config = EvalConfig(num_train=8, random_codebook_method="fisher")
        self.personas = ["a/x", "a/y"]
        rows = [{"persona": p, "prompt": "q", "response": "r", "group": "a"} for _ in range(8) for p in self.personas]
        self.split = type("Split", (), {"train": rows, "test": rows[:4]})()
        self.device = torch.device("cpu")
        self.fits: list[tuple[str, int, bool]] = []  # (method, lines per persona, random codebook)
        self.swapped = False
        self.fail_on = fail_on
        self.model = type("Model", (), {"set_mixture": lambda *a: None})()
        self.model.peft_config = {"default": type("C", (), {"num_codes": 4})()}
        self.model.active_adapter = "default"

    def personamux(self):
        return self.model

    def pm_losses(self, rows, bias_scale):
        return {p: 4.0 - 0.01 * len(self.fits) for p in self.personas}

    def mux_collator(self, model):
        return lambda rows: {"input_ids": torch.zeros(len(rows), 1)}

    def random_codebook(self, model):
        stub = self

        class Swap:
            def __enter__(self):
                stub.swapped = True

            def __exit__(self, *exc):
                stub.swapped = False

        return Swap()

    def fit_unseen(self, model, batch, method):
        lines = batch["input_ids"].shape[0] // len(self.personas)
        if self.fail_on == (method, lines):
            raise RuntimeError("interrupted")
        self.fits.append((method, lines, self.swapped))


def test_data_efficiency_fits_each_row_as_configured_and_resumes_where_it_stopped():
    from peft_personamux.evaluation.data_efficiency import run_data_efficiency

    saved = {}
    stub = _CurveStub(fail_on=("fisher", 8))  # the random codebook's second size fails
    with pytest.raises(RuntimeError, match="interrupted"):
        run_data_efficiency(stub, [4, 8, 100], ["lbfgs", "random"], save=lambda out: saved.update(out))
    # sizes above num_train are skipped; L-BFGS on the learned codebook, the random one with random_codebook_method
    assert stub.fits == [("lbfgs", 4, False), ("lbfgs", 8, False), ("fisher", 4, True)]
    assert not stub.swapped  # the learned codebook is back after the failure
    assert set(saved["personamux_lbfgs"]) == {"4", "8"} and set(saved["random_codebook"]) == {"4"}

    again = _CurveStub()
    out = run_data_efficiency(again, [4, 8], ["lbfgs", "random"], partial={**saved, "sp": {"4": {}, "8": {}}})
    assert again.fits == [("fisher", 8, True)]  # only what was missing
    assert set(out["random_codebook"]) == {"4", "8"} and out["zero"] == saved["zero"]


def test_data_efficiency_takes_the_evaluations_own_rows_at_every_line():
    from peft_personamux.evaluation.data_efficiency import fitted_rows, run_data_efficiency

    stub = _CurveStub()  # num_train 8: size 8 is every training line
    losses = {p: 3.5 for p in stub.personas}
    stages = {"pm_lbfgs": {"heldout_loss": {"1.0": losses}}, "sp": {"heldout_loss": {"1.0": {"a/x": 3.0}}}}
    assert fitted_rows(stages) == {"personamux_lbfgs": losses, "sp": {"a/x": 3.0}}
    out = run_data_efficiency(stub, [4, 8], ["lbfgs", "random"], partial={"sp": {"4": {}}}, fitted=fitted_rows(stages))
    assert stub.fits == [("lbfgs", 4, False), ("fisher", 4, True), ("fisher", 8, True)]  # no L-BFGS refit at 8
    assert out["personamux_lbfgs"]["8"] == losses and out["sp"]["8"] == {"a/x": 3.0}
    fitted = fitted_rows(stages)
    fisher_only = run_data_efficiency(_CurveStub(), [4, 8], ["fisher"], partial={"sp": {"4": {}}}, fitted=fitted)
    assert "personamux_lbfgs" not in fisher_only  # only the configured rows


def _stage_cache(tmp_path, overwrite: bool = False, **fields):
    from peft_personamux.evaluation.cache import StageCache

    return StageCache(tmp_path, EvalConfig(output_dir=str(tmp_path), **fields), overwrite)


def test_stage_cache_keeps_stages_whose_fields_did_not_change(tmp_path):
    cache = _stage_cache(tmp_path, headroom=False)
    for name in ("pm_zero", "judge", "headroom"):
        cache.put(name, {"done": True})
    # turning a stage on, or another stage's own fields, keeps every finished stage
    kept = _stage_cache(tmp_path, headroom=True, data_efficiency_sizes=[8], data_efficiency_fits=["lbfgs"])
    assert kept.names() == ["headroom", "judge", "pm_zero"] and kept.get("pm_zero") == {"done": True}
    same = {"headroom": True, "data_efficiency_sizes": [8], "data_efficiency_fits": ["lbfgs"]}
    with pytest.raises(ValueError, match=r"other values of subnetwork_sparsities: judge\. Delete them") as error:
        _stage_cache(tmp_path, **same, subnetwork_sparsities=[0.5])  # subnetworks add generations to judge
    assert str(tmp_path / "stages" / "judge.json") in str(error.value)
    with pytest.raises(ValueError, match=r"other values of headroom_steps: headroom\. Delete"):
        _stage_cache(tmp_path, **same, headroom_steps=2)
    # a field of the whole run: files beside the stages (tiny models, text personas) may differ, so start over
    with pytest.raises(ValueError, match=r"other values of lbfgs_steps: headroom, judge, pm_zero\. Pass --overwrite"):
        _stage_cache(tmp_path, **same, lbfgs_steps=1)
    assert _stage_cache(tmp_path, **same).names() == ["headroom", "judge", "pm_zero"]  # nothing was discarded
    assert _stage_cache(tmp_path, **same, lbfgs_steps=1, overwrite=True).names() == []


def test_stage_cache_reads_an_older_markers_config_from_results_json(tmp_path):
    before = EvalConfig(output_dir=str(tmp_path), headroom=False)
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "config_fingerprint.json").write_text(json.dumps({"fingerprint": before.fingerprint()}))
    (stages / "sp.json").write_text(json.dumps({"done": True}))
    with pytest.raises(ValueError, match="holds stages of another config"):  # nothing tells what changed
        _stage_cache(tmp_path, headroom=True)
    (tmp_path / "results.json").write_text(json.dumps({"config": before.to_dict()}))
    assert _stage_cache(tmp_path, headroom=True).names() == ["sp"]
    marker = json.loads((stages / "config_fingerprint.json").read_text())
    assert marker["config"]["headroom"] is True  # the marker now keeps its config
