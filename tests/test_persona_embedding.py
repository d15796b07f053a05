"""Personas from external embeddings: the ridge map, its leave-one-out choice, files, and zero-shot personas."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import SMALL, make_model
from tiny_models import mux as tiny_mux

from peft_personamux import PersonaFileError, PersonaMuxConfig
from peft_personamux.persona_embedding import EmbeddingMap, embed_texts, fit_embedding_map, persona_from_embedding


def linear_data(n=20, dim=5, codes=6, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * 3 + 1
    a = torch.randn(dim, codes, generator=g)
    y = x @ a + 0.5 + noise * torch.randn(n, codes, generator=g)
    return x, y


def mux(n=8):
    return tiny_mux(personas=[f"p{i}" for i in range(n)])


def test_fit_recovers_a_linear_map():
    x, y = linear_data()
    emap = EmbeddingMap.fit(x, y, alphas=[1e-9])
    torch.testing.assert_close(emap(x), y, atol=1e-4, rtol=1e-4)
    assert emap.loo_error < 1e-6 < emap.mean_loo_error
    assert emap(x[0]).shape == (6,)  # one embedding -> one mixture


def test_leave_one_out_error_equals_refitting_without_each_persona():
    x, y = linear_data(n=9, dim=12, noise=0.5)  # more features than personas
    alpha = 3.0
    emap = EmbeddingMap.fit(x, y, alphas=[alpha])
    errors = []
    for i in range(len(x)):
        keep = [j for j in range(len(x)) if j != i]
        held_out = EmbeddingMap.fit(x[keep], y[keep], alphas=[alpha])
        errors.append(float(((held_out(x[i]) - y[i]) ** 2).sum()))
    assert emap.loo_error == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    means = [float(((y[[j for j in range(len(x)) if j != i]].mean(0) - y[i]) ** 2).sum()) for i in range(len(x))]
    assert emap.mean_loo_error == pytest.approx(sum(means) / len(means), rel=1e-4)


def test_alpha_is_chosen_by_leave_one_out():
    x, y = linear_data(n=30, noise=0.1)
    informative = EmbeddingMap.fit(x, y)
    assert informative.loo_error < 0.1 * informative.mean_loo_error
    noise = torch.randn(30, 5, generator=torch.Generator().manual_seed(7))  # embeddings unrelated to the mixtures
    uninformative = EmbeddingMap.fit(noise, y)
    assert uninformative.alpha > informative.alpha
    # a huge penalty predicts the mean mixture whatever the embedding
    flat = EmbeddingMap.fit(x, y, alphas=[1e12])
    torch.testing.assert_close(flat(x[:3]), y.mean(0).expand(3, -1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "embeddings, mixtures, kwargs, match",
    [
        (torch.randn(2, 4), torch.randn(2, 6), {}, "at least 3 personas"),
        (torch.randn(5, 4), torch.randn(4, 6), {}, "same n"),
        (torch.randn(5), torch.randn(5, 6), {}, "2-D"),
        (torch.full((5, 4), float("nan")), torch.randn(5, 6), {}, "finite"),
        (torch.randn(5, 4), torch.randn(5, 6), {"alphas": [0.0]}, "positive"),
        (torch.randn(5, 4), torch.randn(5, 6), {"alphas": []}, "positive"),
        (torch.randn(5, 4), torch.randn(5, 6), {"names": ["a"]}, "names"),
    ],
)
def test_fit_rejects_bad_input(embeddings, mixtures, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingMap.fit(embeddings, mixtures, **kwargs)


def test_call_rejects_wrong_width_and_nan():
    emap = EmbeddingMap.fit(*linear_data())
    with pytest.raises(ValueError, match="5 features"):
        emap(torch.randn(3, 4))
    with pytest.raises(ValueError, match="finite"):
        emap(torch.full((5,), float("inf")))


def test_save_and_load_round_trip(tmp_path):
    x, y = linear_data()
    emap = EmbeddingMap.fit(x, y, names=[f"n{i}" for i in range(20)], codebook_fingerprint="abc")
    path = emap.save(tmp_path / "maps" / "users.safetensors")
    loaded = EmbeddingMap.load(path)
    torch.testing.assert_close(loaded(x), emap(x))
    assert (loaded.alpha, loaded.loo_error, loaded.mean_loo_error) == (emap.alpha, emap.loo_error, emap.mean_loo_error)
    assert loaded.names == emap.names and loaded.codebook_fingerprint == "abc"
    with pytest.raises(FileNotFoundError, match="No embedding map"):
        EmbeddingMap.load(tmp_path / "missing.safetensors")
    model = mux()
    persona_file = model.save_persona("p0", tmp_path / "ckpt")
    with pytest.raises(PersonaFileError, match="not an embedding map"):
        EmbeddingMap.load(persona_file)


def test_zero_shot_persona_from_the_models_own_mixtures():
    model = mux(n=8)
    g = torch.Generator().manual_seed(3)
    lift = torch.randn(6, 10, generator=g)
    # embeddings that are a linear image of each persona's mixture: the map can invert it
    embeddings = {n: model.get_mixture(n) @ lift for n in model.personas}
    emap = model.fit_embedding_map(embeddings, alphas=[1e-9])
    assert emap.names == model.personas and emap.codebook_fingerprint == model.base_model.codebook_fingerprint()
    target = torch.randn(6, generator=g)
    name = model.persona_from_embedding("users/new", target @ lift, emap)
    assert name == "users/new" and "users/new" in model.personas
    torch.testing.assert_close(model.get_mixture("users/new"), target, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="already registered"):
        persona_from_embedding(model, "users/new", target @ lift, emap)
    persona_from_embedding(model, "users/new", emap.embedding_mean, emap, exist_ok=True)  # the mean embedding
    torch.testing.assert_close(model.get_mixture("users/new"), emap.mixture_mean)


def test_embedding_map_errors_name_the_problem():
    model = mux(n=4)
    with pytest.raises(ValueError, match="without a mixture"):
        fit_embedding_map(model, {"p0": torch.randn(3), "nobody": torch.randn(3), "p1": torch.randn(3)})
    with pytest.raises(ValueError, match="empty"):
        fit_embedding_map(model, {})
    emap = fit_embedding_map(model, {n: torch.randn(3) for n in model.personas})
    layer = model.get_base_model().get_input_embeddings()
    with torch.no_grad():
        layer.personamux_codebook["default"].add_(1.0)  # another codebook: the mixtures mean something else
    with pytest.raises(ValueError, match="refit"):
        model.persona_from_embedding("x", torch.randn(3), emap)
    wrong_codes = EmbeddingMap.fit(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="4 weights"):
        model.persona_from_embedding("x", torch.randn(3), wrong_codes)


class CharTokenizer:
    """Stand-in tokenizer: one id per character."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, truncation=True, max_length=128):
        return {"input_ids": [3 + ord(c) % 100 for c in text][:max_length]}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_embed_texts_pools_without_padding_effects_and_ignores_the_adapter(arch):
    base = make_model(arch)
    texts = ["to be or not to be", "ay", "the rest is silence, my lord"]
    tokenizer = CharTokenizer()
    plain = embed_texts(base, tokenizer, texts, batch_size=3)
    assert plain.shape == (3, 32) and plain.dtype == torch.float32
    one_by_one = torch.cat([embed_texts(base, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(plain, one_by_one, atol=1e-5, rtol=1e-5)
    model = get_peft_model(base, PersonaMuxConfig(**SMALL))
    model.add_personas(["a"], mixtures=torch.ones(1, 6))
    model.base_model.set_persona("a")
    torch.testing.assert_close(embed_texts(model, tokenizer, texts), plain)
    with pytest.raises(ValueError, match="non-empty list"):
        embed_texts(base, tokenizer, "one string")
