"""Errors raised by the data loaders: each names the file, the line and what was expected there."""

from __future__ import annotations

import os


class DataFormatError(ValueError):
    """A data file is malformed: the message names the file, the line number (1-based) and what was expected."""

    def __init__(self, path: str | os.PathLike, line: int | None, expected: str, found: str | None = None):
        self.path = os.fspath(path)
        self.line = line
        self.expected = expected
        where = f"{self.path}, line {line}" if line is not None else self.path
        message = f"{where}: expected {expected}"
        if found is not None:
            message += f", found {found}"
        super().__init__(message)


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """Expected data files are missing; catchable both as `DataFormatError` and as `FileNotFoundError`."""

    def __init__(self, path: str | os.PathLike, expected: str):
        super().__init__(path, None, expected, found="nothing there")
