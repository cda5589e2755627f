"""The cohort runner: preprocess many subjects, in worker processes when asked.

A failing subject is recorded (:class:`uadct.batch.SubjectRecord`) and the batch carries
on; a subject another live task holds is ``busy``. BIDS inputs make the output folder a
BIDS derivative.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from uadct.atlas import Atlas, load_atlas
from uadct.batch import BatchOutcome, SubjectRecord
from uadct.errors import InputError, UadctError
from uadct.preprocess.bids import SubjectInputs, write_derivative_description
from uadct.preprocess.chain import SubjectBusy, preprocess_subject
from uadct.preprocess.config import PreprocessConfig


def preprocess_many(
    paths: list[Path | SubjectInputs],
    out_dir: str | Path,
    config: PreprocessConfig | None = None,
    force: bool = False,
    progress: Callable[[Path, str], None] | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> BatchOutcome:
    """Preprocess many scans (or :class:`SubjectInputs`); a failing subject is recorded and the batch carries on.

    ``jobs`` > 1 runs subjects in that many worker processes (``spawn`` start method, so
    safe with torch and ITK threads); each worker loads the atlas once and uses
    ``threads`` threads (default ``cpu_count // jobs``; the caller's settings when ``jobs`` is 1). Outputs do not depend on ``jobs``; ``outcome`` lists
    keep the input order and ``progress`` is called as each subject finishes. BIDS
    inputs make ``out_dir`` a BIDS derivative (its ``dataset_description.json``).
    """
    config = config or PreprocessConfig()
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    subjects = [p if isinstance(p, SubjectInputs) else SubjectInputs.single(p) for p in paths]
    outcome = BatchOutcome()
    results: dict[int, tuple[str, Path | str, float]] = {}

    def record(index: int, status: str, value: Path | str, seconds: float) -> None:
        results[index] = (status, value, seconds)
        if progress is not None:
            progress(Path(subjects[index].reference_path), status)

    atlas = None if config.is_2d else load_atlas(config.atlas)  # fails early, for any number of jobs, when the atlas is missing
    if any(s.bids_prefix is not None for s in subjects):
        write_derivative_description(out_dir)
    jobs = min(jobs, len(subjects))
    if jobs <= 1:
        for index, inputs in enumerate(subjects):
            record(index, *_preprocess_one(inputs, out_dir, config, atlas, force))
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        del atlas  # each worker loads its own
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(config.atlas, threads)) as pool:
            futures = {pool.submit(_worker_preprocess, inputs, out_dir, config, force): index
                       for index, inputs in enumerate(subjects)}
            for future in as_completed(futures):
                record(futures[future], *future.result())
    for index, inputs in enumerate(subjects):
        status, value, seconds = results[index]
        path = Path(inputs.reference_path)
        if status in ("failed", "busy"):
            outcome.records.append(SubjectRecord(inputs.subject, path, status, seconds, error=str(value)))
        else:
            outcome.records.append(SubjectRecord(inputs.subject, path, status, seconds, output=Path(value)))
    return outcome


def _preprocess_one(inputs: SubjectInputs, out_dir: str | Path, config: PreprocessConfig, atlas: Atlas | None,
                    force: bool) -> tuple[str, Path | str, float]:
    """(status, folder or error message, seconds) of one subject; UadctErrors become ``failed``."""
    start = time.perf_counter()
    try:
        folder, skipped = preprocess_subject(inputs, out_dir, config, atlas, force)
    except SubjectBusy as exc:
        return "busy", str(exc), round(time.perf_counter() - start, 3)
    except UadctError as exc:
        return "failed", str(exc), round(time.perf_counter() - start, 3)
    return ("skipped" if skipped else "done"), folder, round(time.perf_counter() - start, 3)


_worker_atlas: dict[str, Atlas] = {}


def _init_worker(atlas_name: str, threads: int) -> None:
    """Worker set-up: thread counts (torch, ITK) and the atlas, loaded once per process."""
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    except (ImportError, AttributeError):
        pass
    from uadct.preprocess.config import NO_ATLAS

    if atlas_name != NO_ATLAS:  # 2D images have none
        _worker_atlas[atlas_name] = load_atlas(atlas_name)


def _worker_preprocess(inputs: SubjectInputs, out_dir: str | Path, config: PreprocessConfig,
                       force: bool) -> tuple[str, Path | str, float]:
    return _preprocess_one(inputs, out_dir, config, _worker_atlas.get(config.atlas), force)

