"""Fast fitting, prompt-embedding export and persona arithmetic."""

from __future__ import annotations

import pytest
import torch
from tiny_models import mux

from peft_personamux.fitting import fit_mixtures, mean_token_loss


def fit_batch(model, names, per_persona=8, length=10, seed=0):
    """Each persona speaks a fixed token pattern, so its mixture has something to learn."""
    g = torch.Generator().manual_seed(seed)
    ids, rows = [], []
    for name in names:
        pattern = torch.randint(3, 100, (length,), generator=g)
        for _ in range(per_persona):
            noisy = pattern.clone()
            flip = torch.rand(length, generator=g) < 0.2
            noisy[flip] = torch.randint(3, 100, (int(flip.sum()),), generator=g)
            ids.append(noisy)
            rows.append(model.persona_index(name))
    input_ids = torch.stack(ids)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "persona_ids": torch.tensor(rows),
    }


@pytest.mark.parametrize("method", ["adam", "fisher", "lbfgs"])
def test_fit_lowers_loss_and_touches_only_fitted_rows(method):
    model = mux()
    model.add_personas(["new1", "new2"])
    batch = fit_batch(model, ["new1", "new2"])
    before = mean_token_loss(model, batch)
    others = model.get_base_model().get_input_embeddings().mixture["default"][:3].detach().clone()
    codebook = model.get_base_model().get_input_embeddings().personamux_codebook["default"].detach().clone()
    result = fit_mixtures(
        model, batch, method=method, steps={"adam": 20, "fisher": 4, "lbfgs": 6}[method], lr=0.05, progress=False
    )
    after = mean_token_loss(model, batch)
    assert after < before - 1e-3
    assert abs(result.losses[0] - before) < 1e-4
    layer = model.get_base_model().get_input_embeddings()
    assert torch.equal(layer.mixture["default"][:3], others)
    assert torch.equal(layer.personamux_codebook["default"], codebook)
    assert result.example_passes > 0 and result.seconds > 0


@pytest.fixture(scope="module")
def adam_fit():
    """Persona "x" fitted with the paper's recipe (100 full-batch Adam steps): what the faster fits must match."""
    model = mux()
    model.add_personas(["x"])
    batch = fit_batch(model, ["x"], per_persona=12)
    adam = fit_mixtures(model, batch, method="adam", steps=100, progress=False)
    return model, batch, adam, mean_token_loss(model, batch)


def test_fisher_needs_fewer_passes_than_adam_recipe(adam_fit):
    model, batch, adam, adam_loss = adam_fit
    model.set_mixture("x", torch.zeros(6))
    fisher = fit_mixtures(model, batch, method="fisher", steps=6, progress=False)
    fisher_loss = mean_token_loss(model, batch)
    assert fisher.example_passes * 5 <= adam.example_passes
    assert fisher_loss <= adam_loss * 1.01


def test_lbfgs_converges_where_the_adam_recipe_does_with_fewer_passes(adam_fit):
    model, batch, adam, adam_loss = adam_fit
    model.set_mixture("x", torch.zeros(6))
    lbfgs = fit_mixtures(model, batch, method="lbfgs", steps=10, progress=False)
    lbfgs_loss = mean_token_loss(model, batch)
    assert lbfgs.example_passes <= 10 * 1.25 * 12 + 12 and lbfgs.example_passes * 5 <= adam.example_passes
    assert lbfgs_loss <= adam_loss * 1.01
    # one curve entry per loss evaluation; L-BFGS ends at its best accepted point, never above the start
    assert len(lbfgs.persona_curves[model.persona_index("x")]) == len(lbfgs.losses)
    assert lbfgs_loss <= lbfgs.losses[0]


@pytest.mark.parametrize("method", ["adam", "lbfgs"])
def test_prompt_penalty_holds_the_prompt_near_its_start(method):
    model = mux()
    model.add_personas(["x"])
    batch = fit_batch(model, ["x"], per_persona=12)
    codebook = model.get_base_model().get_input_embeddings().personamux_codebook["default"].detach()
    start = torch.full((6,), 0.1)
    moved = {}
    for penalty in (0.0, 1.0, 1e4):
        model.set_mixture("x", start)
        result = fit_mixtures(model, batch, method=method, steps=20, lr=0.05, progress=False, prompt_penalty=penalty)
        change = torch.einsum("c,ckd->kd", model.get_mixture("x") - start, codebook)  # the mixed tokens' change
        moved[penalty] = float(change.norm())
        # the objective adds the penalty; each persona's curve stays its token loss
        penalised = result.losses[-1] - result.persona_curves[model.persona_index("x")][-1]
        if method == "lbfgs":  # its losses end at the best point, whose mixture is kept
            assert penalised == pytest.approx(penalty / 2 * moved[penalty] ** 2, rel=1e-3, abs=1e-6)
    assert moved[1e4] < moved[1.0] <= moved[0.0] * 1.001
    assert moved[1e4] < (0.02 if method == "lbfgs" else 0.1) * moved[0.0]  # Adam's steps keep the size of lr


