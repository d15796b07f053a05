"""Persona files: one mixture vector per ``personas/<name>.safetensors``, written atomically, read strictly.

A persona file holds one tensor, ``mixture`` (``num_codes`` float32 values), and string metadata: the persona
name, ``num_codes``, the stored dtype and the fingerprint of the codebook it was fitted to. Only safetensors is
read or written (no pickle). About 1 KiB per persona.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PERSONAS_DIRNAME = "personas"
PERSONA_SUFFIX = ".safetensors"
FORMAT_VERSION = "1"
MIXTURE_KEY = "mixture"

# A name is one or two segments ("hamlet" or "hamlet/ophelia"); the optional group segment becomes a sub-folder.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"
_NAME_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")


class PersonaFileError(ValueError):
    """A persona file is missing, malformed, or belongs to another codebook."""


def validate_persona_name(name: str) -> str:
    """Return ``name`` if it is safe to use as a file name under the persona folder, else raise ``ValueError``."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or any(s in (".", "..") for s in name.split("/")):
        raise ValueError(
            f"Invalid persona name {name!r}: use letters, digits, '_', '-' and '.', optionally one 'group/name' "
            "separator; no '..', absolute paths or backslashes (a name must stay inside the persona folder)."
        )
    if name.split("/")[-1].startswith("."):
        raise ValueError(f"Invalid persona name {name!r}: it must not start with '.'.")
    return name


def persona_path(directory: str | os.PathLike, name: str) -> str:
    """Path of persona ``name`` under ``directory/personas/``."""
    validate_persona_name(name)
    return os.path.join(os.fspath(directory), PERSONAS_DIRNAME, *name.split("/")) + PERSONA_SUFFIX


def list_persona_files(directory: str | os.PathLike) -> dict[str, str]:
    """Map persona name -> file for every persona file under ``directory/personas/``."""
    root = os.path.join(os.fspath(directory), PERSONAS_DIRNAME)
    found: dict[str, str] = {}
    if not os.path.isdir(root):
        return found
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            if not filename.endswith(PERSONA_SUFFIX) or filename.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, filename), root)[: -len(PERSONA_SUFFIX)]
            name = rel.replace(os.sep, "/")
            if _NAME_RE.match(name):
                found[name] = os.path.join(dirpath, filename)
    return dict(sorted(found.items()))


def codebook_fingerprint(codebook: torch.Tensor, bias: torch.Tensor) -> str:
    """Short hash identifying a codebook and its bias tokens.

    Hashed after rounding to bfloat16 so that the same codebook loaded in float32 or bfloat16 has the same
    fingerprint (a persona fitted on a GPU in bf16 stays valid on a CPU in fp32).
    """
    digest = hashlib.sha256()
    for tensor in (codebook, bias):
        t = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Write a safetensors file to a temporary file in the same folder, then rename it over ``path``."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=PERSONA_SUFFIX)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_persona_file(path: str, name: str, mixture: torch.Tensor, fingerprint: str) -> str:
    """Save one persona's mixture vector (float32) with its metadata. Returns ``path``."""
    validate_persona_name(name)
    vector = mixture.detach().to("cpu", torch.float32).reshape(-1).contiguous().clone()
    if not torch.isfinite(vector).all():
        raise ValueError(f"Persona {name!r} has non-finite mixture weights; refusing to save it.")
    metadata = {
        "format": "peft-personamux/persona",
        "format_version": FORMAT_VERSION,
        "name": name,
        "num_codes": str(vector.numel()),
        "dtype": "float32",
        "codebook_fingerprint": fingerprint,
    }
    atomic_save({MIXTURE_KEY: vector}, metadata, path)
    return path


def read_persona_file(
    path: str, num_codes: int, fingerprint: str | None, strict: bool = True
) -> tuple[str, torch.Tensor]:
    """Read and validate a persona file. Returns ``(name, mixture)`` with ``mixture`` of shape ``(num_codes,)``.

    ``fingerprint`` is the current codebook's; a file fitted to another codebook raises ``PersonaFileError``
    unless ``strict=False``.
    """
    if not os.path.isfile(path):
        raise PersonaFileError(f"Persona file not found: {path}")
    if not path.endswith(PERSONA_SUFFIX):
        raise PersonaFileError(f"Persona files are safetensors files ending in {PERSONA_SUFFIX!r}, got {path}.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if keys != [MIXTURE_KEY]:
                raise PersonaFileError(f"{path}: expected one tensor {MIXTURE_KEY!r}, found {keys}.")
            mixture = f.get_tensor(MIXTURE_KEY)
    except PersonaFileError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise PersonaFileError(f"{path} is not a readable safetensors persona file: {err}") from err
    name = metadata.get("name") or os.path.basename(path)[: -len(PERSONA_SUFFIX)]
    if not mixture.is_floating_point():
        raise PersonaFileError(f"{path}: mixture must be floating point, got dtype {mixture.dtype}.")
    if tuple(mixture.shape) != (num_codes,):
        raise PersonaFileError(
            f"{path}: mixture has shape {tuple(mixture.shape)}, but this codebook has num_codes={num_codes}."
        )
    if not torch.isfinite(mixture).all():
        raise PersonaFileError(f"{path}: mixture contains NaN or infinite values.")
    stored = metadata.get("codebook_fingerprint")
    if strict and fingerprint is not None and stored != fingerprint:
        raise PersonaFileError(
            f"{path}: persona {name!r} was fitted to codebook {stored!r}, but the loaded codebook is {fingerprint!r}. "
            "Fit the persona again on this codebook, or pass strict=False to load it anyway."
        )
    return validate_persona_name(name), mixture.to(torch.float32)


def iter_names(names: str | list[str] | tuple[str, ...]) -> Iterator[str]:
    """Yield validated names from one name or a sequence of names."""
    for name in [names] if isinstance(names, str) else names:
        yield validate_persona_name(name)
