"""Prompt format and collator: shapes, masks, labels, placeholders, truncation, generation inputs.

The tiny tokenizer and model helpers live in tiny_models.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_mux_model, make_rows, make_tokenizer

from peft_personamux import PERSONA_PLACEHOLDER
from peft_personamux.collator import (
    IGNORE_INDEX,
    PersonaMuxCollator,
    build_generation_inputs,
    encode_example,
    encode_prompt,
)
from peft_personamux.prompting import DEFAULT_INSTRUCTION, format_example, user_message

PLACEHOLDER = 303  # any id outside the tiny tokenizer's 300


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    return make_tokenizer(chat_template=False)


def test_user_message_places_the_placeholder_after_the_text_persona():
    assert user_message("Hi", "A Danish prince.") == (
        f"A Danish prince. {PERSONA_PLACEHOLDER} {DEFAULT_INSTRUCTION}\n\nPrompt: Hi"
    )
    assert PERSONA_PLACEHOLDER not in user_message("Hi", None)
    assert PERSONA_PLACEHOLDER not in user_message("Hi", "   ")


@pytest.mark.parametrize("chat", [True, False])
def test_format_example_splits_prompt_and_response(tokenizer, plain_tokenizer, chat):
    tok = tokenizer if chat else plain_tokenizer
    example = format_example(tok, "Who goes there?", "Nay, answer me.", "A guard.")
    assert example.response.startswith("Nay, answer me.")
    assert example.response.endswith(tok.eos_token)
    if chat:
        assert example.prompt.endswith("<|im_start|>assistant\n")
        full = tok.apply_chat_template(
            [
                {"role": "user", "content": user_message("Who goes there?", "A guard.")},
                {"role": "assistant", "content": "Nay, answer me."},
            ],
            tokenize=False,
        )
        assert (example.prompt + example.response).strip() == full.strip()
    else:
        assert example.prompt.startswith("User: A guard. ") and example.prompt.endswith("\nAssistant: ")
    assert format_example(tok, "Who goes there?").response == ""


def test_format_example_refuses_a_missing_template(plain_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        format_example(plain_tokenizer, "Hi", "Ho", use_chat_template=True)


@pytest.mark.parametrize("chat", [True, False])
def test_collator_masks_and_labels(tokenizer, plain_tokenizer, chat):
    tok = tokenizer if chat else plain_tokenizer
    rows = make_rows()
    rows[0]["text_persona"] = "A melancholy prince."
    collator = PersonaMuxCollator(tok, PLACEHOLDER, persona_index={"play/a": 0, "play/b": 1})
    batch = collator([rows[0], rows[4], rows[1]])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
    assert batch["persona_ids"].tolist() == [0, 1, 0]
    # one placeholder in the row with a text persona, none where the model puts the prompt first
    assert (ids == PLACEHOLDER).sum(-1).tolist() == [1, 0, 0]
    lengths = mask.sum(-1)
    for row, feature in enumerate([rows[0], rows[4], rows[1]]):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (labels[row, n:] == IGNORE_INDEX).all()
        target = labels[row, :n][labels[row, :n] != IGNORE_INDEX]
        first = int((labels[row] != IGNORE_INDEX).nonzero()[0, 0])
        assert (labels[row, :first] == IGNORE_INDEX).all()  # no loss on the prompt
        assert torch.equal(labels[row, first:n], ids[row, first:n])  # the response is contiguous and labelled
        assert tok.decode(target) == feature["response"] + tok.eos_token
        assert (ids[row, :first] == PLACEHOLDER).sum() == int(row == 0)  # the placeholder is in the prompt


def test_collator_text_personas_mapping_and_persona_ids_column(tokenizer):
    rows = make_rows()
    collator = PersonaMuxCollator(tokenizer, PLACEHOLDER, text_personas={"play/b": "A king."})
    batch = collator([{**rows[0], "persona_ids": 5}, {**rows[4], "persona_ids": 2}])
    assert batch["persona_ids"].tolist() == [5, 2]
    assert (batch["input_ids"] == PLACEHOLDER).sum(-1).tolist() == [0, 1]


def test_collator_errors_name_the_fix(tokenizer):
    row = make_rows()[0]
    with pytest.raises(ValueError, match="persona_index"):
        PersonaMuxCollator(tokenizer, PLACEHOLDER)([row])
    with pytest.raises(KeyError, match="play/a"):
        PersonaMuxCollator(tokenizer, PLACEHOLDER, persona_index={})([row])
    with pytest.raises(ValueError, match="`max_prompt_tokens` must be a positive integer"):
        PersonaMuxCollator(tokenizer, PLACEHOLDER, max_prompt_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        PersonaMuxCollator(tokenizer, PLACEHOLDER, persona_index={"play/a": 0})([{"persona": "play/a"}])


def test_truncation_keeps_placeholder_template_and_the_end_of_the_prompt(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200)) + " THE END?"
    persona = "A very talkative prince who never stops. " * 10
    fixed = len(encode_prompt(tokenizer, "x", PLACEHOLDER, "y"))  # template, instruction, placeholder
    limit = fixed + 40
    cut = encode_example(
        tokenizer,
        long_prompt,
        "Ay, my lord, " * 20,
        PLACEHOLDER,
        persona,
        max_prompt_tokens=limit,
        max_response_tokens=5,
    )
    prompt_len = next(i for i, x in enumerate(cut.labels) if x != IGNORE_INDEX)
    assert limit - 3 <= prompt_len <= limit
    assert cut.input_ids.count(PLACEHOLDER) == 1
    assert sum(x != IGNORE_INDEX for x in cut.labels) == 5
    text = tokenizer.decode(cut.input_ids[:prompt_len])
    assert text.endswith("THE END?<|im_end|>\n<|im_start|>assistant\n")  # the prompt lost its start
    assert text.startswith("<|im_start|>user\nA very talkative")  # the text persona lost its end
    kept_prompt = text.split("Prompt: ")[1].split("<|im_end|>")[0]
    assert 10 <= len(tokenizer(kept_prompt)["input_ids"]) <= 30  # both parts got about half of the room
    # a short prompt is unchanged by a generous limit
    assert encode_example(tokenizer, "Hi", "Ho", PLACEHOLDER, max_prompt_tokens=200) == encode_example(
        tokenizer, "Hi", "Ho", PLACEHOLDER
    )


def test_truncation_cuts_a_long_text_persona_before_a_short_prompt(tokenizer):
    persona = "A very talkative prince who never stops. " * 10
    limit = len(encode_prompt(tokenizer, "Hi there", PLACEHOLDER, "y")) + 10
    ids = encode_prompt(tokenizer, "Hi there", PLACEHOLDER, persona, max_prompt_tokens=limit)
    assert len(ids) <= limit and ids.count(PLACEHOLDER) == 1
    assert "Prompt: Hi there<|im_end|>" in tokenizer.decode(ids)


def test_truncation_warns_when_the_template_alone_is_too_long(tokenizer, caplog):
    ids = encode_prompt(tokenizer, "Hi there " * 20, PLACEHOLDER, "A king.", max_prompt_tokens=5)
    assert ids.count(PLACEHOLDER) == 1 and len(ids) > 5
    assert "Raise max_prompt_tokens" in caplog.text


def test_generation_inputs_are_left_padded(tokenizer):
    batch = build_generation_inputs(tokenizer, ["Hi", "A much longer prompt here"], [None, "A king."], PLACEHOLDER)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[:, -1].all() and not mask[0, 0]
    assert (ids == PLACEHOLDER).sum(-1).tolist() == [0, 1]
    text = tokenizer.decode(ids[1][mask[1].bool()])
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="text personas"):
        build_generation_inputs(tokenizer, ["a", "b"], ["x"], PLACEHOLDER)


def test_collated_batch_runs_through_the_model(tokenizer):
    model = make_mux_model(tokenizer)
    model.add_personas(["play/a", "play/b"])
    collator = PersonaMuxCollator.for_model(model, tokenizer, text_personas={"play/a": "A prince."})
    assert collator.placeholder_token_id == model.peft_config["default"].placeholder_token_id
    batch = collator(make_rows()[::3])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    gen = build_generation_inputs(tokenizer, ["Hi"], "A prince.", collator.placeholder_token_id)
    seq = model.generate(**gen, persona_ids=["play/a"], max_new_tokens=3, do_sample=False)
    assert seq.shape[1] == gen["input_ids"].shape[1] + 3
