"""Persona files of a Persona-Mux tuner: ``personas/<name>.safetensors`` beside the adapter, saved with it and loaded
by name. The file format and its checks are in `peft_personamux.persona_files`. Mixed into `PersonaMuxModel`."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch

from ..persona_files import (
    PersonaFileError,
    codebook_fingerprint,
    list_persona_files,
    persona_path,
    read_persona_file,
    validate_persona_name,
    write_persona_file,
)


class PersonaWriter:
    """Called by ``PersonaMuxConfig.save_pretrained``: writes the adapter's personas beside adapter_config.json."""

    def __init__(self, tuner: PersonaFiles, adapter_name: str) -> None:
        self._tuner = weakref.ref(tuner)  # weak: configs are deep-copied and must not copy the model
        self.adapter_name = adapter_name

    def __call__(self, directory: str) -> None:
        tuner = self._tuner()
        if tuner is not None and self.adapter_name in tuner.peft_config:
            tuner.save_personas(directory, adapter_name=self.adapter_name)


class PersonaFiles:
    """Save and load persona files. Needs the tuner's registry (`PersonaRegistry`) and ``personamux_layer``."""

    @property
    def persona_dir(self) -> str | None:
        """Folder whose ``personas/`` sub-folder ``load_persona(name)``/``save_persona(name)`` use."""
        return self._persona_dir.get(self.current_adapter)

    @persona_dir.setter
    def persona_dir(self, directory: str | None) -> None:
        self._persona_dir[self.current_adapter] = None if directory is None else os.fspath(directory)

    def available_persona_files(self) -> dict[str, str]:
        """Persona files found under ``persona_dir``, by name."""
        return list_persona_files(self.persona_dir) if self.persona_dir else {}

    def codebook_fingerprint(self, adapter_name: str | None = None) -> str:
        """Hash of W and b that persona files record (recomputed each call: fused optimizers and ``.data`` writes
        change the tensors without bumping their version counters, so no cache can be trusted)."""
        adapter = adapter_name or self.current_adapter
        layer = self.personamux_layer
        return codebook_fingerprint(layer.personamux_codebook[adapter], layer.personamux_bias[adapter])

    def save_persona(self, name: str, directory: str | os.PathLike | None = None) -> str:
        """Write ``<directory>/personas/<name>.safetensors`` (directory defaults to the last save/load folder)."""
        directory = directory if directory is not None else self.persona_dir
        if directory is None:
            raise ValueError("No folder to save to: pass `directory`, or call save_pretrained(...) first.")
        mixture = self.mixture_table()[self.persona_index(name)]
        return write_persona_file(persona_path(directory, name), name, mixture, self.codebook_fingerprint())

    def save_personas(
        self, directory: str | os.PathLike, names: Sequence[str] | None = None, adapter_name: str | None = None
    ) -> list[str]:
        """Write persona files for ``names`` (default: every registered persona). Returns the paths."""
        adapter = adapter_name or self.current_adapter
        table = self.mixture_table(adapter).detach()
        registry = self._persona_names[adapter]
        fingerprint = self.codebook_fingerprint(adapter)
        paths = [
            write_persona_file(persona_path(directory, n), n, table[registry.index(n)], fingerprint)
            for n in (registry if names is None else names)
        ]
        self._persona_dir[adapter] = os.fspath(directory)
        return paths

    def load_persona(
        self,
        name_or_path: str | os.PathLike,
        strict: bool = True,
        activate: bool = True,
        overwrite: bool = False,
        name: str | None = None,
    ) -> str:
        """Load a persona by name (from ``persona_dir``, or already registered) or from a ``.safetensors`` file.

        The file is checked first (digest, shape, dtype, finite values, codebook fingerprint; see
        ``persona_files.read_persona_file``). It registers under ``name`` if given, else under the name the file
        records. That name must be free or hold the same values: replacing another mixture needs ``overwrite=True``.
        A load that fails leaves the registry as it was. The persona becomes the active one unless
        ``activate=False``. Returns its name.
        """
        target = os.fspath(name_or_path)
        adapter = self.current_adapter
        if name is not None:
            validate_persona_name(name)
        if target.endswith(".safetensors") or os.path.isfile(target):
            path = target
        else:
            validate_persona_name(target)
            path = persona_path(self.persona_dir, target) if self.persona_dir else None
            if path is None or not os.path.isfile(path):
                if target in self._persona_names[adapter] and name in (None, target):
                    if activate:
                        self.set_persona(target)
                    return target
                raise KeyError(self.unknown_persona_message(target))
        num_codes = self.adapter_config().num_codes
        stored, mixture = read_persona_file(path, num_codes, self.codebook_fingerprint(), strict=strict)
        name = stored if name is None else name
        table = self.mixture_table(adapter)
        values = mixture.to(table.device, table.dtype)
        if not bool(torch.isfinite(values).all()):
            raise PersonaFileError(f"{path}: persona {stored!r} has values that overflow this model's {table.dtype}.")
        registry = self._persona_names[adapter]
        if name in registry and not overwrite and not torch.equal(table[registry.index(name)].detach(), values):
            source = f"persona {stored!r} of {path}" if stored == name else f"{path} (persona {stored!r})"
            raise ValueError(
                f"Persona {name!r} is already registered with other values than {source}. Pass overwrite=True to "
                f"replace it, or name='...' to register the file under another name."
            )
        self.add_personas([name], mixtures=values[None], exist_ok=True)
        if activate:
            self.set_persona(name)
        return name
