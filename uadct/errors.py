"""The uadct error family: user-facing problems with one-line messages.

The CLI turns every :class:`UadctError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
