"""The Persona-Mux tuner: registration, parameters, placement, personas, bias scale, files, stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, DTYPES, N_VIRTUAL, SMALL, make_model, mux

import peft_personamux
from peft_personamux import PersonaFileError, PersonaMuxConfig, PersonaMuxModel
from peft_personamux.tuner.peft_type import extend_peft_type


def ids_batch(batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, length), generator=g)


def manual_logits(model, input_ids, persona, bias_scale=1.0, at=0):
    """Reference: concatenate embeddings by hand and call the base model with inputs_embeds (one row)."""
    base = model.get_base_model()
    layer = base.get_input_embeddings()
    emb = layer.base_layer(input_ids[None])  # (1, seq, hidden)
    prompt = layer.soft_prompt("default", torch.tensor([model.persona_index(persona)]), bias_scale).to(emb.dtype)
    embeds = torch.cat([emb[:, :at], prompt, emb[:, at:]], dim=1)
    with model.disable_adapter():
        return base(inputs_embeds=embeds).logits[0]


# -- registration -------------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
    assert PeftType.PERSONAMUX == "PERSONAMUX"
    assert PeftType("PERSONAMUX") is PeftType["PERSONAMUX"] is PeftType.PERSONAMUX
    assert extend_peft_type() is PeftType.PERSONAMUX
    assert peft_personamux.register() is PeftType.PERSONAMUX
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PERSONAMUX] is PersonaMuxConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PERSONAMUX] is PersonaMuxModel
    assert list(PeftType).count(PeftType.PERSONAMUX) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_codes=0), "num_codes"),
        (dict(tokens_per_code=-1), "tokens_per_code"),
        (dict(num_bias_tokens=-2), "num_bias_tokens"),
        (dict(codebook_init="zeros"), "codebook_init"),
        (dict(bias_init="text"), "init_text"),
        (dict(init_std_scale=0.0), "init_std_scale"),
        (dict(placeholder_token_id=-1), "placeholder_token_id"),
        (dict(default_bias_scale=-0.5), "default_bias_scale"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PersonaMuxConfig(**kwargs)


def test_config_serialises_plain_strings(tmp_path):
    config = PersonaMuxConfig(task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "PERSONAMUX" and data["codebook_init"] == "random"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PersonaMuxConfig) and loaded.num_virtual_tokens == 20


# -- parameters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_shapes_and_init(arch, dtype):
    model = mux(arch, dtype, personas=("a",))
    layer = model.get_base_model().get_input_embeddings()
    hidden = layer.base_layer.weight.shape[1]
    codebook, bias = layer.personamux_codebook["default"], layer.personamux_bias["default"]
    assert codebook.shape == (6, 3, hidden) and bias.shape == (4, hidden)
    assert codebook.abs().sum() > 0, "a zero codebook never learns"
    assert codebook.dtype == torch.float32  # adapter weights are kept in fp32, as peft does
    fresh = mux(arch, dtype, personas=())
    fresh.add_persona("new")
    assert torch.count_nonzero(fresh.get_mixture("new")) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("personamux_" in n for n in trainable) and len(trainable) == 3
    assert layer.mixture is layer.personamux_mixture  # the former name stays readable


def test_adapter_state_dict_holds_codebook_and_bias_only():
    model = mux()
    state = get_peft_model_state_dict(model)
    assert sorted(k.rsplit(".", 1)[-1] for k in state) == ["personamux_bias", "personamux_codebook"]
    assert all("embed" in k or "wte" in k for k in state)


# -- placement -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prepend_and_placeholder_match_manual_embeddings(arch):
    model = mux(arch)
    ph = model.peft_config["default"].placeholder_token_id
    ids = ids_batch(1, 8)[0]
    out = model(input_ids=ids[None], persona_ids=["b"]).logits[0]
    torch.testing.assert_close(out, manual_logits(model, ids, "b", at=0), atol=1e-5, rtol=1e-4)
    with_ph = torch.cat([ids[:3], torch.tensor([ph]), ids[3:]])
    out = model(input_ids=with_ph[None], persona_ids=["c"]).logits[0]
    torch.testing.assert_close(out, manual_logits(model, ids, "c", at=3), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_masks_and_labels(side):
    model = mux()
    ph = model.peft_config["default"].placeholder_token_id
    short = torch.tensor([5, 6, ph, 7])
    long = torch.tensor([8, 9, 10, 11, 12, 13])
    pad = 0
    if side == "left":
        ids = torch.stack([torch.cat([torch.full((2,), pad), short]), long])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    else:
        ids = torch.stack([torch.cat([short, torch.full((2,), pad)]), long])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, persona_ids=torch.tensor([0, 1]))
    assert out.logits.shape[1] == 6 + N_VIRTUAL  # longest row: prepended, no placeholder
    # each row alone (no padding) gives the same logits on its real tokens
    for row, (r_ids, at) in enumerate([(short, 2), (long, 0)]):
        alone = manual_logits(model, r_ids[r_ids != ph], ["a", "b"][row], at=at)
        got = out.logits[row]
        got = got[-alone.shape[0] :] if side == "left" else got[: alone.shape[0]]
        torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)
    # the loss ignores virtual tokens: recompute it from logits with -100 over the soft prompt
    from peft_personamux.inputs import insert_virtual_tokens

    ex = insert_virtual_tokens(ids, mask, labels, ph, N_VIRTUAL, "right", 0)
    assert (ex.labels[ex.input_ids == ph] == -100).all()
    assert int((ex.labels != -100).sum()) == int((labels != -100).sum()) - 1  # the placeholder label is dropped
    assert ex.left_padded == (side == "left")


def test_prepare_widens_ids_mask_and_labels_together_and_resolves_personas():
    model = mux()
    tuner = model.base_model
    ph = model.peft_config["default"].placeholder_token_id
    ids = torch.tensor([[5, ph, 6, 7], [8, 9, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 6, 7], [-100, 9, 10, -100]])
    prepared = tuner.prepare(ids, mask, labels, persona_ids=["b", "c"], bias_scale=0)
    width = SMALL["tokens_per_code"]  # no bias tokens at scale 0
    assert prepared.input_ids.shape == prepared.attention_mask.shape == prepared.labels.shape == (2, 3 + width)
    assert ((prepared.input_ids == ph).sum(-1) == width).all() and (
        prepared.labels[prepared.input_ids == ph] == -100
    ).all()
    assert prepared.persona_ids.tolist() == [1, 2] and prepared.bias_scale == 0.0
    assert tuner.num_virtual(1.0) == N_VIRTUAL and tuner.num_virtual(0.0) == width
    with model.disable_adapter():  # the caller's inputs, exactly as given, and nothing to write
        off = tuner.prepare(ids, mask, labels)
    assert off.persona_ids is None and torch.equal(off.input_ids, ids) and torch.equal(off.labels, labels)


# -- personas and bias scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_equals_per_persona_batches(arch, dtype):
    model = mux(arch, dtype)
    ids = ids_batch(3, 8)
    mixed = model(input_ids=ids, persona_ids=["c", "a", "b"]).logits
    for row, name in enumerate(["c", "a", "b"]):
        same = model(input_ids=ids, persona_ids=[name] * 3).logits
        torch.testing.assert_close(mixed[row], same[row], atol=0, rtol=0)
    gen_mixed = model.generate(input_ids=ids, persona_ids=["c", "a", "b"], max_new_tokens=6, do_sample=False)
    for row, name in enumerate(["c", "a", "b"]):
        alone = model.generate(input_ids=ids[row : row + 1], persona_ids=[name], max_new_tokens=6, do_sample=False)
        assert torch.equal(gen_mixed[row], alone[0])
    assert torch.equal(gen_mixed[:, :8], ids), "generate returns the caller's prompt unchanged"


def test_generate_kv_cache_matches_no_cache():
    model = mux()
    ids = ids_batch(2, 6)
    cached = model.generate(input_ids=ids, persona_ids=["a", "b"], max_new_tokens=8, do_sample=False)
    uncached = model.generate(
        input_ids=ids, persona_ids=["a", "b"], max_new_tokens=8, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)
    ph = model.peft_config["default"].placeholder_token_id
    assert not (cached[:, 6:] == ph).any(), "the placeholder id is never generated"


def test_persona_changes_output_and_active_persona_is_default():
    model = mux()
    ids = ids_batch(1, 6)
    a = model(input_ids=ids, persona_ids="a").logits
    b = model(input_ids=ids, persona_ids="b").logits
    assert not torch.allclose(a, b)
    model.set_persona("b")
    torch.testing.assert_close(model(input_ids=ids).logits, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_persona_is_the_zero_mixture(arch, dtype):
    """No persona given and none active: the zero mixture, also with no persona registered at all."""
    model = mux(arch, dtype, personas=())
    ids = ids_batch(2, 6)
    fresh = model(input_ids=ids).logits
    model.add_persona("zero")
    torch.testing.assert_close(fresh, model(input_ids=ids, persona_ids="zero").logits, atol=0, rtol=0)
    model.add_persona("a", mixture=torch.ones(6))
    torch.testing.assert_close(fresh, model(input_ids=ids).logits, atol=0, rtol=0)  # still none active
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9) and torch.equal(out[:, :6], ids)
    with pytest.raises(ValueError, match="out of range"):
        model(input_ids=ids, persona_ids=torch.tensor([-1, 0]))  # the default row is not a user-facing id


def test_bias_scale_full_half_none():
    model = mux()
    ids = ids_batch(1, 6)
    full = model(input_ids=ids, persona_ids="a").logits
    assert full.shape[1] == 6 + N_VIRTUAL
    half = model(input_ids=ids, persona_ids="a", bias_scale=0.5).logits
    torch.testing.assert_close(half[0], manual_logits(model, ids[0], "a", bias_scale=0.5), atol=1e-5, rtol=1e-4)
    none = model(input_ids=ids, persona_ids="a", bias_scale=0).logits
    assert none.shape[1] == 6 + N_VIRTUAL - 4, "bias scale 0 removes the bias tokens"
    torch.testing.assert_close(none[0], manual_logits(model, ids[0], "a", bias_scale=0), atol=1e-5, rtol=1e-4)
    with model.set_bias_scale(0):
        assert model.bias_scale == 0
        assert model(input_ids=ids, persona_ids="a").logits.shape == none.shape
    assert model.bias_scale == 1.0
    model.set_bias_scale(0.5)
    torch.testing.assert_close(model(input_ids=ids, persona_ids="a").logits, half)
    out = model.generate(input_ids=ids, persona_ids="a", bias_scale=0, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bias_scale"):
            model.set_bias_scale(bad)
        with pytest.raises(ValueError, match="bias_scale"):
            model(input_ids=ids, persona_ids="a", bias_scale=bad)


def test_bad_persona_inputs_are_named():
    model = mux()
    ids = ids_batch(2, 5)
    with pytest.raises(KeyError, match="Unknown persona 'zed'"):
        model(input_ids=ids, persona_ids=["a", "zed"])
    with pytest.raises(ValueError, match=r"out of range: 3 personas"):
        model(input_ids=ids, persona_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 rows"):
        model(input_ids=ids, persona_ids=["a", "b", "c"])
    ph = model.peft_config["default"].placeholder_token_id
    bad = ids.clone()
    bad[0, 1] = bad[0, 3] = ph
    with pytest.raises(ValueError, match="2 persona placeholder tokens"):
        model(input_ids=bad, persona_ids=["a", "b"])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 32), persona_ids="a")
    with pytest.raises(ValueError, match="already registered"):
        model.add_persona("a")
    for name in ("../x", "/abs", "a\\b", "a/b/c", "", ".hidden", "a/.."):
        with pytest.raises(ValueError, match="Invalid persona name"):
            model.add_persona(name)


def test_registry_add_remove():
    model = mux()
    assert model.personas == ["a", "b", "c"]
    b = model.get_mixture("b")
    c = model.get_mixture("c")
    model.set_persona("a")
    model.remove_persona("a")
    assert model.personas == ["b", "c"] and model.active_persona is None
    torch.testing.assert_close(model.get_mixture("b"), b)
    torch.testing.assert_close(model.get_mixture("c"), c)
    assert model.add_persona("a") == 2


# -- stages -----------------------------------------------------------------------------------------------------


def _grads(model, persona_ids=("a", "b")):
    model.zero_grad(set_to_none=True)
    ids = ids_batch(len(persona_ids), 6)
    model(input_ids=ids, labels=ids, persona_ids=list(persona_ids)).loss.backward()
    layer = model.get_base_model().get_input_embeddings()
    return (
        layer.personamux_codebook["default"].grad,
        layer.personamux_bias["default"].grad,
        layer.mixture["default"].grad,
    )


def test_stage_gradients():
    model = mux()
    model.train()
    model.train_bias_only()
    w, b, m = _grads(model)
    assert w is None and m is None and b.abs().sum() > 0
    model.train_codebook()
    w, b, m = _grads(model)
    assert w.abs().sum() > 0 and b.abs().sum() > 0 and m[:2].abs().sum() > 0 and m[2].abs().sum() == 0
    model.train_personas(["b"])
    w, b, m = _grads(model)
    assert w is None and b is None
    assert m[1].abs().sum() > 0 and m[0].abs().sum() == 0 and m[2].abs().sum() == 0
    base_grads = [p.grad for n, p in model.named_parameters() if "personamux_" not in n]
    assert all(g is None for g in base_grads)


def test_training_without_persona_ids_fails_loudly():
    model = mux()
    model.train()
    ids = ids_batch(2, 5)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        model(input_ids=ids, labels=ids)


def test_disable_adapter_gives_base_model_and_merge_is_refused():
    model = mux()
    ids = ids_batch(2, 6)
    base = make_model("llama")(input_ids=ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids, persona_ids=["a", "b"]).logits, base)
    assert model(input_ids=ids, persona_ids=["a", "b"]).logits.shape[1] == 6 + N_VIRTUAL
    with pytest.raises(ValueError, match="no weights to merge"):
        model.merge_and_unload()
    unloaded = model.unload()
    torch.testing.assert_close(unloaded(input_ids=ids).logits, base)


# -- files -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip(tmp_path, arch, dtype):
    model = mux(arch, dtype)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "personas",
    ]
    for name in ("a", "b", "c"):
        assert os.path.getsize(tmp_path / "personas" / f"{name}.safetensors") <= 1024
    ids = ids_batch(2, 6)
    expected = model(input_ids=ids, persona_ids=["c", "a"]).logits
    reloaded = PeftModel.from_pretrained(make_model(arch, dtype), tmp_path)
    assert reloaded.personas == []
    assert reloaded.load_persona("c") == "c" and reloaded.load_persona("a") == "a"
    torch.testing.assert_close(reloaded(input_ids=ids, persona_ids=["c", "a"]).logits, expected, atol=0, rtol=0)
    assert reloaded.active_persona == "a"
    assert sorted(reloaded.available_persona_files()) == ["a", "b", "c"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert str(tmp_path) not in json.dumps(config), "no absolute path in adapter_config.json"


def test_save_persona_and_grouped_names(tmp_path):
    model = mux(personas=("hamlet/hamlet", "hamlet/ophelia"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "personas" / "hamlet" / "ophelia.safetensors").is_file()
    model.add_persona("macbeth/lady_macbeth", mixture=torch.ones(6))
    path = model.save_persona("macbeth/lady_macbeth")
    assert path == str(tmp_path / "personas" / "macbeth" / "lady_macbeth.safetensors")
    other = tmp_path / "elsewhere"
    model.save_persona("hamlet/ophelia", other)
    fresh = mux(personas=())
    shared = {
        k: v
        for k, v in model.get_base_model().get_input_embeddings().state_dict().items()
        if "personamux_mixture" not in k
    }
    fresh.get_base_model().get_input_embeddings().load_state_dict(shared, strict=False)
    assert fresh.load_persona(str(other / "personas" / "hamlet" / "ophelia.safetensors")) == "hamlet/ophelia"
    torch.testing.assert_close(fresh.get_mixture("hamlet/ophelia"), model.get_mixture("hamlet/ophelia"))


def test_persona_file_validation(tmp_path):
    model = mux()
    model.save_pretrained(tmp_path)
    path = tmp_path / "personas" / "a.safetensors"
    other = get_peft_model(make_model(), PersonaMuxConfig(**SMALL))
    with torch.no_grad():  # another codebook
        other.get_base_model().get_input_embeddings().personamux_codebook["default"].add_(1.0)
    with pytest.raises(PersonaFileError, match="fitted to codebook"):
        other.load_persona(str(path))
    assert other.load_persona(str(path), strict=False) == "a"

    def corrupt(tensor, name):
        bad = tmp_path / f"{name}.safetensors"
        meta = {"name": name, "codebook_fingerprint": model.codebook_fingerprint()}
        save_file({"mixture": tensor}, str(bad), metadata=meta)
        return str(bad)

    with pytest.raises(PersonaFileError, match="shape"):
        model.load_persona(corrupt(torch.zeros(5), "short"))
    with pytest.raises(PersonaFileError, match="floating point"):
        model.load_persona(corrupt(torch.zeros(6, dtype=torch.int32), "ints"))
    with pytest.raises(PersonaFileError, match="NaN"):
        model.load_persona(corrupt(torch.full((6,), float("nan")), "nans"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PersonaFileError, match="not a readable"):
        model.load_persona(str(junk))
    with pytest.raises(KeyError, match="Unknown persona 'nobody'"):
        model.load_persona("nobody")
    with pytest.raises(ValueError, match="Invalid persona name"):
        model.load_persona("../escape")
    assert load_file(str(path))["mixture"].dtype == torch.float32


def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch):
    import peft_personamux.persona_files as pf

    model = mux()
    model.save_pretrained(tmp_path)
    path = tmp_path / "personas" / "a.safetensors"
    before = path.read_bytes()
    model.set_mixture("a", torch.ones(6))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pf, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_persona("a")
    assert path.read_bytes() == before
    assert [p for p in os.listdir(path.parent) if p.startswith(".tmp")] == []


def test_fresh_process_round_trip_and_auto_model(tmp_path):
    """save -> a new Python process that imports the plugin -> identical logits, also via AutoPeftModel."""
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(make_model("llama"), PersonaMuxConfig(**SMALL))
    model.add_personas(["a", "b"], mixtures=torch.randn(2, 6))
    model.save_pretrained(tmp_path / "adapter")
    ids = ids_batch(2, 6)
    torch.save({"ids": ids, "logits": model(input_ids=ids, persona_ids=["b", "a"]).logits}, tmp_path / "ref.pt")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    script = textwrap.dedent(
        f"""
        import torch, peft_personamux
        from peft import AutoPeftModelForCausalLM, PeftConfig
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        assert type(PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})).__name__ == "PersonaMuxConfig"
        model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})
        model.load_persona("a"); model.load_persona("b")
        out = model(input_ids=ref["ids"], persona_ids=["b", "a"]).logits
        torch.testing.assert_close(out, ref["logits"], atol=0, rtol=0)
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_print_trainable_parameters(capsys):
    model = mux()
    model.print_trainable_parameters()
    # W: 6*3*32, b: 4*32, table: 3*6
    assert f"trainable params: {6 * 3 * 32 + 4 * 32 + 3 * 6:,}" in capsys.readouterr().out


