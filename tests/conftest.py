"""Shared fixtures: tiny random causal LMs built from a config in code (no hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import make_model  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_model("llama")
