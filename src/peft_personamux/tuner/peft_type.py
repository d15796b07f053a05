"""Add ``PERSONAMUX`` to peft's closed ``PeftType`` enum, without patching peft. Imports nothing from this package.

peft's ``register_peft_method`` only accepts names that are already members of ``peft.PeftType``, a closed
``str`` enum. We add one member the way ``aenum.extend_enum`` does, through the enum's public-by-convention
tables (``_member_map_``, ``_value2member_map_``, ``_member_names_``). The step is idempotent, and any change in
peft or Python that breaks the enum tables raises a ``RuntimeError`` that names the versions, instead of failing
somewhere later. `peft_personamux.registration.register` then registers the config and tuner classes.
"""

from __future__ import annotations

import sys

import peft
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "PERSONAMUX"
METHOD_NAME = "personamux"
PREFIX = "personamux_"


def extend_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Add ``name`` to ``PeftType`` (a no-op when it is already there) and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    try:
        member = str.__new__(PeftType, name)
        member._name_ = name
        member._value_ = name
        member.__objclass__ = PeftType
        if hasattr(PeftType, "_sort_order_") or hasattr(next(iter(PeftType)), "_sort_order_"):
            member._sort_order_ = len(PeftType._member_names_)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        PeftType._member_names_.append(name)
        # Python >= 3.12 also looks members up as class attributes; type.__setattr__ skips the enum guard.
        type.__setattr__(PeftType, name, member)
    except (AttributeError, TypeError) as err:  # pragma: no cover - depends on future Python/peft internals
        raise RuntimeError(
            f"peft-personamux could not add {name!r} to peft.PeftType (peft {peft.__version__}, Python "
            f"{sys.version.split()[0]}): {err}. Please report this with both versions."
        ) from err
    if PeftType(name) is not member or PeftType[name] is not member or member not in list(PeftType):
        raise RuntimeError(  # pragma: no cover - guards against silent enum changes
            f"peft.PeftType rejected the new member {name!r} (peft {peft.__version__}); please report this."
        )
    return member