def test_tokenizer_kwargs_never_trust_remote_code(tmp_path, monkeypatch):
    text = dict(bias_init="text", init_text="To be", tokenizer_name_or_path="some/tokenizer")
    with pytest.warns(UserWarning, match="trust_remote_code"):
        config = PersonaMuxConfig(**SMALL, **text, tokenizer_kwargs={"trust_remote_code": True, "use_fast": False})
    assert config.tokenizer_kwargs == {"use_fast": False}
    # a downloaded adapter_config.json that asks for it
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["tokenizer_kwargs"]["trust_remote_code"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="trust_remote_code"):
        assert "trust_remote_code" not in PeftConfig.from_pretrained(tmp_path).tokenizer_kwargs
    # and set after construction: dropped where the tokenizer is loaded
    import transformers

    seen = {}

    def fake_tokenizer(name, **kwargs):
        seen.update(kwargs)
        return lambda text, add_special_tokens: {"input_ids": [5, 6, 7]}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    config.tokenizer_kwargs["trust_remote_code"] = True
    with pytest.warns(UserWarning, match="trust_remote_code"):
        get_peft_model(make_model(), config)
    assert seen == {"use_fast": False}


def test_persona_method_attaches_a_function_and_refuses_a_taken_name():
    from peft_personamux.tuner.model import PersonaMuxModel, persona_method

    def personas_counted(model) -> int:
        return model.num_personas

    try:
        persona_method(personas_counted)
        assert mux().personas_counted() == 3  # reachable on the PeftModel
    finally:
        delattr(PersonaMuxModel, "personas_counted")

    def forward(model):  # pragma: no cover - never attached
        return None

    with pytest.raises(ValueError, match="already has a method 'forward'"):
        persona_method(forward)
    assert callable(mux().blend_personas)  # attached by peft_personamux.arithmetic on import


