"""Persona files: one mixture vector per ``personas/<name>.safetensors``, written atomically, read strictly.

A persona file holds one tensor, ``mixture`` (``num_codes`` float32 values), and string metadata: the persona
name, ``num_codes``, the stored dtype, the fingerprint of the codebook it was fitted to and (format 2) a digest of
the content. Only safetensors is read or written (no pickle). About 600 bytes per persona.

The digest (sha256 of the mixture bytes, the name and the codebook fingerprint) catches what shape, dtype and
finiteness checks cannot: a bad copy or a tampered download whose flipped bytes still decode as 64 finite floats
would otherwise load as another persona. Format 1 files (no digest) still load, with a one-time warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

PERSONAS_DIRNAME = "personas"
PERSONA_SUFFIX = ".safetensors"
FORMAT_NAME = "peft-personamux/persona"
FORMAT_VERSION = "2"
MIXTURE_KEY = "mixture"
# metadata of format 1 (released 0.1.0), which has no digest
_V1_KEYS = frozenset({"format", "format_version", "name", "num_codes", "dtype", "codebook_fingerprint"})
_V2_KEYS = _V1_KEYS | {"digest"}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # floating point dtypes a mixture may be stored in
_warned_no_digest = False

# A name is one or two segments ("hamlet" or "hamlet/ophelia"); the optional group segment becomes a sub-folder.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"
_NAME_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")


class PersonaFileError(ValueError):
    """A persona file is missing, malformed, damaged (digest mismatch), or belongs to another codebook."""


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


def persona_digest(name: str, mixture: torch.Tensor, fingerprint: str) -> str:
    """sha256 (hex) of a persona's content: its name, its codebook fingerprint and its float32 mixture bytes."""
    vector = mixture.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    digest = hashlib.sha256(f"{FORMAT_NAME}\0{name}\0{fingerprint}\0{vector.numel()}\0".encode())
    digest.update(vector.numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def write_persona_file(path: str, name: str, mixture: torch.Tensor, fingerprint: str) -> str:
    """Save one persona's mixture vector (float32) with its metadata and digest. Returns ``path``."""
    validate_persona_name(name)
    vector = mixture.detach().to("cpu", torch.float32).reshape(-1).contiguous().clone()
    if not torch.isfinite(vector).all():
        raise ValueError(f"Persona {name!r} has non-finite mixture weights; refusing to save it.")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "num_codes": str(vector.numel()),
        "dtype": "float32",
        "codebook_fingerprint": fingerprint,
        "digest": persona_digest(name, vector, fingerprint),
    }
    atomic_save({MIXTURE_KEY: vector}, metadata, path)
    return path


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)


