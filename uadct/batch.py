"""Batches of subjects: what happened to each one, and splitting them across array jobs.

:class:`SubjectRecord` / :class:`BatchOutcome` are the outcome of every batch command
(``preprocess_many``, ``score_many``): a failing subject is recorded and the batch
carries on.

Sharding (``--shard I/N``, SLURM arrays):

Subjects are sorted by subject id (so a scan ``sub-01.nii.gz`` and its prepared folder
``sub-01/`` fall in the same shard), then shard ``I`` of ``N`` (0-based) takes every
``N``-th one starting at ``I``, so shards are disjoint, cover everything, and stay balanced.
Without ``--shard``, ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT`` are used when
set (the task id is counted from ``SLURM_ARRAY_TASK_MIN``, so ``--array=1-10`` works).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

from uadct.errors import UadctError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; the index is 0-based and below the count."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UadctError(f"--shard {text!r}: expected I/N, e.g. 0/4 (0-based index, count)") from None
    if count < 1 or not 0 <= index < count:
        raise UadctError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of a SLURM array task, or ``None`` outside an array job."""
    environ = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    try:
        task = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
    except ValueError:
        raise UadctError("SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT are not integers") from None
    if count < 1 or not 0 <= task < count:
        raise UadctError(f"SLURM array task {task} is outside 0..{count - 1}; use --array=0-{count - 1} or set --shard")
    return task, count


def resolve_shard(option: str | None) -> tuple[int, int] | None:
    """``--shard`` when given, else the SLURM array variables, else no sharding."""
    return parse_shard(option) if option else shard_from_environment()


def select_shard(items: Sequence[T], shard: tuple[int, int] | None, key=str) -> list[T]:
    """The items of one shard (all items when ``shard`` is None), in sorted order."""
    ordered = sorted(items, key=key)
    if shard is None:
        return list(ordered)
    index, count = shard
    return list(ordered[index::count])


STATUSES = ("done", "skipped", "busy", "failed")


@dataclass
class SubjectRecord:
    """What happened to one subject of a batch.

    ``status``: ``done``, ``skipped`` (already complete), ``busy`` (another live task is
    writing it) or ``failed``; ``output``: the prepared folder or the map; ``error``: the
    one-line message of a failed or busy subject; ``values``: figures of a done subject
    (e.g. ``image_score``).
    """

    subject: str
    input: Path
    status: str
    seconds: float
    output: Path | None = None
    error: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path | None:
        """The prepared folder (preprocessing batches)."""
        return self.output


@dataclass
class BatchOutcome:
    """What happened to each input of a batch (``records`` in input order)."""

    records: list[SubjectRecord] = field(default_factory=list)

    def _with(self, status: str) -> list[SubjectRecord]:
        return [r for r in self.records if r.status == status]

    @property
    def done(self) -> list[Path]:
        return [r.output for r in self._with("done") if r.output is not None]

    @property
    def skipped(self) -> list[Path]:
        return [r.output for r in self._with("skipped") if r.output is not None]

    @property
    def failed(self) -> list[tuple[Path, str]]:
        return [(r.input, r.error or "") for r in self._with("failed")]

    @property
    def busy(self) -> list[tuple[Path, str]]:
        return [(r.input, r.error or "") for r in self._with("busy")]


def read_path_list(lines: Iterable[str] | None = None) -> list[Path]:
    """Paths given one per line (the ``-`` argument: standard input); blank lines skipped."""
    return [Path(line.strip()) for line in (sys.stdin if lines is None else lines) if line.strip()]
