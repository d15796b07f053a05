"""``personamux chat``: talk to a persona in the terminal (the session lives in `peft_personamux.chat`)."""

from __future__ import annotations

from ..chat import ChatArguments, chat
from .common import Command, ModelArguments

COMMAND = Command("chat", chat, (ModelArguments, ChatArguments))
