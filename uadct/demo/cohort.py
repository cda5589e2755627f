"""Write a demo cohort: every subject planned, rendered and written with its label and truth files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from uadct.atlas import Atlas, load_atlas
from uadct.demo.anatomy import DemoAnatomy, prepared_anatomy
from uadct.demo.plan import plan_subject
from uadct.demo.render import render_subject
from uadct.errors import SettingError
from uadct.io import atomic_path, write_image, write_json

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Paths of a generated cohort; lists are sorted by subject id."""

    root: Path
    healthy: list[Path]
    test: list[Path]
    labels: list[Path]
    truth: list[Path]


def generate_cohort(
    out_dir: str | Path,
    n_healthy: int = 8,
    n_test: int = 4,
    seed: int = 0,
    atlas: Atlas | DemoAnatomy | None = None,
    voxel_scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Cohort:
    """Write a demo cohort under ``out_dir`` and return its paths.

    Subject ``sub-h<i>`` / ``sub-t<i>`` depends only on ``seed``, its index and
    ``voxel_scale`` (not on the cohort size). ``voxel_scale`` multiplies every output
    voxel size (2.0 gives volumes of about 120x130x100 voxels). ``atlas`` defaults to SRI24; a prepared
    :class:`DemoAnatomy` may be passed too (the last one prepared is reused anyway).
    """
    if n_healthy < 0 or n_test < 0 or n_healthy + n_test == 0:
        raise SettingError(f"need at least one subject, got n_healthy={n_healthy}, n_test={n_test}")
    if not 0.25 <= voxel_scale <= 8.0:
        raise SettingError(f"voxel_scale must be within 0.25..8, got {voxel_scale}")
    anatomy = atlas if isinstance(atlas, DemoAnatomy) else prepared_anatomy(atlas if atlas is not None else load_atlas("sri24"))
    root = Path(out_dir)
    cohort = Cohort(root, [], [], [], [])
    jobs = [("healthy", i) for i in range(n_healthy)] + [("test", i) for i in range(n_test)]
    for done, (group, index) in enumerate(jobs, start=1):
        plan = plan_subject(anatomy, group, index, seed, voxel_scale)
        subject = render_subject(anatomy, plan)
        sid = plan.subject_id
        truth_dir = root / "truth"
        truth_dir.mkdir(parents=True, exist_ok=True)
        tfm = truth_dir / f"{sid}.tfm"
        _write_transform(subject.transform, tfm)
        image_path = write_image(subject.image, root / group / f"{sid}.nii.gz")
        (cohort.healthy if group == "healthy" else cohort.test).append(image_path)
        if subject.label is not None:
            cohort.labels.append(write_image(subject.label, root / "labels" / f"{sid}.nii.gz"))
        subject.truth["transform"]["file"] = tfm.name
        cohort.truth.append(write_json(subject.truth, truth_dir / f"{sid}.json"))
        log.info("demo subject %s (%s, %s, %s mm, %d lesions) written", sid, group, plan.orientation,
                 "x".join(f"{s:g}" for s in plan.spacing), len(plan.lesions))
        if progress is not None:
            progress(done, len(jobs))
    return cohort


def _write_transform(transform: sitk.Transform, path: Path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
