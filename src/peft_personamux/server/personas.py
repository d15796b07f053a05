"""The personas a server offers: the codebook's persona files (read-only) and uploaded ones (in ``upload_dir``).

An upload is read with `read_persona_file` against the loaded codebook's fingerprint, the check `load_persona`
makes, then written atomically to ``upload_dir/personas/<name>.safetensors`` and loaded from there with
`load_persona`, so the next request can use it and a restarted server finds it again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..codebook_loading import CodebookInfo
from ..persona_files import (
    PERSONA_SUFFIX,
    PersonaFileError,
    list_persona_files,
    persona_path,
    read_persona_file,
    validate_persona_name,
    write_persona_file,
)
from .engine import BatchEngine

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 1 << 20  # a persona file is about 1 KiB (64 float32 and a small header)


class PersonaStoreError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PersonaStore:
    def __init__(self, model, engine: BatchEngine, info: CodebookInfo, upload_dir: str | os.PathLike | None) -> None:
        self.model, self.engine, self.info = model, engine, info
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None
        self._uploaded: set[str] = set()
        if self.upload_dir is not None:
            for name, path in list_persona_files(self.upload_dir).items():
                try:
                    model.load_persona(path, activate=False)
                    self._uploaded.add(name)
                except (PersonaFileError, ValueError) as err:
                    logger.warning("Skipping uploaded persona %s: %s", path, err)

    def names(self) -> list[str]:
        return list(self.model.personas)

    def __contains__(self, name: str) -> bool:
        return name in self.model.personas

    def text_persona(self, name: str) -> str | None:
        return self.info.text_personas.get(name)

    def upload(self, data: bytes, name: str | None = None) -> str:
        """Validate a persona file's bytes and make it servable; returns its name. Raises `PersonaStoreError`."""
        if self.upload_dir is None:
            raise PersonaStoreError(403, "This server was started without an upload folder (--persona_dir).")
        if not data:
            raise PersonaStoreError(422, "The request body is empty; send the bytes of a persona .safetensors file.")
        if len(data) > MAX_UPLOAD_BYTES:
            raise PersonaStoreError(422, f"A persona file is about 1 KiB; got {len(data)} bytes.")
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.upload_dir, prefix=".upload-", suffix=PERSONA_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            with self.engine.lock:
                fingerprint = self.model.codebook_fingerprint()
                try:
                    stored_name, mixture = read_persona_file(tmp, self.model.adapter_config().num_codes, fingerprint)
                    name = validate_persona_name(name or stored_name)
                except (PersonaFileError, ValueError) as err:
                    raise PersonaStoreError(422, str(err).replace(tmp, "the uploaded file")) from None
                if name in self.model.personas and name not in self._uploaded:
                    raise PersonaStoreError(
                        409,
                        f"Persona {name!r} belongs to the codebook (read-only); upload it under another name "
                        "with ?name=...",
                    )
                path = write_persona_file(persona_path(self.upload_dir, name), name, mixture, fingerprint)
                self.model.load_persona(path, activate=False, overwrite=True)
                self._uploaded.add(name)
                self.engine.persona_changed(name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.info("Uploaded persona %r.", name)
        return name

    def delete(self, name: str) -> None:
        if name not in self.model.personas:
            raise PersonaStoreError(404, f"Unknown persona {name!r}.")
        if name not in self._uploaded:
            raise PersonaStoreError(
                403, f"Persona {name!r} belongs to the codebook (read-only); only uploaded personas can be deleted."
            )
        with self.engine.lock:
            self.model.remove_persona(name)
            self._uploaded.discard(name)
            self.engine.persona_changed(name)
            path = persona_path(self.upload_dir, name)
            if os.path.exists(path):
                os.remove(path)
        logger.info("Deleted persona %r.", name)
