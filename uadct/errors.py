"""The uadct error family: user-facing problems with one-line messages.

The CLI turns every :class:`UadctError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UadctError(Exception):
    """A problem with the user's input, files or settings (not a bug)."""


class InputError(UadctError):
    """An input file cannot be read or is not what the command expects."""


class CheckpointError(UadctError):
    """A model checkpoint is missing, unsafe, or incompatible."""


class AtlasError(UadctError):
    """The atlas is missing, corrupt, or cannot be fetched."""


class PreprocessError(UadctError):
    """A preprocessing step failed for one subject (e.g. empty brain mask)."""


class OutputError(UadctError):
    """An output cannot be written where asked, or would destroy one of the command's inputs."""


class SettingError(UadctError, ValueError):
    """A setting outside its allowed range (also a ``ValueError`` for library callers)."""


def check_readable_file(path: Path) -> None:
    """Refuse what is not a readable, non-empty regular file, saying which (one :class:`InputError` line)."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: broken symbolic link or link loop")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied (cannot read the file)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
