"""``personamux serve``: an OpenAI-compatible HTTP server of a codebook's personas (see `peft_personamux.server`)."""

from __future__ import annotations

from ..server import ServeArguments, serve
from .common import Command, ModelArguments

COMMAND = Command("serve", serve, (ModelArguments, ServeArguments))
