"""Registration of a subject to the atlas (SimpleITK or itk-elastix), and the transforms it yields.

Two backends: ``sitk`` (the default, :mod:`uadct.preprocess.sitkreg`: SimpleITK's own
registration on 2 mm copies of both brains, ~1 s) and ``elastix`` (itk-elastix; its
first call in a process spends ~12 s loading ITK's wrapped libraries). Elastix estimates a transform ``T`` that maps points of the fixed image (the atlas) to
points of the moving image (the subject), both in ITK's physical LPS millimetres.
:func:`register_to_atlas` returns it as a ``SimpleITK.AffineTransform`` so that
resampling onto the atlas grid, and the inverse trip of an anomaly map back to the
subject's grid, go through one well-tested code path (``SimpleITK.Resample``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import PreprocessError

log = logging.getLogger(__name__)

REGISTRATION_KINDS = ("affine", "rigid", "none")
REGISTRATION_BACKENDS = ("sitk", "elastix")
LEGACY_REGISTRATION_BACKEND = "elastix"  # what configs recorded without registration_backend ran


@dataclass
class Registration:
    """Result of registering a subject to the atlas.

    ``atlas_to_subject`` maps atlas physical points to subject physical points (the
    direction resampling onto the atlas grid needs); ``parameter_text`` is elastix's
    transform parameter file (kept for provenance and for transformix), or the sitk
    backend's settings and result in the same ``(Key value)`` style.
    """

    atlas_to_subject: sitk.AffineTransform
    parameter_text: str
    kind: str

    def subject_to_atlas(self) -> sitk.Transform:
        """The inverse mapping (subject points to atlas points)."""
        return self.atlas_to_subject.GetInverse()


def sitk_to_itk(image: sitk.Image):
    """Convert a 3D SimpleITK image to an ITK image with the same geometry (float32)."""
    import itk

    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    converted = itk.GetImageFromArray(np.ascontiguousarray(array))
    converted.SetSpacing(image.GetSpacing())
    converted.SetOrigin(image.GetOrigin())
    converted.SetDirection(itk.matrix_from_array(np.array(image.GetDirection()).reshape(3, 3)))
    return converted


def _parameter_map(kind: str, resolutions: int, iterations: int, samples: int):
    import itk

    parameters = itk.ParameterObject.New()
    base = "rigid" if kind == "rigid" else "affine"
    pmap = parameters.GetDefaultParameterMap(base, resolutions)
    pmap["AutomaticTransformInitialization"] = ["true"]
    pmap["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    pmap["MaximumNumberOfIterations"] = [str(iterations)]
    pmap["NumberOfSpatialSamples"] = [str(samples)]
    pmap["ImageSampler"] = ["RandomCoordinate"]
    pmap["NewSamplesEveryIteration"] = ["true"]
    pmap["FixedImagePyramid"] = ["FixedRecursiveImagePyramid"]
    pmap["MovingImagePyramid"] = ["MovingRecursiveImagePyramid"]
    pmap["RandomSeed"] = ["121212"]
    pmap["WriteResultImage"] = ["false"]
    pmap["ResultImageFormat"] = ["nii.gz"]
    pmap["DefaultPixelValue"] = ["0"]
    # the result image is never used (resampling goes through SimpleITK): make it cheap
    pmap["ResampleInterpolator"] = ["FinalNearestNeighborInterpolator"]
    pmap["FinalBSplineInterpolationOrder"] = ["0"]
    parameters.AddParameterMap(pmap)
    return parameters


def elastix_failure(exc: BaseException, subject_brain: sitk.Image) -> str:
    """One line for a failed elastix run: its own reason when it gives one, never its advice
    to call LogToConsoleOn() (a library call the user cannot make), plus the intensity range."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not re.search(r"\.(hxx|cxx|h|cpp):\d*:?$", ln.strip())]
    reason = lines[-1] if lines else "no reason given"
    reason = re.sub(r"^(ITK ERROR: )?\w+\(0x[0-9a-f]+\): ", "", reason.removeprefix("Description:").strip())
    reason = re.sub(r"\s*See elastix log.*$", "", reason, flags=re.IGNORECASE).rstrip(": ")
    if "logtoconsole" in reason.lower() or not reason:
        reason = "no reason given"
    values = sitk.GetArrayViewFromImage(subject_brain)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return (f"elastix registration failed ({reason}); the skull-stripped scan's intensities span {low:.4g}..{high:.4g}: "
            "check that it is a plain MR or CT intensity image")


