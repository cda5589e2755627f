"""Public training datasets: download (resumable, checksummed) and unpack into a folder of scans.

Only IXI for now: nearly 600 MR scans of healthy subjects from three London hospitals,
CC BY-SA 3.0, one tar archive per modality on the project's own site. The download goes to
``<out>/.downloads/<archive>.part``; an interrupted download continues from where it stopped
(HTTP ``Range``) when run again. The archive is checked against its MD5 (as published by
TorchIO's IXI loader) before anything is unpacked; the members are unpacked into a staging
folder, checked to be plain files inside it, and renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from uadct.errors import UadctError

log = logging.getLogger(__name__)

ByteProgress = Callable[[int, int | None], None]
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0

IXI_URL = "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI-{modality}.tar"
IXI_HOME = "https://brain-development.org/ixi-dataset/"
# MD5 of the official archives, as listed by TorchIO (torchio/datasets/ixi.py); sizes are not published
IXI_MD5 = {
    "T1": "34901a0593b41dd19c1a1f746eac2d58",
    "T2": "e3140d78730ecdd32ba92da48c0a9aaa",
    "PD": "88ecd9d1fa33cb4a2278183b42ffd749",
    "MRA": "29be7d2fee3998f978a55a9bdaf3407e",
}
IXI_LICENCE = (
    "IXI (Information eXtraction from Images, EPSRC GR/S21533/02), Imperial College London: "
    "CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/legalcode). Acknowledge the "
    f"source of the data, e.g. {IXI_HOME}; share derived data under the same licence."
)


class DownloadError(UadctError):
    """A download or unpacking failed (network, checksum, broken archive)."""


@dataclass(frozen=True)
class DatasetArchive:
    """One downloadable archive: where it is, its checksum (MD5 hex, or None) and its terms."""

    dataset: str
    modality: str
    url: str
    md5: str | None
    licence: str

    @property
    def file_name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1] or f"{self.dataset}-{self.modality}.tar"


@dataclass
class FetchResult:
    """What ``fetch_dataset`` produced: the folder of scans and its files."""

    folder: Path
    files: list[Path]
    archive: DatasetArchive
    skipped: bool = False


def dataset_archive(dataset: str, modality: str, url: str | None = None, md5: str | None = None) -> DatasetArchive:
    """The archive of ``dataset``/``modality``; ``url`` and ``md5`` replace the official ones (a mirror)."""
    if dataset.lower() != "ixi":
        raise UadctError(f"unknown dataset {dataset!r}; available: ixi")
    modality = modality.upper() if modality.upper() in IXI_MD5 else modality
    if modality not in IXI_MD5:
        raise UadctError(f"IXI has no modality {modality!r}; available: {', '.join(IXI_MD5)}")
    return DatasetArchive("ixi", modality, url or IXI_URL.format(modality=modality),
                          md5 if url else (md5 or IXI_MD5[modality]), IXI_LICENCE)


def md5_of(path: Path) -> str:
    """Hex MD5 of a file's bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, md5: str | None = None, progress: ByteProgress | None = None,
             timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``target``, continuing a ``target.part`` left by an interrupted run.

    The server's answer to ``Range`` decides: 206 appends, 200 starts again, 416 means the
    part file is already whole. The file is renamed to ``target`` only when the transfer is
    complete and its MD5 matches; a mismatch removes the part file (it cannot be resumed).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        response = None  # range not satisfiable: nothing left to fetch
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: cannot connect ({getattr(exc, 'reason', exc)}); the download needs the internet") from None
    if response is not None:
        with response:
            if response.status == 200:
                offset = 0  # the server ignored the range: start again
            total = _total_size(response, offset)
            done = offset
            if offset:
                log.info("resuming %s at byte %d", url, offset)
            with open(partial, "ab" if offset else "wb") as handle:
                try:
                    while block := response.read(CHUNK_BYTES):
                        handle.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
                except (OSError, http.client.HTTPException) as exc:  # reset connection, IncompleteRead
                    raise DownloadError(f"{url}: interrupted after {done} bytes ({exc}); run again to resume") from None
            if total is not None and done < total:
                raise DownloadError(f"{url}: interrupted after {done} of {total} bytes; run again to resume")
    if md5 is not None:
        found = md5_of(partial)
        if found != md5:
            partial.unlink()
            raise DownloadError(f"{target.name}: checksum mismatch (MD5 {found}, expected {md5}); the partial file was removed")
    partial.replace(target)
    return target


def _total_size(response: object, offset: int) -> int | None:
    headers = response.headers  # type: ignore[attr-defined]
    content_range = headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def unpack_tar(archive: Path, folder: Path) -> list[Path]:
    """Unpack the regular files of a tar archive into ``folder`` (flat, by their base names).

    Links, devices and names that would leave the folder are refused; a truncated or
    corrupt archive raises :class:`DownloadError` and leaves nothing behind.
    """
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: list[Path] = []
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = Path(member.name).name
                if not member.isfile() or name in ("", ".", "..") or name.startswith("."):
                    raise DownloadError(f"{archive}: unexpected member {member.name!r} (not a plain file)")
                source = tar.extractfile(member)
                if source is None:
                    raise DownloadError(f"{archive}: cannot read member {member.name!r}")
                with source, open(staging / name, "wb") as handle:
                    shutil.copyfileobj(source, handle, CHUNK_BYTES)
                files.append(folder / name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: broken tar archive ({exc})") from None
    except DownloadError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not files:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: the archive holds no files")
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)
    return sorted(files)


def fetch_dataset(archive: DatasetArchive, out_dir: str | Path, progress: ByteProgress | None = None,
                  keep_archive: bool = False, force: bool = False) -> FetchResult:
    """Download ``archive`` into ``out_dir`` and unpack it to ``out_dir/<dataset>/<modality>/``.

    A folder unpacked before is kept (``skipped``) unless ``force``.
    """
    out_dir = Path(out_dir)
    folder = out_dir / archive.dataset / archive.modality
    if folder.is_dir() and any(folder.iterdir()) and not force:
        return FetchResult(folder, sorted(p for p in folder.iterdir() if p.is_file()), archive, skipped=True)
    target = out_dir / ".downloads" / archive.file_name
    if not target.exists():
        download(archive.url, target, archive.md5, progress)
    elif archive.md5 is not None and md5_of(target) != archive.md5:
        target.unlink()
        download(archive.url, target, archive.md5, progress)
    files = unpack_tar(target, folder)
    if not keep_archive:
        target.unlink()
    return FetchResult(folder, files, archive)
