"""Mask files: packed bits in safetensors, validated against the model (fingerprint), shapes and a digest.

A persona's masks live beside its mixture file, in their own folder so that `list_persona_files` never mistakes
them for mixtures::

    <dir>/personas/<name>.safetensors              mixture (persona_files.py)
    <dir>/subnetworks/<name>.channels.safetensors  channel mask: a few KB
    <dir>/subnetworks/<name>.weights.safetensors   weight mask: ~13 MB for SmolLM2-135M

Each bit tensor is stored as ``uint8`` (8 mask bits per byte, numpy ``packbits`` order, the last byte zero padded).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from safetensors import safe_open

from ..persona_files import PERSONA_SUFFIX, PersonaFileError, atomic_save, validate_persona_name
from .statistics import decoder_linears, unwrap_model

SUBNETWORKS_DIRNAME = "subnetworks"
FORMAT_VERSION = "1"
CHANNEL_FORMAT = "peft-personamux/subnetwork-channels"
WEIGHT_FORMAT = "peft-personamux/subnetwork-weights"
KIND_SUFFIX = {"channel": ".channels" + PERSONA_SUFFIX, "weight": ".weights" + PERSONA_SUFFIX}


def subnetwork_path(directory: str | os.PathLike, name: str, granularity: str = "channel") -> str:
    """Path of persona ``name``'s ``channel`` or ``weight`` mask under ``directory/subnetworks/``."""
    validate_persona_name(name)
    if granularity not in KIND_SUFFIX:
        raise ValueError(f"`granularity` must be 'channel' or 'weight', got {granularity!r}.")
    return os.path.join(os.fspath(directory), SUBNETWORKS_DIRNAME, *name.split("/")) + KIND_SUFFIX[granularity]


def list_subnetwork_files(directory: str | os.PathLike, granularity: str = "channel") -> dict[str, str]:
    """Map persona name -> mask file of that granularity under ``directory/subnetworks/``."""
    root = os.path.join(os.fspath(directory), SUBNETWORKS_DIRNAME)
    suffix = KIND_SUFFIX[granularity]
    found: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            if filename.endswith(suffix) and not filename.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, filename), root)[: -len(suffix)]
                found[rel.replace(os.sep, "/")] = os.path.join(dirpath, filename)
    return dict(sorted(found.items()))


def model_fingerprint(model) -> str:
    """16 hex digits identifying a model's decoder: its Linear names and shapes, and two of its weight matrices.

    The first and last Linear's weights are hashed after rounding to bfloat16, so the same model in float32 or
    bfloat16 has the same fingerprint, while another checkpoint of the same architecture does not.
    """
    linears = decoder_linears(model)
    digest = hashlib.sha256(type(unwrap_model(model)).__name__.encode())
    for name, module in linears.items():
        digest.update(f"{name}:{tuple(module.weight.shape)};".encode())
    names = list(linears)
    for name in (names[0], names[-1]):
        weight = linears[name].weight.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(weight.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor of any shape -> (ceil(numel / 8),) uint8."""
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).reshape(-1).numpy()))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 bytes -> bool tensor of ``shape``."""
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def bits_digest(packed: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """16 hex digits over every packed tensor and its shape, in key order (detects corrupted or edited bits)."""
    digest = hashlib.sha256()
    for key in sorted(packed):
        digest.update(f"{key}:{tuple(shapes[key])};".encode())
        digest.update(packed[key].numpy().tobytes())
    return digest.hexdigest()[:16]


def write_mask_file(
    path: str,
    kind: str,
    name: str,
    masks: Mapping[str, torch.Tensor],
    fingerprint: str,
    extra: Mapping[str, str] | None = None,
) -> str:
    """Write bool ``masks`` (key -> tensor) as packed bits with their shapes, the model fingerprint and a digest."""
    validate_persona_name(name)
    packed = {key: pack_bits(mask) for key, mask in masks.items()}
    shapes = {key: tuple(mask.shape) for key, mask in masks.items()}
    metadata = {
        **{k: str(v) for k, v in (extra or {}).items()},
        "format": CHANNEL_FORMAT if kind == "channel" else WEIGHT_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "model_fingerprint": fingerprint,
        "shapes": json.dumps({k: list(v) for k, v in shapes.items()}, sort_keys=True),
        "digest": bits_digest(packed, shapes),
    }
    atomic_save(packed, metadata, path)
    return path


def read_mask_file(
    path: str, kind: str, fingerprint: str | None, expected_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a mask file. Returns ``(name, {key: bool mask}, metadata)``.

    Raises `PersonaFileError` for a missing or unreadable file, another format, a mask made on another model
    (``fingerprint``), tensors whose names or shapes differ from ``expected_shapes``, or bits that do not match
    the stored digest.
    """
    if not os.path.isfile(path):
        raise PersonaFileError(f"Mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            packed = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise PersonaFileError(f"{path} is not a readable safetensors mask file: {err}") from err
    wanted = CHANNEL_FORMAT if kind == "channel" else WEIGHT_FORMAT
    if metadata.get("format") != wanted:
        raise PersonaFileError(f"{path}: expected a {wanted!r} file, found format {metadata.get('format')!r}.")
    name = validate_persona_name(metadata.get("name", ""))
    stored = metadata.get("model_fingerprint")
    if fingerprint is not None and stored != fingerprint:
        raise PersonaFileError(
            f"{path}: the mask of persona {name!r} was calibrated on model {stored!r}, but this model is "
            f"{fingerprint!r}. Calibrate the persona again on this model."
        )
    try:
        shapes = {k: tuple(v) for k, v in json.loads(metadata["shapes"]).items()}
    except (KeyError, ValueError) as err:
        raise PersonaFileError(f"{path}: missing or malformed `shapes` metadata.") from err
    expected = {k: tuple(v) for k, v in expected_shapes.items()}
    if shapes != expected or set(packed) != set(expected):
        differ = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))[:3]
        pairs = [(k, shapes.get(k), expected.get(k)) for k in differ]
        raise PersonaFileError(f"{path}: mask shapes do not fit this model; (name, file, model): {pairs}.")
    for key, tensor in packed.items():
        needed = (int(np.prod(shapes[key])) + 7) // 8
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (needed,):
            raise PersonaFileError(
                f"{path}: tensor {key!r} must be {needed} packed uint8 bytes, got {tensor.dtype} "
                f"{tuple(tensor.shape)}."
            )
    if bits_digest(packed, shapes) != metadata.get("digest"):
        raise PersonaFileError(f"{path}: the mask bits do not match the stored digest (file corrupted or edited).")
    return name, {key: unpack_bits(t, shapes[key]) for key, t in packed.items()}, metadata
