"""``personamux chat``: talk to a persona in the terminal, with slash commands.

`ChatSession` holds the conversation and runs the commands without touching the terminal; `run_chat` is the
read-reply loop. The history goes through the chat template with the persona's text description and soft prompt in
the first user turn (`conversation.encode_conversation`), replies stream token by token through transformers'
``TextIteratorStreamer``, history too long for the context loses its oldest exchanges, and Ctrl-C stops a reply
(the part already said stays in the history), not the program.
"""

from __future__ import annotations

import logging
import math
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codebook_loading import CodebookInfo, load_codebook_model, read_codebook_info, resolve_codebook_dir
from .conversation import trim_history
from .files import write_json

logger = logging.getLogger(__name__)

HELP = """Commands:
  /persona NAME        talk to another persona (a name from /personas, or a .safetensors file); history is kept
  /bias SCALE          bias scale: 1 full, 0.5 half, 0 none
  /blend a=0.7,b=0.3   talk to a blend of personas' mixtures
  /personas            list the personas
  /reset               forget the conversation
  /save FILE           write the transcript as JSON
  /help                this list
  /quit                leave (Ctrl-D too); Ctrl-C stops a reply"""


@dataclass
class ChatArguments:
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    persona: str | None = field(
        default=None, metadata={"help": "Persona to talk to (a name or a .safetensors file). Default: the first."}
    )
    text_persona: str | None = field(
        default=None, metadata={"help": "Text description of the persona, placed before its soft prompt."}
    )
    system: str | None = field(default=None, metadata={"help": "System message. Default: the chat template's."})
    bias_scale: float = field(default=1.0, metadata={"help": "Bias scale: 1 full, 0.5 half, 0 none."})
    max_new_tokens: int = field(default=120, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold."})
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens (0: all)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Discourages loops in small models."})
    seed: int = field(default=0, metadata={"help": "Sampling seed of the session."})
    max_context: int | None = field(
        default=None, metadata={"help": "Positions the prompt and reply may take. Default: the model's maximum."}
    )


class ChatExit(Exception):
    """``/quit``."""


class _StopOnEvent:
    """A stopping criterion that ends every row once ``event`` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Reply:
    """A reply being generated: iterate for its text pieces; `stop()` ends it early; `close()` records it."""

    def __init__(self, streamer, thread: threading.Thread, stop: threading.Event, on_close: Callable[[str], None]):
        self._streamer, self._thread, self._stop, self._on_close = streamer, thread, stop, on_close
        self.parts: list[str] = []
        self.error: BaseException | None = None
        self.stopped = False
        self._done = False

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        if self._done:  # the streamer blocks once its end was read
            raise StopIteration
        try:
            piece = next(self._streamer)
        except StopIteration:
            self._done = True
            raise
        self.parts.append(piece)
        return piece

    def stop(self) -> None:
        self.stopped = True
        self._stop.set()

    def close(self) -> str:
        for _ in self:  # whatever is left after a stop
            pass
        self._thread.join()
        text = "".join(self.parts).strip()
        if self.error is None:
            self._on_close(text)
        return text


class ChatSession:
    """A conversation with one persona at a time; `command` runs slash commands, `reply` answers a message."""

    def __init__(self, model, tokenizer, info: CodebookInfo, args: ChatArguments) -> None:
        self.model, self.tokenizer, self.info, self.args = model, tokenizer, info, args
        self.bias_scale = _bias(str(args.bias_scale))
        names = model.personas
        if not names and args.persona is None:
            raise ValueError(f"The codebook {info.directory} has no personas; pass --persona FILE.safetensors.")
        self.persona = self._load(args.persona or names[0])
        self.text_persona = args.text_persona or info.text_personas.get(self.persona)
        self.history: list[dict[str, str]] = []  # what the model sees
        self.transcript: list[dict[str, str]] = []  # everything said, for /save
        limit = getattr(model.get_base_model().config, "max_position_embeddings", None) or 2048
        self.max_context = min(args.max_context or limit, limit)
        torch.manual_seed(args.seed)

    def _load(self, name: str) -> str:
        if name in self.model.personas:
            return name
        try:
            return self.model.load_persona(name, activate=False)
        except KeyError as err:
            raise ValueError(str(err).strip("'\"")) from None

    # -- commands ------------------------------------------------------------------------------------------------

    def command(self, line: str) -> str:
        """Run a slash command; returns what to show. Raises `ChatExit` on /quit, `ValueError` on bad input."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            raise ChatExit
        if name == "/help":
            return HELP
        if name == "/personas":
            names = [f"*{n}" if n == self.persona else n for n in self.model.personas]
            return f"{len(names)} personas (* = current):\n" + textwrap.fill(", ".join(names), 100)
        if name == "/persona":
            if not arg:
                raise ValueError("Usage: /persona NAME (see /personas).")
            self.persona = self._load(arg)
            self.text_persona = self.info.text_personas.get(self.persona)
            return f"Now talking to {self.persona} (history kept; /reset starts over)."
        if name == "/bias":
            self.bias_scale = _bias(arg)
            return f"Bias scale {self.bias_scale:g}."
        if name == "/blend":
            weights = _blend_weights(arg)
            for persona in weights:
                self._load(persona)
            self.persona = self.model.blend_personas(weights)
            self.text_persona = None
            return f"Now talking to {self.persona} = " + " + ".join(f"{w:g}*{p}" for p, w in weights.items()) + "."
        if name == "/reset":
            self.history, self.transcript = [], []
            return "Conversation cleared."
        if name == "/save":
            if not arg:
                raise ValueError("Usage: /save FILE.json")
            path = Path(arg).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "persona": self.persona,
                "bias_scale": self.bias_scale,
                "text_persona": self.text_persona,
                "system": self.args.system,
                "messages": self.transcript,
            }
            write_json(path, record)
            return f"Saved {len(self.transcript)} messages to {path}."
        raise ValueError(f"Unknown command {name!r}; /help lists the commands.")

    # -- replies -------------------------------------------------------------------------------------------------

    def prompt(self, text: str) -> tuple[list[int], int]:
        """Token ids for the history plus ``text``, and how many old exchanges had to go to fit."""
        config = self.model.adapter_config()
        virtual = config.num_virtual(self.bias_scale)
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        messages = system + self.history + [{"role": "user", "content": text}]
        kept, encoded, dropped = trim_history(
            self.tokenizer,
            messages,
            config.placeholder_token_id,
            virtual,
            self.max_context - self.args.max_new_tokens,
            self.text_persona,
            self.info.instruction,
        )
        self.history = kept[len(system) : -1]
        return encoded.input_ids, dropped

    def reply(self, text: str) -> tuple[Reply, int]:
        """Start answering ``text``: ``(reply to iterate, old exchanges dropped)``. Raises ValueError if too long."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        ids, dropped = self.prompt(text)
        input_ids = torch.tensor([ids], device=next(self.model.parameters()).device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        args = self.args
        sample = args.temperature > 0
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            persona_ids=[self.persona],
            bias_scale=self.bias_scale,
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            repetition_penalty=args.repetition_penalty,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

        def on_close(answer: str) -> None:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            self.transcript += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": answer, "persona": self.persona, "bias_scale": self.bias_scale},
            ]

        def work() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as err:  # shown by the loop; the streamer must still end
                reply.error = err
                streamer.end()

        thread = threading.Thread(target=work, name="personamux-chat", daemon=True)
        reply = Reply(streamer, thread, stop, on_close)
        thread.start()
        return reply, dropped


def _bias(text: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"The bias scale must be a number such as 1, 0.5 or 0; got {text!r}.") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"The bias scale must be a finite number >= 0; got {text!r}.")
    return scale


def _blend_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"Usage: /blend name=weight,name=weight (e.g. /blend a=0.7,b=0.3); got {item!r}.")
    if not weights:
        raise ValueError("Usage: /blend name=weight,name=weight (e.g. /blend a=0.7,b=0.3).")
    return weights


def run_chat(session: ChatSession, read: Callable[[str], str] = input, write=sys.stdout) -> int:
    """The terminal loop: read a line, run a command or stream a reply, until /quit or end of input."""

    def say(text: str = "", end: str = "\n") -> None:
        write.write(text + end)
        write.flush()

    say(f"Talking to {session.persona} (bias {session.bias_scale:g}). /help lists the commands, /quit leaves.")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            say()
            return 0
        except KeyboardInterrupt:
            say("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves.)")
            continue
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                say(session.command(line))
                continue
            reply, dropped = session.reply(line.strip())
        except ChatExit:
            return 0
        except (ValueError, KeyError, OSError) as err:
            say(f"! {str(err).strip(chr(39) + chr(34))}")
            continue
        if dropped:
            say(f"(the {dropped} oldest exchange{'s' if dropped > 1 else ''} no longer fit the context: dropped)")
        say(f"{session.persona}> ", end="")
        while True:
            try:
                for piece in reply:
                    say(piece, end="")
                break
            except KeyboardInterrupt:
                reply.stop()
        reply.close()
        say(" [stopped]" if reply.stopped else "")
        if reply.error is not None:
            say(f"! Generation failed: {reply.error}")


def chat(model_args, args: ChatArguments) -> int:
    """Talk to a persona in the terminal (history, streaming, /persona /bias /blend /save ...)."""
    try:
        codebook = resolve_codebook_dir(args.codebook)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    model, tokenizer = load_codebook_model(codebook, model_args.model_name_or_path, model_args.dtype)
    try:
        session = ChatSession(model, tokenizer, read_codebook_info(codebook), args)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return run_chat(session)
