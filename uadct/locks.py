"""Per-output locks, so array tasks that share an output folder never write the same subject.

Two SLURM array tasks (or two shells) may point at one output folder, with different
shards or overlapping ones by mistake. Before a subject is (re)written its task takes an
exclusive, non-blocking POSIX lock (``fcntl.lockf``, which NFSv4 and Lustre honour) on
``<folder>/.uadct-locks/<name>.lock``. A task that cannot take the lock skips the subject
(another live task is writing it). The kernel drops the lock when its holder dies, even
under ``kill -9``, so a crashed task never blocks a rerun; the empty lock file it leaves
is reused and removed by the next run. While holding the lock, a task also removes the temporary files a killed
predecessor left behind for that subject (see :func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_FOLDER = ".uadct-locks"

try:  # POSIX; on other systems locking is skipped (single-task use only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextmanager
def output_lock(folder: str | Path, name: str) -> Iterator[bool]:
    """Try to lock output ``name`` in ``folder``; yields True when this process holds it.

    Non-blocking: yields False at once when another process holds the lock. On release
    the lock file is deleted (and the lock folder, once empty), so finished runs leave
    nothing behind. A process that locked a file another one had just deleted notices
    that the path no longer names its file and tries again on the new one.
    """
    lock_dir = Path(folder) / LOCK_FOLDER
    path = lock_dir / f"{name}.lock"
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    for _ in range(100):
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed between mkdir and open
            continue
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            yield False
            return
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # locked a file that was deleted meanwhile: take the current one
    else:  # pragma: no cover - needs a pathological race
        yield False
        return
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        try:
            lock_dir.rmdir()
        except OSError:
            pass  # other locks live there
        os.close(descriptor)  # closing releases the lock


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files/folders a killed writer of ``path`` left behind; returns them.

    :func:`uadct.io.atomic_path` and the prepared-folder writer stage outputs as
    ``.<name>.<random>.tmp*`` next to ``path``. Call this only while holding the output's
    lock: then no live process can be writing those names.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*.tmp*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed), path)
    return removed
