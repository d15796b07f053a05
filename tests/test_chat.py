"""`personamux chat` and the conversation format: driven in a pseudo-terminal as a person would, and in process."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from tiny_models import make_codebook, make_tokenizer

from peft_personamux import PERSONA_PLACEHOLDER
from peft_personamux.chat import ChatArguments, ChatExit, ChatSession
from peft_personamux.codebook_loading import load_codebook_model, read_codebook_info
from peft_personamux.conversation import encode_conversation, num_positions, trim_history
from peft_personamux.prompting import DEFAULT_INSTRUCTION

PLACEHOLDER = 303


@pytest.fixture(scope="module")
def codebook(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_dir, codebook_dir = make_codebook(root)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 8192  # room for replies long enough to interrupt
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir, codebook_dir


@pytest.fixture(scope="module")
def loaded(codebook):
    model_dir, codebook_dir = codebook
    model, tokenizer = load_codebook_model(codebook_dir, str(model_dir))
    return model, tokenizer, read_codebook_info(codebook_dir)


def session(loaded, **kwargs) -> ChatSession:
    model, tokenizer, info = loaded
    kwargs = {"persona": "play/p0", "temperature": 0.0, "max_new_tokens": 6, **kwargs}
    return ChatSession(model, tokenizer, info, ChatArguments(**kwargs))


# -- the conversation format ---------------------------------------------------------------------------------------


def test_persona_head_is_in_the_first_user_turn_only():
    tokenizer = make_tokenizer()
    messages = [
        {"role": "user", "content": "Is this the night?"},
        {"role": "assistant", "content": "Ay."},
        {"role": "user", "content": "Good night."},
    ]
    encoded = encode_conversation(tokenizer, messages, PLACEHOLDER, "A king.", DEFAULT_INSTRUCTION)
    assert encoded.input_ids.count(PLACEHOLDER) == 1
    text = tokenizer.decode(encoded.input_ids)
    assert text.count(DEFAULT_INSTRUCTION) == 1 and text.index("A king.") < text.index("Ay.")
    assert text.endswith("<|im_start|>assistant\n")
    base = encode_conversation(tokenizer, messages, PLACEHOLDER, "A king.", persona=False)
    assert PLACEHOLDER not in base.input_ids and DEFAULT_INSTRUCTION not in tokenizer.decode(base.input_ids)


@pytest.mark.parametrize("text_persona", ["A king.", None])
def test_prefix_is_shared_by_every_conversation_of_a_persona(text_persona):
    tokenizer = make_tokenizer()
    a = encode_conversation(tokenizer, [{"role": "user", "content": "Who?"}], PLACEHOLDER, text_persona)
    b = encode_conversation(tokenizer, [{"role": "user", "content": "Now is the winter."}], PLACEHOLDER, text_persona)
    assert a.prefix_length == b.prefix_length > 0
    assert a.input_ids[: a.prefix_length] == b.input_ids[: b.prefix_length]
    if text_persona:
        assert PLACEHOLDER in a.input_ids[: a.prefix_length]
    assert tokenizer.decode(a.input_ids[: a.prefix_length]).rstrip().endswith("Prompt:")


def test_history_is_cut_oldest_first_never_through_the_soft_prompt():
    tokenizer = make_tokenizer()
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"Question {i} " * 5}, {"role": "assistant", "content": "Ay. " * 5}]
    messages = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "Last?"}]
    full = encode_conversation(tokenizer, messages, PLACEHOLDER, "A king.")
    budget = num_positions(full.input_ids, PLACEHOLDER, 5) - 40
    kept, encoded, dropped = trim_history(tokenizer, messages, PLACEHOLDER, 5, budget, "A king.")
    assert dropped >= 1 and num_positions(encoded.input_ids, PLACEHOLDER, 5) <= budget
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "Last?"
    assert kept[1]["content"] == f"Question {dropped} " * 5  # whole exchanges went, oldest first
    assert encoded.input_ids.count(PLACEHOLDER) == 1
    assert "A king." in tokenizer.decode(encoded.input_ids)
    with pytest.raises(ValueError, match="send a shorter message"):
        trim_history(tokenizer, [{"role": "user", "content": "night " * 200}], PLACEHOLDER, 5, 50, "A king.")
    with pytest.raises(ValueError, match="last message must be the user's"):
        encode_conversation(tokenizer, history, PLACEHOLDER)
    assert PERSONA_PLACEHOLDER not in tokenizer.decode(encoded.input_ids)


# -- the session -----------------------------------------------------------------------------------------------------


def test_session_replies_and_keeps_history(loaded):
    chat = session(loaded)
    reply, dropped = chat.reply("Who goes there?")
    text = "".join(reply)
    assert reply.close() == text.strip() and dropped == 0 and not reply.stopped
    assert [m["role"] for m in chat.history] == ["user", "assistant"]
    again = session(loaded)
    assert again.reply("Who goes there?")[0].close() == text.strip()  # greedy: the same answer


def test_stop_ends_a_reply_early_and_keeps_what_was_said(loaded):
    chat = session(loaded, max_new_tokens=2000)
    reply, _ = chat.reply("Who goes there?")
    first = next(reply)
    reply.stop()
    text = reply.close()
    assert reply.stopped and text.startswith(first.strip())
    assert len(loaded[1](text)["input_ids"]) < 2000 and chat.history[-1]["content"] == text


def test_long_history_is_trimmed_in_the_session(loaded):
    chat = session(loaded, max_context=160)
    dropped = 0
    for _ in range(4):
        reply, cut = chat.reply("Is this the night? " * 3)
        reply.close()
        dropped += cut
    assert dropped >= 1 and len(chat.history) < 8
    ids, _ = chat.prompt("And now?")
    assert num_positions(ids, chat.model.peft_config["default"].placeholder_token_id, 5) <= 160 - 6  # + the reply
    assert len(chat.transcript) == 8  # /save still has everything


def test_commands(loaded, tmp_path):
    chat = session(loaded)
    assert "play/p1" in chat.command("/persona play/p1") and chat.persona == "play/p1"
    assert chat.command("/bias 0.5") == "Bias scale 0.5." and chat.bias_scale == 0.5
    assert "0.7*play/p0" in chat.command("/blend play/p0=0.7, play/p1=0.3") and chat.persona.startswith("blend/")
    assert "*blend/" in chat.command("/personas")
    chat.reply("Hi")[0].close()
    assert "Saved 2 messages" in chat.command(f"/save {tmp_path / 't.json'}")
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["bias_scale"] == 0.5 and saved["messages"][1]["persona"] == chat.persona
    assert chat.command("/reset") == "Conversation cleared." and not chat.history
    assert "/blend" in chat.command("/help")
    for line, match in [
        ("/persona no/body", "Unknown persona"),
        ("/bias -1", ">= 0"),
        ("/bias x", "a number"),
        ("/blend play/p0", "Usage: /blend"),
        ("/blend no/body=1", "Unknown persona"),
        ("/save", "Usage"),
        ("/dance", "Unknown command"),
    ]:
        with pytest.raises((ValueError, KeyError), match=match):
            chat.command(line)
    with pytest.raises(ChatExit):
        chat.command("/quit")


# -- in a terminal ---------------------------------------------------------------------------------------------------


def test_chat_in_a_pseudo_terminal(codebook, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    model_dir, codebook_dir = codebook
    args = ["-m", "peft_personamux.cli", "chat", "--model_name_or_path", str(model_dir), "--codebook"]
    args += [str(codebook_dir), "--persona", "play/p0", "--temperature", "0", "--max_new_tokens", "3000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    # a shell's background job (`pytest ... &`) inherits SIGINT ignored, and so would the chat: restore Ctrl-C
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    child = pexpect.spawn(sys.executable, args, timeout=120, encoding="utf-8", env=env, preexec_fn=restore_sigint)
    try:
        child.expect("Talking to play/p0")
        child.expect("you> ")
        child.sendintr()  # Ctrl-C at the prompt does not leave
        child.expect("Ctrl-D leaves")
        child.sendline("Who goes there?")
        child.expect("play/p0> ")
        child.expect(".{20}")  # the reply streams in
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("you> ")
        child.sendline("/persona play/p1")
        child.expect("Now talking to play/p1")
        child.sendline("/bias 0")
        child.expect("Bias scale 0.")
        child.sendline("And you?")
        child.expect("play/p1> ")
        child.expect(".{20}")
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.sendline(f"/save {tmp_path / 'talk.json'}")
        child.expect("Saved 4 messages")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    assert saved["messages"][3]["persona"] == "play/p1" and saved["messages"][3]["bias_scale"] == 0
    assert all(m["content"] for m in saved["messages"])
