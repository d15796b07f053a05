"""A persona with both a Persona-Mux mixture (soft prompt) and a channel mask, in one batch of many personas.

The soft prompt changes the input embeddings, the channel mask the inputs of ``down_proj`` / ``o_proj``; they touch
different modules, so they stack: each row reads its persona's soft prompt and runs through its persona's
subnetwork. On disk a persona's two parts sit side by side::

    <dir>/personas/<name>.safetensors              mixture (64 floats)
    <dir>/subnetworks/<name>.channels.safetensors  channel mask (a few KB)
"""

from __future__ import annotations

import os

from ..persona_files import persona_path
from ..tuner.model import PersonaMuxModel
from .channels import PersonaRows, SubnetworkBank
from .files import subnetwork_path


def is_personamux(model) -> bool:
    """Whether ``model`` is a Persona-Mux ``PeftModel`` (or tuner)."""
    return isinstance(model, PersonaMuxModel) or isinstance(getattr(model, "base_model", None), PersonaMuxModel)


def load_persona_parts(model, bank: SubnetworkBank, directory: str | os.PathLike, name: str) -> dict[str, bool]:
    """Load what ``directory`` holds of persona ``name``: its mixture (into a Persona-Mux ``model``) and its channel
    mask (into ``bank``). Returns which parts were found; neither raises ``FileNotFoundError``."""
    found = {"mixture": False, "mask": False}
    mixture_file = persona_path(directory, name)
    if is_personamux(model) and os.path.isfile(mixture_file):
        model.load_persona(mixture_file, activate=False)
        found["mixture"] = True
    mask_file = subnetwork_path(directory, name, "channel")
    if os.path.isfile(mask_file):
        bank.load(mask_file, exist_ok=True)
        found["mask"] = True
    if not any(found.values()):
        raise FileNotFoundError(f"Neither {mixture_file} nor {mask_file} exists.")
    return found


def forward(model, bank: SubnetworkBank, persona_ids: PersonaRows, **inputs):
    """``model(**inputs)`` with each row's channel mask and, on a Persona-Mux model, its soft prompt.

    Personas without a mask run unmasked; on a Persona-Mux model every row's persona needs a mixture.
    """
    with bank.apply(persona_ids, strict=False):
        if is_personamux(model):
            return model(persona_ids=persona_ids, **inputs)
        return model(**inputs)


def generate(model, bank: SubnetworkBank, persona_ids: PersonaRows, **kwargs):
    """``model.generate(**kwargs)`` with per-row masks (every decoding step) and, on Persona-Mux, soft prompts."""
    with bank.apply(persona_ids, strict=False):
        if is_personamux(model):
            return model.generate(persona_ids=persona_ids, **kwargs)
        return model.generate(**kwargs)