def _read_header(path: str, data: bytes) -> dict[str, str]:
    """Parse and check the safetensors header by hand, so that no malformed file reaches the Rust reader."""
    if len(data) < 8:
        raise PersonaFileError(f"{path} is not a readable safetensors persona file: only {len(data)} bytes.")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise PersonaFileError(
            f"{path} is not a readable safetensors persona file: the header claims {size} bytes, the file has "
            f"{len(data) - 8} after the length (truncated?)."
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as err:
        raise PersonaFileError(f"{path} is not a readable safetensors persona file: bad header ({err}).") from None
    if not isinstance(header, dict):
        raise PersonaFileError(f"{path} is not a readable safetensors persona file: the header is not an object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PersonaFileError(f"{path}: the metadata must map names to strings.")
    if list(header) != [MIXTURE_KEY]:
        raise PersonaFileError(f"{path}: expected one tensor {MIXTURE_KEY!r}, found {sorted(header)}.")
    info = header[MIXTURE_KEY]
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise PersonaFileError(f"{path}: malformed entry for tensor {MIXTURE_KEY!r}: {info!r}.")
    dtype = info.get("dtype")
    if dtype not in _ITEMSIZE:
        raise PersonaFileError(f"{path}: mixture must be floating point, got dtype {dtype!r}.")
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets != [0, expected] or 8 + size + expected != len(data):
        raise PersonaFileError(
            f"{path}: the data of {MIXTURE_KEY!r} ({dtype}, shape {shape}) must be {expected} bytes, but the header "
            f"gives offsets {offsets} and the file has {len(data) - 8 - size} (truncated or damaged?)."
        )
    return metadata


def read_persona_file(
    path: str, num_codes: int, fingerprint: str | None, strict: bool = True
) -> tuple[str, torch.Tensor]:
    """Read and validate a persona file. Returns ``(name, mixture)`` with ``mixture`` of shape ``(num_codes,)``.

    Checked, in order: the safetensors header (one floating point tensor, sizes that add up), the shape against
    ``num_codes``, finite values, metadata that agrees with the tensor, the content digest (a mismatch means the file
    is damaged; format 1 files have none and load with a one-time warning), and the codebook: ``fingerprint`` is the
    current codebook's, and a file fitted to another raises ``PersonaFileError`` unless ``strict=False``. Every
    failure raises ``PersonaFileError`` (a ``ValueError``).
    """
    global _warned_no_digest
    name, mixture, metadata = _read_persona(path, num_codes, fingerprint, strict)
    if "digest" not in metadata and not _warned_no_digest:
        _warned_no_digest = True
        warnings.warn(
            f"{path} has no content digest (written by peft-personamux 0.1), so damage to it cannot be detected. "
            "Save the persona again to add one. (Shown once.)",
            UserWarning,
            stacklevel=2,
        )
    return name, mixture


def verify_persona_files(directory: str | os.PathLike, fingerprint: str | None = None) -> dict[str, str | None]:
    """Check every persona file under ``directory/personas/``: name -> None when it is sound, else what is wrong.

    ``fingerprint`` (the codebook's) also checks that each file belongs to that codebook. A file without a digest
    (format 1) is reported as such, since damage to it cannot be detected.
    """
    results: dict[str, str | None] = {}
    for name, path in list_persona_files(directory).items():
        try:
            stored, _, metadata = _read_persona(path, None, fingerprint, strict=True)
            if stored != name:
                raise PersonaFileError(f"{path} holds persona {stored!r}, not {name!r}.")
            results[name] = None if "digest" in metadata else "no digest (format 1): damage cannot be detected"
        except PersonaFileError as err:
            results[name] = str(err)
    return results


def _read_persona(
    path: str, num_codes: int | None, fingerprint: str | None, strict: bool
) -> tuple[str, torch.Tensor, dict[str, str]]:
    if not os.path.isfile(path):
        raise PersonaFileError(f"Persona file not found: {path}")
    if not path.endswith(PERSONA_SUFFIX):
        raise PersonaFileError(f"Persona files are safetensors files ending in {PERSONA_SUFFIX!r}, got {path}.")
    with open(path, "rb") as f:
        data = f.read()  # one read: what is checked is what is loaded
    metadata = _read_header(path, data)
    try:
        mixture = load_safetensors(data)[MIXTURE_KEY]
    except Exception as err:  # safetensors raises its own error types
        raise PersonaFileError(f"{path} is not a readable safetensors persona file: {err}") from err
    except BaseException as err:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        if type(err).__name__ != "PanicException":
            raise
        raise PersonaFileError(f"{path} is not a readable safetensors persona file: {err}") from None
    name = metadata.get("name", "")
    expected = (mixture.numel(),) if num_codes is None else (num_codes,)
    if tuple(mixture.shape) != expected:
        raise PersonaFileError(
            f"{path}: mixture has shape {tuple(mixture.shape)}, but this codebook has num_codes={expected[0]}."
        )
    if not torch.isfinite(mixture).all():
        raise PersonaFileError(f"{path}: mixture contains NaN or infinite values.")
    stored = metadata.get("codebook_fingerprint")
    _check_metadata(path, metadata, mixture, name, stored)
    mixture = mixture.to(torch.float32)
    if strict and fingerprint is not None and stored != fingerprint:
        raise PersonaFileError(
            f"{path}: persona {name!r} was fitted to codebook {stored!r}, but the loaded codebook is {fingerprint!r}. "
            "Fit the persona again on this codebook, or pass strict=False to load it anyway."
        )
    try:
        return validate_persona_name(name), mixture, metadata
    except ValueError as err:
        raise PersonaFileError(f"{path}: {err}") from None


def _check_metadata(path: str, metadata: dict[str, str], mixture: torch.Tensor, name: str, stored) -> None:
    """The metadata must be exactly format 1 or 2 and describe the tensor; format 2 must match its digest."""
    keys = set(metadata)
    if keys == _V2_KEYS and metadata["format_version"] == FORMAT_VERSION and metadata["format"] == FORMAT_NAME:
        if metadata["digest"] != persona_digest(name, mixture, stored or ""):
            raise PersonaFileError(
                f"{path}: the content digest does not match: the file is damaged (a bad copy or an edited file). "
                "Copy or download it again, or save the persona again from a model that holds it."
            )
    elif not (keys == _V1_KEYS and metadata["format_version"] == "1" and metadata["format"] == FORMAT_NAME):
        raise PersonaFileError(
            f"{path}: unexpected metadata {sorted(metadata)}: not a persona file, or a damaged one (persona files "
            f"hold {sorted(_V2_KEYS)}, or {sorted(_V1_KEYS)} before format 2)."
        )
    if metadata["num_codes"] != str(mixture.numel()) or (metadata["dtype"], mixture.dtype) != (
        "float32",
        torch.float32,
    ):
        raise PersonaFileError(
            f"{path}: the metadata (num_codes={metadata['num_codes']!r}, dtype={metadata['dtype']!r}) does not "
            f"describe the tensor ({mixture.numel()} values of {mixture.dtype}): the file is damaged."
        )
