"""Shared test helpers: tiny random causal LMs and a tiny tokenizer built in code (no hub), small Persona-Mux models,
persona rows, and a saved codebook folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_personamux import PersonaMuxConfig

if TYPE_CHECKING:  # imported where used: most tests never train
    from peft_personamux.training import CodebookTrainingArguments, PersonaFitArguments

VOCAB = 128
# torch.compile's CPU backend (inductor) builds C++: tests of compiled paths skip without a compiler
needs_compiler = pytest.mark.skipif(
    not shutil.which("c++") and not shutil.which("g++"), reason="inductor needs a C++ compiler"
)
ARCHS = ["llama", "qwen2", "gpt2"]
DTYPES = [torch.float32, torch.bfloat16]
SMALL = dict(num_codes=6, tokens_per_code=3, num_bias_tokens=4, task_type="CAUSAL_LM")
N_VIRTUAL = 7  # SMALL's soft-prompt length at a non-zero bias scale


# -- models of a given family over a 128-id vocabulary ------------------------------------------------------------


def make_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 2-layer, 32-wide random model of the given family."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    else:  # pragma: no cover
        raise ValueError(arch)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def mux(arch="llama", dtype=torch.float32, personas=("a", "b", "c"), seed=0, **overrides):
    """A Persona-Mux model (SMALL) with random, distinct mixture vectors for the given personas."""
    model = get_peft_model(make_model(arch, dtype), PersonaMuxConfig(**{**SMALL, **overrides}))
    if personas:
        g = torch.Generator().manual_seed(seed + 1)
        model.add_personas(list(personas), mixtures=torch.randn(len(personas), SMALL["num_codes"], generator=g))
    return model


def batch_for(model, with_prefix=(True, True, False, True)):
    """Right-padded rows: [prefix] placeholder prompt response, different lengths, one row without a placeholder."""
    ph = model.peft_config["default"].placeholder_token_id
    g = torch.Generator().manual_seed(2)
    shared = [5, 6, 7, 8]
    rows, labels = [], []
    for i, has in enumerate(with_prefix):
        prefix = (shared + [9 + i] * (i % 2)) if has else []  # two distinct prefixes (and one row with none)
        prompt = torch.randint(10, 100, (3 + i,), generator=g).tolist()
        response = torch.randint(10, 100, (2 + 2 * i,), generator=g).tolist()
        ids = prefix + ([ph] if has else []) + prompt + response
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(response)) + response)
    return right_padded(rows, labels, [0, 1, 2, 0])


def right_padded(rows: list[list[int]], labels: list[list[int]], personas: list[int]) -> dict[str, torch.Tensor]:
    """A collator-style batch of token rows and their labels, right padded with 0 (labels with -100)."""
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, lab = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
    for i, (ids, lb) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)], mask[i, : len(ids)], lab[i, : len(ids)] = torch.tensor(ids), 1, torch.tensor(lb)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab, "persona_ids": torch.tensor(personas)}


def shared_batch_for(model):
    """Right-padded rows in which several share a prefix and a persona (and one pair shares a persona but not the
    prefix), of different prompt and response lengths: what `loss`'s shared soft prompt groups."""
    ph = model.peft_config["default"].placeholder_token_id
    g = torch.Generator().manual_seed(3)
    prefixes = [[5, 6, 7, 8], [5, 6, 7, 8, 9], []]
    spec = [(0, 0), (0, 0), (1, 1), (0, 1), (1, 1), (2, 2), (2, 2), (0, 0)]  # (prefix, persona) per row
    rows, labels = [], []
    for i, (prefix, _) in enumerate(spec):
        prompt = torch.randint(10, 100, (2 + i % 3,), generator=g).tolist()
        response = torch.randint(10, 100, (1 + i % 4,), generator=g).tolist()
        ids = prefixes[prefix] + ([ph] if prefixes[prefix] else []) + prompt + response
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(response)) + response)
    return right_padded(rows, labels, [persona for _, persona in spec])


def template_batch_for(model):
    """Right-padded rows shaped like the chat template's: [prefix] placeholder, an instruction every row has, a
    prompt, an assistant header, a response. Groups of one (prefix, persona) share the instruction (rows 0 and 1
    share their prompt too, but row 2 of their group does not, so the group's common run is the instruction); one
    group has no prefix (stage 1); one row is alone in its group, so its run ends right before its last header
    token, whose successor is a label."""
    ph = model.peft_config["default"].placeholder_token_id
    g = torch.Generator().manual_seed(4)
    prefixes = [[5, 6, 7, 8], []]
    instruction, header = [30, 31, 32, 33, 34], [40, 41]
    same_prompt = torch.randint(50, 100, (3,), generator=g).tolist()
    spec = [(0, 0), (0, 0), (0, 0), (1, 1), (1, 1), (1, 1), (0, 2)]  # (prefix, persona) per row
    rows, labels = [], []
    for i, (prefix, _) in enumerate(spec):
        prompt = same_prompt if i in (0, 1) else torch.randint(50, 100, (1 + i % 3,), generator=g).tolist()
        response = torch.randint(10, 100, (1 + i % 4,), generator=g).tolist()
        ids = prefixes[prefix] + [ph] + instruction + prompt + header + response
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(response)) + response)
    return right_padded(rows, labels, [persona for _, persona in spec])


