"""pytest setup: no hub access. Shared helpers (tiny models, tokenizers, Persona-Mux models) live in tiny_models.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
