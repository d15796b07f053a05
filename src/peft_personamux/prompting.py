"""Example text -> prompt text with a persona placeholder, and the response the model learns to write.

One user turn carries the optional text persona, the placeholder where the soft prompt goes, an instruction and the
prompt (paper, "Methods": the soft prompt is placed after the text persona, or used as the persona when there is no
text persona). The assistant turn is the response. Training, evaluation and generation all format text here, so the
three see the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .inputs import PERSONA_PLACEHOLDER

DEFAULT_INSTRUCTION = "Please roleplay as the described character."


@dataclass
class FormattedExample:
    """Text of one example, before tokenisation."""

    prompt: str  # everything the model reads before it answers, with PERSONA_PLACEHOLDER where the soft prompt goes
    response: str  # the assistant turn, ending with the end-of-turn/eos text; "" when formatting for generation


def user_message(prompt: str, text_persona: str | None = None, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn: ``"{text_persona} {PERSONA_PLACEHOLDER} {instruction}\\n\\nPrompt: {prompt}"``.

    Without a text persona the placeholder is left out, and the model puts the soft prompt first in the row.
    """
    head = f"{text_persona.strip()} {PERSONA_PLACEHOLDER} " if text_persona and text_persona.strip() else ""
    return f"{head}{instruction}\n\nPrompt: {prompt}"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_example(
    tokenizer,
    prompt: str,
    response: str | None = None,
    text_persona: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    use_chat_template: bool | None = None,
) -> FormattedExample:
    """Format one example with the tokenizer's chat template, or ``"User: ...\\nAssistant: "`` when it has none.

    The response ends with what closes an assistant turn (the template's end-of-turn text, then ``eos_token`` if
    the template did not end with it), so the model learns to stop. ``use_chat_template=None`` uses the template
    when the tokenizer has one.
    """
    user = user_message(prompt, text_persona, instruction)
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    if use_chat_template and not has_chat_template(tokenizer):
        raise ValueError("`use_chat_template=True`, but the tokenizer has no chat template; pass None or False.")
    eos = tokenizer.eos_token or ""
    if not use_chat_template:
        prompt_text = f"User: {user}\nAssistant: "
        return FormattedExample(prompt_text, "" if response is None else response + eos)
    messages = [{"role": "user", "content": user}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if response is None:
        return FormattedExample(prompt_text, "")
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt_text):
        # Templates that rewrite earlier turns once an answer follows (e.g. strip "thinking" blocks) cannot be
        # split into a prompt and a response; fall back to the generation prompt plus the raw response.
        return FormattedExample(prompt_text, response + eos)
    # templates end a turn with e.g. "<|im_end|>\n": keep the end-of-turn marker, drop the trailing newline
    answer = full[len(prompt_text) :].rstrip()
    if eos and not answer.endswith(eos):
        answer += eos
    return FormattedExample(prompt_text, answer)