# -- a tiny tokenizer with a chat template, and models sized for it -----------------------------------------------


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "To be, or not to be, that is the question.",
    "Good night, sweet prince. The rest is silence.",
    "Now is the winter of our discontent.",
    "User: Assistant: Prompt: Please roleplay as the described character.",
]
SPARE_IDS = 4  # model vocabulary rows past the tokenizer's, like padded real vocabularies; the placeholder uses one


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ~300 ids trained in milliseconds, ChatML template or none."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def make_base(
    tokenizer, seed: int = 0, intermediate: int = 64, heads: int = 2, positions: int = 512
) -> LlamaForCausalLM:
    """A random 2-layer Llama with hidden size 32 for ``tokenizer`` (``heads`` attention heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer) + SPARE_IDS,
            hidden_size=32,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )


def small_llama(vocab_size: int, seed: int = 0, **config) -> LlamaForCausalLM:
    """A random 2-layer Llama of hidden size 16 for a test's own tokenizer (``config`` overrides LlamaConfig)."""
    defaults = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = LlamaConfig(vocab_size=vocab_size, **{**defaults, "num_key_value_heads": 2, **config})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_base(tokenizer, seed: int = 0, intermediate: int = 64) -> LlamaForCausalLM:
    """For the subnetwork tests: `make_base` with 4 heads of 8 and ``intermediate`` MLP neurons, in eval mode."""
    model = make_base(tokenizer, seed, intermediate, heads=4, positions=256).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_mux_model(tokenizer, seed: int = 0, **config):
    """`make_base` wrapped in a small Persona-Mux adapter (4 codes of 2 tokens, 3 bias tokens)."""
    base = make_base(tokenizer, seed)
    config = {"num_codes": 4, "tokens_per_code": 2, "num_bias_tokens": 3, **config}
    return get_peft_model(base, PersonaMuxConfig(task_type="CAUSAL_LM", **config))


def make_rows(personas=("play/a", "play/b"), per_persona: int = 4) -> list[dict[str, str]]:
    words = ["night", "prince", "winter", "question"]
    return [
        {
            "persona": name,
            "prompt": f"Is this the {words[i % 4]}?",
            "response": f"{name[-1]} says: that is the {words[(i + k) % 4]}.",
            "group": name.split("/")[0],
        }
        for k, name in enumerate(personas)
        for i in range(per_persona)
    ]


def make_workspace(root: Path, personas: tuple[str, ...]) -> Path:
    """``root`` with what the command tests run on: ``tiny/`` (a saved `make_base` model and its tokenizer),
    ``data.jsonl`` (6 rows of each persona) and ``lines.txt`` (a user's lines, one with a prompt)."""
    tokenizer = make_tokenizer()
    make_base(tokenizer).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rows = make_rows(personas=personas, per_persona=6)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lines.txt").write_text("Is this the night?\tAy, the night.\nGood night, prince.\n\nNow is the winter.\n")
    return root


# -- training arguments for short, quiet runs ------------------------------------------------------------------

QUIET = {"disable_tqdm": True, "report_to": "none", "save_strategy": "no", "logging_steps": 1, "seed": 0}


def codebook_args(tmp_path, **kwargs) -> CodebookTrainingArguments:
    from peft_personamux.training import CodebookTrainingArguments

    defaults = {"per_device_train_batch_size": 4, "num_train_epochs": 2, "learning_rate": 3e-2, **QUIET}
    return CodebookTrainingArguments(output_dir=str(tmp_path), **{**defaults, **kwargs})


def fit_args(tmp_path, **kwargs) -> PersonaFitArguments:
    from peft_personamux.training import PersonaFitArguments

    return PersonaFitArguments(output_dir=str(tmp_path), **{"max_steps": 4, "learning_rate": 0.2, **QUIET, **kwargs})


# -- a codebook folder as `personamux pretrain` writes it ---------------------------------------------------------

PERSONAS = [f"play/p{i}" for i in range(8)] + ["other/solo"]


def make_codebook(root: Path, personas: list[str] = PERSONAS, seed: int = 0) -> tuple[Path, Path]:
    """``(model_dir, codebook_dir)`` under ``root``: a tiny random base model and a codebook with a few personas.

    The end-of-turn token's output row is zeroed so that greedy answers run to their length limit instead of
    stopping at a random first token.
    """
    tokenizer = make_tokenizer()
    model = make_mux_model(tokenizer, seed=seed)
    torch.manual_seed(seed)
    model.add_personas(personas, mixtures=torch.randn(len(personas), 4) * 2)
    base = model.get_base_model()
    with torch.no_grad():
        base.lm_head.weight[tokenizer.eos_token_id] = 0
    model_dir, codebook_dir = root / "tiny", root / "codebook"
    model.save_pretrained(codebook_dir)
    (codebook_dir / "text_personas.json").write_text(json.dumps({personas[0]: "A grumpy old king."}))
    model.unload().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, codebook_dir
