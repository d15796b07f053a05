"""`make_codebook` for test_serve.py and test_chat.py, which import it from here; it lives in tiny_models.py."""

from tiny_models import PERSONAS, make_codebook

__all__ = ["PERSONAS", "make_codebook"]
