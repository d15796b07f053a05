"""Register Persona-Mux as a peft method: the ``PERSONAMUX`` peft type (see `tuner.peft_type`), then
``register_peft_method`` with the config and tuner classes. Both steps are idempotent."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method

from .tuner.config import PersonaMuxConfig
from .tuner.model import PersonaMuxModel
from .tuner.peft_type import METHOD_NAME, PEFT_TYPE_NAME, PREFIX, extend_peft_type

__all__ = ["METHOD_NAME", "PEFT_TYPE_NAME", "PREFIX", "extend_peft_type", "register"]


def register() -> PeftType:
    """Make ``PersonaMuxConfig``/``PersonaMuxModel`` known to peft. Safe to call any number of times."""
    peft_type = extend_peft_type()
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=METHOD_NAME, config_cls=PersonaMuxConfig, model_cls=PersonaMuxModel, prefix=PREFIX)
    elif registered is not PersonaMuxConfig:
        # A second copy of this package (e.g. reloaded in a notebook) registered first: keep the first one.
        if registered.__qualname__ != PersonaMuxConfig.__qualname__:
            raise RuntimeError(f"peft type {peft_type} is already registered to {registered!r}.")
    return peft_type
