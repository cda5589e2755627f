"""The output policy: no command may destroy a user's data.

Every command checks its outputs before any work and writes them the same way:

- an output that is, or would replace, one of the command's inputs (same path, same
  file through a link, the BIDS sidecar ``<id>.json`` of an input scan, a file inside an
  input folder) is refused with one line (:func:`refuse_overwriting_inputs`);
- two inputs that would be written to one output name (``sub-x.nii`` and ``sub-x.nii.gz``)
  are refused before any work (:func:`refuse_shared_outputs`);
- an output file whose name is an existing folder, a folder whose name is an existing
  file, and a folder that cannot be written (read-only filesystem, no permission) are
  refused before any work (:func:`check_output_file`, :func:`check_output_folder`);
- outputs are written to a temporary file in the target folder, flushed, fsynced and
  size-checked, then renamed; a failed write removes the temporary file and raises
  :class:`~uadct.errors.OutputError` (:func:`uadct.io.atomic_path`);
- files get the permissions the umask allows (``0o666 & ~umask``), folders
  ``0o777 & ~umask`` (:func:`file_mode`, :func:`folder_mode`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from uadct.errors import OutputError
from uadct.names import is_nifti, strip_nifti_suffix


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new output file: what the umask allows of ``rw-rw-rw-``."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """Permissions of a new output folder: what the umask allows of ``rwxrwxrwx``."""
    return 0o777 & ~current_umask()


def _key(path: Path) -> Path:
    """A path as the filesystem sees it (links and ``..`` resolved)."""
    return Path(os.path.realpath(path))


def same_path(a: str | Path, b: str | Path) -> bool:
    """True when two paths name the same file (same resolved path, or same device and inode)."""
    a, b = Path(a), Path(b)
    if _key(a) == _key(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return _key(folder) in _key(path).parents


def protected_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs and what belongs to them: a scan and its BIDS sidecar ``<id>.json``."""
    protected: list[Path] = []
    for item in inputs:
        path = Path(item)
        protected.append(path)
        if is_nifti(path):
            protected.append(path.with_name(strip_nifti_suffix(path) + ".json"))
    return protected


def refuse_overwriting_inputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path]) -> None:
    """Raise :class:`OutputError` when an output is, or would replace, an input (or its sidecar),
    or would replace a file inside an input folder (a prepared subject)."""
    protected = protected_paths(inputs)
    for output in outputs:
        if output is None:
            continue
        output = Path(output)
        for item in protected:
            if same_path(output, item):
                raise OutputError(f"{output}: refusing to overwrite the input {item}; choose another output")
            if item.is_dir() and output.exists() and _inside(output, item):
                raise OutputError(f"{output}: refusing to overwrite a file of the input folder {item}; choose another output")


def refuse_shared_outputs(pairs: Iterable[tuple[str | Path, Sequence[str | Path | None]]]) -> None:
    """``pairs``: (input, its outputs). Raise :class:`OutputError` when two inputs, or two
    outputs of one input, would be written to one file (e.g. ``sub-x.nii`` and ``sub-x.nii.gz``
    both giving ``sub-x.nii.gz``; a brain mask named like the map)."""
    owners: dict[Path, tuple[Path, Path]] = {}
    for source, outputs in pairs:
        for output in outputs:
            if output is None:
                continue
            key = _key(Path(output))
            if key in owners:
                other, first = owners[key]
                if Path(source) == other:
                    raise OutputError(f"{output}: two outputs of {source} would be written to this one file "
                                      f"(also {first}); give them different names")
                raise OutputError(f"{output}: both {other} and {source} would be written here; "
                                  "rename one of the inputs or score them separately")
            owners[key] = (Path(source), Path(output))


def refuse_shared_names(named: Iterable[tuple[str, str | Path]], folder: str | Path) -> None:
    """``named``: (output name, input). Two inputs with one output name inside ``folder`` are refused."""
    seen: dict[str, Path] = {}
    for name, source in named:
        if name in seen and Path(source) != seen[name]:
            raise OutputError(f"{Path(folder) / name}: both {seen[name]} and {source} would be written here; "
                              "rename one of the inputs")
        seen[name] = Path(source)


def check_writable_folder(folder: str | Path) -> None:
    """Refuse a folder that cannot be created or written (before any work): a file on the
    way, a read-only filesystem, no permission. A probe file is created and removed."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise OutputError(f"{existing}: broken symbolic link on the way to the output {folder}")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder:
            raise OutputError(f"{folder}: is a file; expected a folder for the outputs")
        raise OutputError(f"{existing}: is a file, so the output folder {folder} cannot be created")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".uadct-write-test.", suffix=".tmp", dir=existing)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write there ({exc.strerror or exc})") from None
    os.close(descriptor)
    os.unlink(probe)


def check_output_file(path: str | Path, what: str = "output") -> None:
    """Refuse an output file name that is an existing folder, or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; expected a file name for the {what}")
    check_writable_folder(path.parent)


def check_output_folder(path: str | Path) -> None:
    """Refuse an output folder name that is an existing file, or a folder that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: is a file; expected a folder for the outputs")
    check_writable_folder(path)


def write_failure(path: str | Path, exc: BaseException) -> OutputError:
    """The one-line error for a write that failed (disk full, read-only, permission)."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        reason = reason.removeprefix("Description:").strip()[:160]
    return OutputError(f"{path}: could not be written ({reason}); nothing was left at that name")
