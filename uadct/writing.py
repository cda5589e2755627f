"""Writing files atomically: a temporary file beside the target, fsynced, checked, renamed into place.

:func:`atomic_path` is the one way any uadct output reaches the disk: nothing is left at
the target name (and no temporary file) when a write fails, and a full disk or a
read-only filesystem becomes a one-line :class:`~uadct.errors.OutputError`. NIfTI
volumes, JSON and text have their writers here; :mod:`uadct.io` re-exports them.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

from uadct.errors import OutputError
from uadct.names import is_nifti
from uadct.outputs import file_mode, write_failure


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (at most 160 characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


@contextlib.contextmanager
def atomic_path(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; fsync, check and rename it into place on success.

    After the block the temporary file is fsynced (so a full disk shows now, not later),
    must not be empty, passes ``verify(tmp)`` (e.g. its size against its header), gets
    the permissions the umask allows, and is renamed to ``path``. Nothing is left at
    ``path`` (and no temporary file) when any of this fails: an ``OSError`` or a writer's
    ``RuntimeError`` (disk full, read-only filesystem) becomes a one-line
    :class:`~uadct.errors.OutputError`.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_failure(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _settle(tmp_path, path, verify)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise write_failure(path, exc) from None
    except RuntimeError as exc:
        tmp_path.unlink(missing_ok=True)
        if _is_write_failure(exc):  # ITK and torch.save report a failed write as RuntimeError
            raise write_failure(path, exc) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _is_write_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("writ", "disk", "space", "could not open", "permission"))


def _settle(tmp: Path, path: Path, verify: Callable[[Path], None] | None) -> None:
    """fsync the written temporary file, refuse it empty, verify it, set the umask's permissions."""
    descriptor = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if tmp.stat().st_size == 0:
        raise OutputError(f"{path}: could not be written (0 bytes reached the disk; is it full?); nothing was left at that name")
    if verify is not None:
        verify(tmp)
    os.chmod(tmp, file_mode())


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image atomically (temporary file, then rename); a NIfTI's size is checked
    against its header first, since ITK does not raise on a full disk."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".dcm"):
        from uadct.images2d import encode_image_2d

        picture, image_format, options = encode_image_2d(image, path)  # a 2D map or mask (uadct.images2d owns the format)
        with atomic_path(path) as tmp:
            picture.save(tmp, format=image_format, **options)
        return path
    verify = (lambda tmp: _verify_written_nifti(tmp, image, path)) if is_nifti(path) else None
    with atomic_path(path, verify) as tmp, _native_stderr_silenced():
        sitk.WriteImage(image, str(tmp), useCompression=str(path).endswith(".gz"))
    return path


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Keep C libraries' messages (niftilib's "** ERROR: NWAD: wrote only 0 of N bytes") off
    stderr: a failed write is reported once, as one line, by the size check after it."""
    descriptor = saved = -1
    try:
        saved = os.dup(2)
        descriptor = os.open(os.devnull, os.O_WRONLY)
        os.dup2(descriptor, 2)
    except OSError:
        pass
    try:
        yield
    finally:
        if saved >= 0:
            os.dup2(saved, 2)
            os.close(saved)
        if descriptor >= 0:
            os.close(descriptor)


def _verify_written_nifti(tmp: Path, image: sitk.Image, path: Path) -> None:
    """Refuse a written NIfTI holding fewer bytes than its header and voxels need
    (a .nii.gz is decompressed through to its checksum)."""
    data_bytes = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        if tmp.name.endswith(".gz"):
            with gzip.open(tmp, "rb") as stream:
                head = stream.read(352)
                total = len(head)
                while block := stream.read(1 << 22):
                    total += len(block)
        else:
            with open(tmp, "rb") as stream:
                head = stream.read(352)
            total = tmp.stat().st_size
    except (OSError, EOFError, zlib.error) as exc:
        raise OutputError(f"{path}: could not be written (the file is truncated or corrupt: {one_line(exc)}; is the disk full?); "
                          "nothing was left at that name") from None
    if len(head) < 348:
        raise OutputError(f"{path}: could not be written (only {total} bytes reached the disk; is it full?); nothing was left at that name")
    order = "<" if struct.unpack_from("<i", head, 0)[0] == 348 else ">"
    expected = int(struct.unpack_from(order + "f", head, 108)[0]) + data_bytes
    if total < expected:
        raise OutputError(f"{path}: could not be written (only {total} of {expected} bytes reached the disk; is it full?); "
                          "nothing was left at that name")


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically, pretty-printed; NaN and infinities are written as null (valid JSON)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, default=_json_default, allow_nan=False) + "\n", encoding="utf-8")
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (numpy ones included) replaced by None."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
