"""The demo cohort: deterministic, real anatomy, labels on each subject's grid, exact truth transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from uadct.atlas import Atlas, load_atlas
from uadct.demo import (
    Cohort,
    DemoAnatomy,
    atlas_to_subject,
    generate_cohort,
    plan_subject,
    read_truth_transform,
    render_subject,
)
from uadct.demo.anatomy import prepared_anatomy as _prepared
from uadct.errors import AtlasError
from uadct.io import read_image, same_grid

SCALE = 2.0  # 2 mm voxels: ~120x130x100 volumes, well under a second per subject


@pytest.fixture(scope="session")
def sri24() -> Atlas:
    """The cached SRI24 atlas (UADCT_HOME must hold it)."""
    return load_atlas("sri24")


@pytest.fixture(scope="module")
def cohort(sri24: Atlas, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    calls: list[tuple[int, int]] = []
    result = generate_cohort(tmp_path_factory.mktemp("demo"), n_healthy=2, n_test=2, seed=7, atlas=sri24,
                             voxel_scale=SCALE, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    return result


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _truth(cohort: Cohort, sid: str) -> dict:
    return json.loads((cohort.root / "truth" / f"{sid}.json").read_text(encoding="utf-8"))


@pytest.mark.slow


def test_layout_ids_and_healthy_have_no_labels(cohort: Cohort) -> None:
    assert [p.name for p in cohort.healthy] == ["sub-h000.nii.gz", "sub-h001.nii.gz"]
    assert [p.name for p in cohort.test] == ["sub-t000.nii.gz", "sub-t001.nii.gz"]
    assert [p.name for p in cohort.labels] == [p.name for p in cohort.test]
    assert sorted(p.name for p in (cohort.root / "labels").iterdir()) == ["sub-t000.nii.gz", "sub-t001.nii.gz"]
    assert [p.name for p in cohort.truth] == [f"{p.name[:-7]}.json" for p in cohort.healthy + cohort.test]
    for sid in ("sub-h000", "sub-h001"):
        truth = _truth(cohort, sid)
        assert truth["lesions"] == [] and truth["label_voxels"] == 0
        assert (cohort.root / "truth" / f"{sid}.tfm").is_file()
    for sid in ("sub-t000", "sub-t001"):
        assert 1 <= len(_truth(cohort, sid)["lesions"]) <= 3


def test_same_seed_same_cohort_other_seed_differs(cohort: Cohort, sri24: Atlas, tmp_path: Path) -> None:
    # a smaller cohort with the same seed reproduces its subjects bit for bit
    again = generate_cohort(tmp_path / "again", n_healthy=1, n_test=1, seed=7, atlas=sri24, voxel_scale=SCALE)
    for first, second in ((cohort.healthy[0], again.healthy[0]), (cohort.test[0], again.test[0]),
                          (cohort.labels[0], again.labels[0])):
        assert np.array_equal(_array(first), _array(second))
        assert same_grid(sitk.ReadImage(str(first)), sitk.ReadImage(str(second)))
    other = generate_cohort(tmp_path / "other", n_healthy=1, n_test=0, seed=8, atlas=sri24, voxel_scale=SCALE)
    assert other.test == [] and other.labels == []
    a, b = _array(cohort.healthy[0]), _array(other.healthy[0])
    assert a.shape != b.shape or np.abs(a.astype(float) - b).mean() > 10


def test_images_are_heads_with_the_whole_head_inside_the_grid(cohort: Cohort) -> None:
    for path in cohort.healthy + cohort.test:
        image = read_image(path)
        assert image.GetPixelID() == sitk.sitkFloat32  # read_image casts; the file holds int16
        assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
        array = sitk.GetArrayFromImage(image)
        truth = _truth(cohort, path.name[:-7])
        wm = truth["intensity"]["wm_intensity"] * truth["intensity"]["contrast_scale"]
        faces = np.concatenate([array[[0, -1]].ravel(), array[:, [0, -1]].ravel(), array[:, :, [0, -1]].ravel()])
        assert np.mean(faces > 0.3 * wm) < 1e-3, f"{path.name}: the head touches the grid's edge"  # noise alone: ~0
        head = array > 0.3 * wm
        assert 0.2 < head.mean() < 0.8, f"{path.name}: {head.mean():.2f} of the volume is head"


def test_grids_vary_in_orientation_and_voxel_size(cohort: Cohort, sri24: Atlas) -> None:
    images = [sitk.ReadImage(str(p)) for p in cohort.healthy + cohort.test]
    assert all(np.allclose(np.abs(np.linalg.det(np.reshape(i.GetDirection(), (3, 3)))), 1) for i in images)
    assert any(not np.allclose(i.GetDirection(), sri24.head.GetDirection()) for i in images)
    assert any(not np.allclose(i.GetSpacing(), (SCALE,) * 3) for i in images)
    assert any(np.allclose(i.GetSpacing(), (SCALE,) * 3) and np.allclose(i.GetDirection(), sri24.head.GetDirection())
               for i in images)
    for image, path in zip(images, cohort.healthy + cohort.test):
        truth = _truth(cohort, path.name[:-7])
        assert np.allclose(truth["grid"]["spacing"], image.GetSpacing())
        assert truth["orientation"] == sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())


def test_labels_lie_on_their_subject_grid_inside_the_brain(cohort: Cohort, sri24: Atlas) -> None:
    brain = sitk.GetArrayFromImage(sri24.mask) > 0
    for scan, label_path in zip(cohort.test, cohort.labels):
        sid = scan.name[:-7]
        image, label = sitk.ReadImage(str(scan)), sitk.ReadImage(str(label_path))
        assert same_grid(image, label) and label.GetPixelID() == sitk.sitkUInt8
        mask = sitk.GetArrayFromImage(label)
        assert set(np.unique(mask)) == {0, 1}
        assert mask.sum() == _truth(cohort, sid)["label_voxels"] > 0
        # label voxels go back through the true transform into the atlas brain mask
        transform = read_truth_transform(cohort.root / "truth" / f"{sid}.json")
        voxels = np.argwhere(mask)[:: max(1, int(mask.sum()) // 300)]
        inside = 0
        for z, y, x in voxels:
            atlas_point = transform.TransformPoint(image.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
            i, j, k = sri24.mask.TransformPhysicalPointToIndex(atlas_point)
            inside += bool(brain[k, j, i])
        assert inside / len(voxels) > 0.95
        # each lesion centre, mapped into the subject, falls on (or next to) a labelled voxel
        for lesion in _truth(cohort, sid)["lesions"]:
            x, y, z = np.rint(image.TransformPhysicalPointToContinuousIndex(lesion["centre_mm_subject"])).astype(int)
            assert mask[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2].any(), lesion


def test_lesions_are_brighter_or_darker_than_the_healthy_twin(sri24: Atlas) -> None:
    anatomy = _prepared(sri24)
    plans = [plan_subject(anatomy, "test", i, seed=7, voxel_scale=SCALE) for i in range(12)]
    kinds_seen: set[str] = set()
    for plan in plans:
        kinds = {lesion.kind for lesion in plan.lesions}
        if kinds <= kinds_seen:
            continue
        kinds_seen |= kinds
        with_lesions, healthy = render_subject(anatomy, plan), render_subject(anatomy, plan, with_lesions=False)
        assert healthy.label is not None and not sitk.GetArrayFromImage(healthy.label).any()
        assert same_grid(with_lesions.image, healthy.image)
        sick, twin = (sitk.GetArrayFromImage(s.image).astype(float) for s in (with_lesions, healthy))
        label = sitk.GetArrayFromImage(with_lesions.label) > 0
        components, _ = ndimage.label(label)
        for lesion, entry in zip(plan.lesions, with_lesions.truth["lesions"]):
            centre = np.array(with_lesions.image.TransformPhysicalPointToContinuousIndex(entry["centre_mm_subject"]))[::-1]
            labelled = np.argwhere(label)
            nearest = labelled[np.argmin(np.linalg.norm(labelled - centre, axis=1))]
            region = components == components[tuple(nearest)]
            ratio = sick[region].mean() / twin[region].mean()
            if lesion.kind == "hyper":
                assert ratio > 1.3, (lesion, ratio)
            else:
                assert ratio < 0.75, (lesion, ratio)
        # away from the lesions both renderings agree (same transform, contrast, bias and noise)
        wm = with_lesions.truth["intensity"]["wm_intensity"] * plan.contrast_scale
        far = ~ndimage.binary_dilation(label, iterations=5)
        assert np.abs(sick - twin)[far].max() < 0.05 * wm
        assert np.mean(sick[far] == twin[far]) > 0.99
        if kinds_seen == {"hyper", "hypo"}:
            break
    assert kinds_seen == {"hyper", "hypo"}


def test_truth_transform_maps_the_brain_centroid_into_the_head(cohort: Cohort, sri24: Atlas) -> None:
    mask = sitk.GetArrayFromImage(sri24.mask)
    centroid_index = np.argwhere(mask).mean(axis=0)[::-1]  # (x, y, z)
    centroid = np.array(sri24.mask.TransformContinuousIndexToPhysicalPoint(centroid_index.tolist()))
    for path in cohort.healthy + cohort.test:
        sid = path.name[:-7]
        image = read_image(path)
        truth = _truth(cohort, sid)
        transform = read_truth_transform(cohort.root / "truth" / f"{sid}.tfm")
        point = atlas_to_subject([centroid], transform)[0]
        assert np.allclose(transform.TransformPoint(point.tolist()), centroid, atol=1e-4)
        index = np.array(image.TransformPhysicalPointToContinuousIndex(point.tolist()))
        size = np.array(image.GetSize())
        assert np.all(index > 0.2 * size) and np.all(index < 0.8 * size), (sid, index, size)
        # the centroid lands in brain tissue: a 3x3x3 neighbourhood brighter than a third of white matter
        x, y, z = np.rint(index).astype(int)
        array = sitk.GetArrayViewFromImage(image)
        wm = truth["intensity"]["wm_intensity"] * truth["intensity"]["contrast_scale"]
        assert array[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2].mean() > 0.3 * wm
        # the JSON alone rebuilds the same transform
        assert np.allclose(_transform_from_json(truth).TransformPoint(point.tolist()), centroid, atol=1e-4)


def _transform_from_json(truth: dict) -> sitk.Transform:
    affine_json, bspline_json = truth["transform"]["affine"], truth["transform"]["bspline"]
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(np.ravel(affine_json["matrix"]).tolist())
    affine.SetTranslation(affine_json["translation"])
    affine.SetCenter(affine_json["centre"])
    bspline = sitk.BSplineTransform(3, bspline_json["order"])
    bspline.SetTransformDomainOrigin(bspline_json["domain_origin"])
    bspline.SetTransformDomainPhysicalDimensions(bspline_json["domain_physical_dimensions"])
    bspline.SetTransformDomainDirection(bspline_json["domain_direction"])
    bspline.SetTransformDomainMeshSize(bspline_json["mesh_size"])
    bspline.SetParameters(bspline_json["parameters"])
    return sitk.CompositeTransform([bspline, affine])


def test_bad_arguments_and_headless_atlas(sri24: Atlas, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one subject"):
        generate_cohort(tmp_path, n_healthy=0, n_test=0, atlas=sri24)
    with pytest.raises(ValueError, match="voxel_scale"):
        generate_cohort(tmp_path, voxel_scale=0.0, atlas=sri24)
    with pytest.raises(AtlasError, match="no head image"):
        DemoAnatomy(Atlas("mine", sri24.brain, sri24.mask, None, "0"))
