"""A multi-turn conversation with a persona -> prompt token ids, in the format the persona was trained on.

Training puts the text persona, the soft prompt (a placeholder id) and the instruction in the user turn before the
prompt (``prompting.user_message``). A conversation keeps that head in its *first* user turn only; later turns are
plain, and the whole history goes through the tokenizer's chat template (or the ``User:``/``Assistant:`` format when
it has none). Everything before the first user's own text (system turn, text persona, soft prompt, instruction) is
the same for every conversation of a persona: its length is returned as ``prefix_length`` so a server can cache it.
History that no longer fits is dropped oldest exchange first, never the first turn's head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .inputs import encode_with_placeholder
from .prompting import DEFAULT_INSTRUCTION, has_chat_template, user_message

ROLES = ("system", "user", "assistant")
_MARK = "\u2063PERSONAMUX-USER-TEXT\u2063"  # never tokenized: only marks where the first user's text starts


@dataclass
class EncodedConversation:
    input_ids: list[int]  # the prompt, ending with the assistant generation prompt; one placeholder at most
    prefix_length: int  # leading ids shared by every conversation with the same system turn and persona head


def check_messages(messages: Sequence[dict]) -> list[dict[str, str]]:
    """Messages as ``{"role", "content"}`` with roles system/user/assistant, ending with a user turn."""
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}.")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be text, got {type(content).__name__}.")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise ValueError("messages need at least one user turn.")
    if out[-1]["role"] != "user":
        raise ValueError(f"The last message must be the user's, got role {out[-1]['role']!r}.")
    return out


def persona_turns(
    messages: Sequence[dict], text_persona: str | None, instruction: str = DEFAULT_INSTRUCTION, persona: bool = True
) -> list[dict[str, str]]:
    """``messages`` with the persona head (text persona, placeholder, instruction) in the first user turn."""
    out = [dict(m) for m in messages]
    if persona:
        first = next(i for i, m in enumerate(out) if m["role"] == "user")
        out[first]["content"] = user_message(out[first]["content"], text_persona, instruction)
    return out


def render(tokenizer, messages: Sequence[dict]) -> tuple[str, bool]:
    """``(text, use_chat_template)``: the conversation ending with the assistant's generation prompt."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True), True
    eos = tokenizer.eos_token or ""
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"Assistant: {m['content']}{eos}\n")
        else:
            parts.append(f"{m['role'].capitalize()}: {m['content']}\n")
    return "".join(parts) + "Assistant: ", False


def encode_conversation(
    tokenizer,
    messages: Sequence[dict],
    placeholder_token_id: int,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    persona: bool = True,
) -> EncodedConversation:
    """Token ids of ``messages`` (checked with `check_messages`) and the length of their persona prefix.

    ``persona=False`` formats for the base model: no head, no placeholder.
    """
    messages = check_messages(messages)
    text, use_template = render(tokenizer, persona_turns(messages, text_persona, instruction, persona))
    ids = encode_with_placeholder(tokenizer, text, placeholder_token_id, not use_template)
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    marked = messages[:first] + [{"role": "user", "content": _MARK}]
    marked_text, _ = render(tokenizer, persona_turns(marked, text_persona, instruction, persona))
    prefix_text = marked_text.split(_MARK)[0]
    if not text.startswith(prefix_text):  # a template that rewrites earlier turns: nothing is shared
        return EncodedConversation(ids, 0)
    prefix_ids = encode_with_placeholder(tokenizer, prefix_text, placeholder_token_id, not use_template)
    # the last prefix token may merge with the user's first word (" " + "How" -> " How"): keep what both agree on
    length = 0
    for a, b in zip(prefix_ids, ids):
        if a != b:
            break
        length += 1
    return EncodedConversation(ids, min(length, len(ids) - 1))


def num_positions(ids: Sequence[int], placeholder_token_id: int, num_virtual: int) -> int:
    """Positions ``ids`` take in the model: the placeholder becomes ``num_virtual`` tokens (or they come first)."""
    return len(ids) + num_virtual - (1 if placeholder_token_id in ids else 0) if num_virtual else len(ids)


def trim_history(
    tokenizer,
    messages: Sequence[dict],
    placeholder_token_id: int,
    num_virtual: int,
    max_positions: int,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    persona: bool = True,
) -> tuple[list[dict[str, str]], EncodedConversation, int]:
    """Drop the oldest exchanges (after any system turn) until the prompt fits in ``max_positions``.

    Returns ``(messages kept, their encoding, exchanges dropped)``. The persona head moves to the first user turn
    kept. Raises ``ValueError`` when the last user message alone (with the system turn and head) does not fit.
    """
    messages = check_messages(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while True:
        encoded = encode_conversation(
            tokenizer, system + turns, placeholder_token_id, text_persona, instruction, persona
        )
        used = num_positions(encoded.input_ids, placeholder_token_id, num_virtual)
        if used <= max_positions:
            return system + turns, encoded, dropped
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if len(users) < 2:
            raise ValueError(
                f"The last message takes {used} tokens with the persona prompt, over the {max_positions} available; "
                "send a shorter message (or raise the context limit)."
            )
        turns = turns[users[1] :]  # one exchange: a user turn and the replies before the next user turn
        dropped += 1
