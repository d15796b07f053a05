"""The files of a codebook folder and the one JSON reader/writer every command and report uses.

A codebook folder is what `personamux pretrain` (or ``save_pretrained``) writes: peft's adapter files, the
persona files under ``personas/`` (see `persona_files`), and two JSON files that say how it was trained.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's CONFIG_NAME
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME: the codebook W and bias b
PRETRAIN_INFO_NAME = "personamux_pretrain.json"  # what a codebook was trained on: data split and prompt format
TEXT_PERSONAS_NAME = "text_personas.json"  # {persona: description} the codebook was trained with
LOSS_LOG_NAME = "loss_log.jsonl"  # training: every logged entry, one JSON line each
LOSS_CURVE_NAME = "loss_curve.png"  # training: the loss against the step, stage switches marked


def is_codebook_dir(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds an adapter (``adapter_config.json``)."""
    return (Path(directory) / ADAPTER_CONFIG_NAME).is_file()


def finite_or_none(data: Any) -> Any:
    """NaN/inf -> None, recursively, so that what is written is strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``, or ``{}`` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """Atomic write (an interrupted run never leaves half a file); NaN and inf are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(finite_or_none(data), f, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