def register_to_atlas(
    subject_brain: sitk.Image,
    atlas_brain: sitk.Image,
    kind: str = "affine",
    resolutions: int = 4,
    iterations: int = 250,
    samples: int = 4096,
    backend: str = "sitk",
) -> Registration:
    """Register a skull-stripped subject to a skull-stripped atlas.

    Mattes mutual information, a smoothing pyramid of ``resolutions`` levels and
    ``iterations`` adaptive stochastic gradient steps per level. ``kind`` is
    ``affine`` (12 parameters), ``rigid`` (6) or ``none`` (identity: input already on
    the atlas grid). ``backend`` is ``sitk`` (:func:`uadct.preprocess.sitkreg.register_sitk`;
    ``resolutions``, ``iterations`` and ``samples`` are elastix's) or ``elastix``.
    """
    if kind not in REGISTRATION_KINDS:
        raise PreprocessError(f"unknown registration {kind!r}; choose one of {', '.join(REGISTRATION_KINDS)}")
    if backend not in REGISTRATION_BACKENDS:
        raise PreprocessError(f"unknown registration backend {backend!r}; choose one of {', '.join(REGISTRATION_BACKENDS)}")
    if kind == "none":
        identity = sitk.AffineTransform(3)
        return Registration(identity, "", kind)
    if backend == "sitk":
        from uadct.preprocess.sitkreg import register_sitk

        transform, text = register_sitk(subject_brain, atlas_brain, kind)
        return Registration(transform, text, kind)
    import itk

    fixed = sitk_to_itk(atlas_brain)
    moving = sitk_to_itk(subject_brain)
    parameters = _parameter_map(kind, resolutions, iterations, samples)
    try:
        _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    except RuntimeError as exc:
        raise PreprocessError(elastix_failure(exc, subject_brain)) from None
    transform = elastix_to_sitk(result, 0)
    text = _parameter_text(result)
    return Registration(transform, text, kind)


def elastix_to_sitk(result, index: int = 0) -> sitk.AffineTransform:
    """Convert elastix's Euler/Affine transform parameters into a SimpleITK affine.

    Elastix writes ``T(x) = A (x - c) + t + c``; SimpleITK's AffineTransform with
    matrix ``A``, translation ``t`` and centre ``c`` is the same mapping.
    """
    name = result.GetParameter(index, "Transform")[0]
    values = np.array([float(v) for v in result.GetParameter(index, "TransformParameters")])
    centre = [float(v) for v in result.GetParameter(index, "CenterOfRotationPoint")]
    affine = sitk.AffineTransform(3)
    if name == "AffineTransform":
        affine.SetMatrix(values[:9].tolist())
        affine.SetTranslation(values[9:12].tolist())
    elif name == "EulerTransform":
        euler = sitk.Euler3DTransform()
        euler.SetCenter(centre)
        euler.SetComputeZYX(result.GetParameter(index, "ComputeZYX")[0] == "true" if result.HasParameter(index, "ComputeZYX") else False)
        euler.SetRotation(*values[:3].tolist())
        euler.SetTranslation(values[3:6].tolist())
        affine.SetMatrix(euler.GetMatrix())
        affine.SetTranslation(euler.GetTranslation())
    else:
        raise PreprocessError(f"unsupported elastix transform {name!r}")
    affine.SetCenter(centre)
    return affine


def _parameter_text(result) -> str:
    lines = []
    for key, value in dict(result.GetParameterMap(0)).items():
        rendered = " ".join(v if _is_number(v) else f'"{v}"' for v in value)
        lines.append(f"({key} {rendered})")
    return "\n".join(lines) + "\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resample_to_grid(
    image: sitk.Image,
    grid: sitk.Image,
    grid_to_image: sitk.Transform,
    interpolator: int = sitk.sitkLinear,
    default: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto ``grid``'s geometry.

    ``grid_to_image`` maps physical points of the output grid to points of ``image``.
    """
    return sitk.Resample(image, grid, grid_to_image, interpolator, default, sitk.sitkFloat32)


def save_transform(transform: sitk.Transform, path: str | Path) -> None:
    """Write a SimpleITK transform file (``.tfm``)."""
    sitk.WriteTransform(transform, str(path))


def load_affine(path: str | Path) -> sitk.AffineTransform:
    """Read an affine written by :func:`save_transform`."""
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError:
        raise PreprocessError(f"{path}: not a readable transform file") from None
    if transform.GetDimension() != 3:
        raise PreprocessError(f"{path}: expected a 3D transform")
    flat = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if isinstance(flat, sitk.CompositeTransform):
        flat = flat.GetNthTransform(0).Downcast()
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(flat.GetMatrix())
    affine.SetTranslation(flat.GetTranslation())
    affine.SetCenter(flat.GetCenter())
    return affine


def mean_displacement_mm(a: sitk.Transform, b: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance (mm) between where two transforms send the ``(N, 3)`` points."""
    distances = [np.linalg.norm(np.subtract(a.TransformPoint(tuple(p)), b.TransformPoint(tuple(p)))) for p in points]
    return float(np.mean(distances))
