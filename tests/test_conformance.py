"""peft's generic adapter checks, as every built-in method passes them, run on Persona-Mux.

Modelled on peft's own common tests (``tests/testing_common.py``): save/load round trips, generate, half precision,
training with and without gradient checkpointing, ``disable_adapter``, ``delete_adapter``, ``unload``,
``low_cpu_mem_usage`` and ``device_map``, over tiny Llama, Qwen2 and GPT-2 models.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from tiny_models import ARCHS, DTYPES, N_VIRTUAL, SMALL, make_model

from peft_personamux import PersonaMuxConfig, PersonaMuxLayer

HALF = [torch.bfloat16, torch.float16]
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def peft_model(arch, dtype=torch.float32, personas=("a", "b"), **kwargs):
    model = get_peft_model(make_model(arch, dtype), PersonaMuxConfig(**SMALL), **kwargs)
    if personas:
        g = torch.Generator().manual_seed(1)
        model.add_personas(list(personas), mixtures=torch.randn(len(personas), SMALL["num_codes"], generator=g))
    return model


def inputs(batch=2, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, length), generator=g)


def adapter_params(model, adapter="default"):
    return {n: p for n, p in model.named_parameters() if "personamux_" in n and n.endswith(f".{adapter}")}


def no_meta(model):
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


# -- save / load ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_pretrained_round_trip(tmp_path, arch, dtype):
    model = peft_model(arch, dtype)
    model.save_pretrained(tmp_path)
    ids = inputs()
    loaded = PeftModel.from_pretrained(make_model(arch, dtype), tmp_path)
    saved, restored = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert sorted(saved) == sorted(restored) and len(saved) == 2  # W and b; personas have their own files
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    differ = {
        k for k, v in loaded.peft_config["default"].to_dict().items() if model.peft_config["default"].to_dict()[k] != v
    }
    assert differ == {"inference_mode"}  # loaded adapters are frozen unless is_trainable=True
    # nothing loaded yet: both use the default persona
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    for name in ("a", "b"):
        loaded.load_persona(name, activate=False)
    expected = model(input_ids=ids, persona_ids=["b", "a"]).logits
    torch.testing.assert_close(loaded(input_ids=ids, persona_ids=["b", "a"]).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_with_config_object(tmp_path, arch):
    model = peft_model(arch)
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, PersonaMuxConfig)
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path, config=config)
    ids = inputs()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_is_not_trainable_unless_asked(tmp_path, arch):
    peft_model(arch).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(make_model(arch), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("personamux_" in n for n in names)


# -- generate and half precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_generate(arch):
    model = peft_model(arch)
    ids = inputs()
    mask = torch.ones_like(ids)
    positional = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    keywords = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(positional, keywords) and positional.shape == (2, 10)
    assert torch.equal(positional[:, :6], ids)
    out = model.generate(input_ids=ids, persona_ids=["a", "b"], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)
    sampled = model.generate(input_ids=ids, persona_ids="a", max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (4, 9)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", HALF)
def test_generate_half_precision(arch, dtype):
    model = peft_model(arch, dtype)
    out = model.generate(input_ids=inputs(), persona_ids=["a", "b"], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)
    logits = model(input_ids=inputs(), persona_ids="a").logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(arch, dtype, autocast):
    model = peft_model(arch, dtype, autocast_adapter_dtype=autocast)
    params = adapter_params(model)
    assert len(params) == 3
    assert {p.dtype for p in params.values()} == {torch.float32 if autocast else dtype}
    assert model(input_ids=inputs(), persona_ids="b").logits.dtype == dtype


# -- training --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_training(arch, checkpointing):
    base = make_model(arch)
    if checkpointing:
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    model = get_peft_model(base, PersonaMuxConfig(**SMALL))
    model.add_personas(["a", "b"], mixtures=torch.randn(2, 6))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = inputs()
    loss = model(input_ids=ids, labels=ids, persona_ids=["a", "b"]).loss
    loss.backward()
    for n, p in model.named_parameters():
        if "personamux_" in n:  # every adapter parameter gets a gradient, no base model parameter does
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(adapter_params(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_with_default_persona(arch):
    """No persona registered (a fresh adapter): the bias tokens and the codebook still train."""
    model = peft_model(arch, personas=())
    model.train()
    ids = inputs()
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.get_base_model().get_input_embeddings()
    assert layer.personamux_bias["default"].grad.abs().sum() > 0


# -- disable_adapter -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_disable_adapter_is_the_base_model(arch, dtype):
    model = peft_model(arch, dtype)
    base = make_model(arch, dtype)
    ph = model.peft_config["default"].placeholder_token_id
    ids = inputs()
    ids[1, 2] = ph  # the base model sees the placeholder id as an ordinary token
    holey = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]])
    gen = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with model.disable_adapter():
        for mask in (None, holey):
            out = model(input_ids=ids, attention_mask=mask, persona_ids=["a", "b"]).logits
            torch.testing.assert_close(out, base(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
        disabled = model.generate(input_ids=ids, attention_mask=holey, **gen)
    expected = base.generate(input_ids=ids, attention_mask=holey, **gen)
    assert torch.equal(disabled.sequences, expected.sequences)
    for got, want in zip(disabled.scores, expected.scores):
        torch.testing.assert_close(got, want)
        assert torch.isfinite(got[:, ph]).all(), "the placeholder is only suppressed while the adapter is on"
    assert model(input_ids=ids[:1], persona_ids="a").logits.shape[1] == 6 + N_VIRTUAL  # back on after the block


# -- delete_adapter and unload ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_delete_adapter(arch):
    model = peft_model(arch)
    ids = inputs()
    expected = model(input_ids=ids, persona_ids=["a", "b"]).logits
    model.add_adapter("other", PersonaMuxConfig(**SMALL))
    model.set_adapter("other")
    assert model.personas == [] and model(input_ids=ids).logits.shape[1] == 6 + N_VIRTUAL
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and "other" not in model.peft_config
    assert not [n for n, _ in model.named_parameters() if n.endswith(".other")]
    assert model.personas == ["a", "b"]
    torch.testing.assert_close(model(input_ids=ids, persona_ids=["a", "b"]).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_delete_last_adapter_leaves_the_base_model(arch, dtype):
    model = peft_model(arch, dtype)
    ids = inputs()
    base = make_model(arch, dtype)(input_ids=ids).logits
    model.delete_adapter("default")
    assert model.peft_config == {} and not adapter_params(model)
    torch.testing.assert_close(model.base_model(input_ids=ids).logits, base, atol=0, rtol=0)
    torch.testing.assert_close(model.base_model.model(input_ids=ids).logits, base, atol=0, rtol=0)
    out = model.base_model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 8)
    with pytest.raises(ValueError, match="no active Persona-Mux adapter"):
        model.base_model.add_persona("a")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unload_then_lora(tmp_path, arch, dtype):
    model = peft_model(arch, dtype)
    ids = inputs()
    base = make_model(arch, dtype)(input_ids=ids).logits
    unloaded = model.unload()
    assert not any(isinstance(m, PersonaMuxLayer) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    torch.testing.assert_close(unloaded(input_ids=ids).logits, base, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*peft_config")  # "Already found a `peft_config` attribute"
        lora = get_peft_model(unloaded, LoraConfig(target_modules=LORA_TARGETS[arch], task_type="CAUSAL_LM"))
    assert list(lora.peft_config) == ["default"] and lora.peft_config["default"].peft_type == "LORA"
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()


# -- low_cpu_mem_usage and device_map --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_cpu_mem_usage(tmp_path, arch, dtype):
    model = peft_model(arch, dtype)
    model.save_pretrained(tmp_path)
    ids = inputs()
    normal = PeftModel.from_pretrained(make_model(arch, dtype), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = PeftModel.from_pretrained(make_model(arch, dtype), tmp_path, low_cpu_mem_usage=True)
    assert not [w for w in caught if "missing" in str(w.message).lower()], "the table is not a missing key"
    assert no_meta(fast) == []
    for loaded in (normal, fast):
        loaded.load_persona("b")
    torch.testing.assert_close(fast(input_ids=ids).logits, normal(input_ids=ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(fast(input_ids=ids).logits, model(input_ids=ids, persona_ids="b").logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_device_map(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    make_model(arch).save_pretrained(tmp_path / "base")
    model = peft_model(arch)
    model.save_pretrained(tmp_path / "adapter")
    ids = inputs()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map={"": "cpu"})
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", device_map={"": "cpu"})
    assert no_meta(loaded) == []
    loaded.load_persona("a")
    expected = model(input_ids=ids, persona_ids="a").logits
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map={"": "cpu"}), model.peft_config["default"]
    )
    assert {p.device.type for p in fresh.parameters()} == {"cpu"}