@pytest.mark.parametrize("method", ["adam", "fisher", "lbfgs"])
def test_a_failed_fit_leaves_table_and_mode_as_they_were(method, monkeypatch):
    import peft_personamux.fitting as fitting

    model = mux()
    model.add_personas(["x"])
    batch = fit_batch(model, ["x"])
    start = torch.full((6,), 0.1)
    model.set_mixture("x", start)
    model.train()
    calls = {"n": 0}
    real = fitting._row_losses

    def failing(*args, **kwargs):  # the second chunk of the first pass fails (e.g. out of memory)
        for item in real(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            yield item

    closed = []

    class Bar(fitting.tqdm):
        def close(self) -> None:
            closed.append(self.n)
            super().close()

    monkeypatch.setattr(fitting, "_row_losses", failing)
    monkeypatch.setattr(fitting, "tqdm", Bar)
    with pytest.raises(RuntimeError, match="boom"):
        fit_mixtures(model, batch, method=method, steps=3, chunk_size=4, progress=False)
    assert calls["n"] == 2 and closed  # the bar was closed on the way out
    torch.testing.assert_close(model.get_mixture("x"), start)
    assert fitting.as_tuner(model).training


def test_fit_rejects_bad_arguments():
    model = mux()
    batch = fit_batch(model, ["a"])
    with pytest.raises(ValueError, match="method"):
        fit_mixtures(model, batch, method="sgd")
    with pytest.raises(ValueError, match="steps"):
        fit_mixtures(model, batch, steps=0)
    with pytest.raises(ValueError, match="prompt_penalty"):
        fit_mixtures(model, batch, method="fisher", prompt_penalty=1.0)
    with pytest.raises(ValueError, match="prompt_penalty"):
        fit_mixtures(model, batch, method="lbfgs", prompt_penalty=-1.0)


def test_export_prompt_embeds_equal_model_embeddings():
    model = mux()
    ph = model.peft_config["default"].placeholder_token_id
    ids = torch.tensor([[0, 0, 5, ph, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    exported = model.export_prompt_embeds(ids, mask, persona_ids=["b", "c"])
    assert [tuple(e.shape) for e in exported] == [(3 + 7, 32), (6 + 7, 32)]
    captured = []
    layer = model.get_base_model().get_input_embeddings()
    handle = layer.register_forward_hook(lambda mod, inp, out: captured.append(out))
    for row, name in enumerate(["b", "c"]):
        real = ids[row][mask[row].bool()][None]
        logits = model(input_ids=real, persona_ids=[name]).logits
        torch.testing.assert_close(captured[-1][0], exported[row])
        # feeding the exported embeddings to the base model reproduces the model's logits (vLLM's path)
        with model.disable_adapter():
            via_embeds = model.get_base_model()(inputs_embeds=exported[row][None]).logits
        torch.testing.assert_close(via_embeds, logits, atol=1e-5, rtol=1e-4)
    handle.remove()
    assert exported[0].dtype == torch.float32 and exported[0].dim() == 2  # vLLM: (seq_len, hidden) per prompt


def test_blend_and_persona_map(tmp_path):
    model = mux()
    name = model.blend_personas({"a": 0.7, "b": 0.3})
    torch.testing.assert_close(model.get_mixture(name), 0.7 * model.get_mixture("a") + 0.3 * model.get_mixture("b"))
    assert model.blend_personas({"a": 0.7, "b": 0.3}) == name
    assert model.blend_personas({"c": 1.0}, name="c_copy") == "c_copy"
    with pytest.raises(KeyError, match="Unknown persona"):
        model.blend_personas({"nobody": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        model.blend_personas({})
    path = model.persona_map(tmp_path / "map.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_base64_round_trip_matches_vllm_server_format():
    import base64
    import io

    from peft_personamux.serving import to_base64

    model = mux()
    (embeds,) = model.export_prompt_embeds(torch.tensor([[5, 6, 7]]), persona_ids="a")
    # what vLLM's server does with the field: base64-decode, then torch.load with weights_only
    decoded = torch.load(io.BytesIO(base64.b64decode(to_base64(embeds))), weights_only=True)
    torch.testing.assert_close(decoded, embeds)
    with pytest.raises(ValueError, match="seq_len, hidden"):
        to_base64(embeds[None])


def test_adam_recipe_with_several_chunks_matches_one_chunk():
    model = mux()
    model.add_personas(["x"])
    batch = fit_batch(model, ["x"], per_persona=10)
    one = fit_mixtures(model, batch, method="adam", steps=3, chunk_size=64, progress=False)
    first = model.get_mixture("x")
    model.set_mixture("x", torch.zeros(6))
    chunked = fit_mixtures(model, batch, method="adam", steps=3, chunk_size=3, progress=False)
    torch.testing.assert_close(model.get_mixture("x"), first, atol=1e-5, rtol=1e-4)
    assert chunked.losses == pytest.approx(one.losses, rel=1e-5)


def test_right_padding_is_cut_per_chunk_without_changing_the_fit(monkeypatch):
    """Extra right padding (as when a full batch is padded to its longest row) is cut before the model runs, and
    changes neither losses nor result."""
    import peft_personamux.fitting as fitting

    model = mux()
    model.add_personas(["x"])
    batch = fit_batch(model, ["x"], per_persona=6)
    plain = fit_mixtures(model, batch, method="lbfgs", steps=3, chunk_size=4, progress=False)
    first = model.get_mixture("x")
    model.set_mixture("x", torch.zeros(6))
    pad = torch.zeros(batch["input_ids"].shape[0], 7, dtype=torch.long)
    padded = dict(batch)
    padded["input_ids"] = torch.cat([batch["input_ids"], pad + 1], dim=1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], pad], dim=1)
    padded["labels"] = torch.cat([batch["labels"], pad - 100], dim=1)
    widths, response_nll = [], fitting.response_nll

    def recording(tuner, chunk, *args, **kwargs):
        widths.append(chunk["input_ids"].shape[1])
        return response_nll(tuner, chunk, *args, **kwargs)

    monkeypatch.setattr(fitting, "response_nll", recording)
    cut = fit_mixtures(model, padded, method="lbfgs", steps=3, chunk_size=4, progress=False)
    assert set(widths) == {batch["input_ids"].shape[1]}  # the 7 padding columns never reach the model
    assert cut.losses == pytest.approx(plain.losses, rel=1e-5)
    torch.testing.assert_close(model.get_mixture("x"), first, atol=1e-5, rtol=1e-4)