def test_threads_calling_one_model_each_get_their_own_personas():
    """The soft prompt a call asks for is per thread: two threads inside forward at once, with different personas,
    get what each gets alone (both requests are open before either embedding reads one)."""
    import threading

    from tiny_models import batch_for

    model = mux()
    batch = batch_for(model)
    personas = {"a": torch.tensor([0, 0, 0, 0]), "b": torch.tensor([2, 2, 2, 2])}
    with torch.no_grad():
        alone = {k: model(**{**batch, "persona_ids": ids}).logits for k, ids in personas.items()}
    assert not torch.allclose(alone["a"], alone["b"])
    layer = model.base_model.personamux_layer
    embed, barrier = layer.base_layer.forward, threading.Barrier(2, timeout=30)

    def both_inside(*args, **kwargs):  # each thread waits here, after opening its request, before it is read
        barrier.wait()
        return embed(*args, **kwargs)

    layer.base_layer.forward = both_inside
    together: dict[str, torch.Tensor] = {}

    def call(key: str) -> None:
        with torch.no_grad():
            together[key] = model(**{**batch, "persona_ids": personas[key]}).logits

    threads = [threading.Thread(target=call, args=(k,)) for k in personas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    layer.base_layer.forward = embed
    for key in personas:
        torch.testing.assert_close(together[key], alone[key])
    assert layer.request is None  # nothing left open
