"""peft-personamux: thousands of personas for a frozen LLM, 64 weights each (Persona-Mux as a peft method)."""

__version__ = "0.1.0"

# arithmetic, persona_embedding and serving attach their entry points to PersonaMuxModel (model.blend_personas, ...)
from . import arithmetic, persona_embedding, serving  # noqa: F401
from .inputs import PERSONA_PLACEHOLDER, encode_with_placeholder, insert_virtual_tokens
from .persona_files import PersonaFileError, codebook_fingerprint, validate_persona_name
from .registration import register
from .tuner import PersonaMuxConfig, PersonaMuxInit, PersonaMuxLayer, PersonaMuxModel

PEFT_TYPE = register()

__all__ = [
    "PEFT_TYPE",
    "PERSONA_PLACEHOLDER",
    "PersonaFileError",
    "PersonaMuxConfig",
    "PersonaMuxInit",
    "PersonaMuxLayer",
    "PersonaMuxModel",
    "__version__",
    "codebook_fingerprint",
    "encode_with_placeholder",
    "insert_virtual_tokens",
    "register",
    "validate_persona_name",
]
