"""A deterministic demo cohort built from real anatomy: the SRI24 head T1 with skull.

Every subject is the atlas head, for test subjects with 1-3 inserted lesions, put
through a random contrast change, a random affine plus smooth elastic deformation,
a smooth bias field and Rician noise, and written on its own grid (some in another
orientation or voxel size). Test subjects get a uint8 lesion mask on exactly their
grid, and every subject a truth JSON plus an ITK ``.tfm`` of the generating transform
so registration accuracy can be measured against it.

One job per module: :mod:`~uadct.demo.geometry` (the transform convention: ``p_atlas =
B(A(p_subject))``, and :func:`atlas_to_subject`, its inverse), :mod:`~uadct.demo.anatomy`
(the atlas head prepared once per cohort), :mod:`~uadct.demo.plan` (every random choice
of a subject), :mod:`~uadct.demo.render` (a plan -> image, label, transform, truth) and
:mod:`~uadct.demo.cohort` (writing the cohort). The names callers need are re-exported here.

Layout under ``out_dir``::

    healthy/<id>.nii.gz   test/<id>.nii.gz   labels/<id>.nii.gz (test only)
    truth/<id>.json       truth/<id>.tfm
"""

from uadct.demo.anatomy import DemoAnatomy
from uadct.demo.cohort import Cohort, generate_cohort
from uadct.demo.geometry import atlas_to_subject, read_truth_transform
from uadct.demo.plan import GRID_SCHEDULE, Lesion, SubjectPlan, plan_subject
from uadct.demo.render import RenderedSubject, render_subject

__all__ = ["GRID_SCHEDULE", "Cohort", "DemoAnatomy", "Lesion", "RenderedSubject", "SubjectPlan", "atlas_to_subject",
           "generate_cohort", "plan_subject", "read_truth_transform", "render_subject"]
