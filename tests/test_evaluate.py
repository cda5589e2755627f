"""evaluate_folder on tiny synthetic NIfTI volumes with hand-computed numbers."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score

import uadct.io
from uadct.errors import InputError, UadctError
from uadct.evaluate import EvaluationOptions, EvaluationResult, evaluate_folder

SHAPE = (20, 20, 20)
BRAIN = (slice(2, 18), slice(2, 18), slice(2, 18))  # 16^3 = 4096 voxels where maps are nonzero
N_BRAIN = 16**3


def write_volume(array: np.ndarray, path: Path, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, -10.0, -10.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def brain_map(background: float = 0.1) -> np.ndarray:
    array = np.zeros(SHAPE, dtype=np.float32)
    array[BRAIN] = background
    return array


def perfect_subject() -> tuple[np.ndarray, np.ndarray]:
    """A 4^3 lesion cube and a map that is 1.0 on it, 0.1 elsewhere in the brain."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[8:12, 8:12, 8:12] = 1
    score = brain_map()
    score[label == 1] = 1.0
    return score, label


def partial_subject() -> tuple[np.ndarray, np.ndarray]:
    """Lesion 4^3 cube: half scored 0.9, half 0.5; 32 normal voxels also scored 0.9.

    Thresholds: 0.9 -> TP 32, FP 32, Dice 64/128 = 0.5; 0.5 -> TP 64, FP 32, Dice 128/160 = 0.8.
    AUROC = 32 * (4000 + 32/2) + 32 * 4000 over 64 * 4032; AP = 0.5 * 32/64 + 0.5 * 64/96.
    """
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[4:8, 4:8, 4:8] = 1
    score = brain_map()
    score[4:6, 4:8, 4:8] = 0.9
    score[6:8, 4:8, 4:8] = 0.5
    score[12:14, 12:16, 12:16] = 0.9  # false positives
    return score, label


PARTIAL_AUROC = (32 * (4000 + 16) + 32 * 4000) / (64 * 4032)
PARTIAL_AUPRC = 0.5 * 0.5 + 0.5 * (64 / 96)


def healthy_subject() -> tuple[np.ndarray, np.ndarray]:
    score = brain_map()
    score[5:7, 5:7, 5:7] = 0.6
    return score, np.zeros(SHAPE, dtype=np.uint8)


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, Path]:
    maps, labels = tmp_path / "maps", tmp_path / "labels"
    subjects = {"sub-a": perfect_subject(), "sub-b": partial_subject(), "sub-c": healthy_subject()}
    for name, (score, label) in subjects.items():
        write_volume(score, maps / f"{name}.nii.gz")
    write_volume(subjects["sub-a"][1], labels / "sub-a.nii.gz")
    write_volume(subjects["sub-b"][1], labels / "sub-b.nii")  # matched across .nii / .nii.gz
    write_volume(subjects["sub-c"][1], labels / "sub-c.nii.gz")
    write_volume(perfect_subject()[0], maps / "sub-d.nii.gz")  # no label: skipped
    write_volume(perfect_subject()[1], labels / "sub-e.nii.gz")  # no map: ignored
    (maps / "notes.txt").write_text("not a volume")
    return {"maps": maps, "labels": labels, "out": tmp_path / "out", "root": tmp_path}


def pooled_reference(subjects: list[tuple[np.ndarray, np.ndarray]], brain: np.ndarray | None = None) -> tuple[float, float]:
    scores, labels = [], []
    for score, label in subjects:
        region = brain if brain is not None else (score != 0) | (label != 0)
        scores.append(score[region])
        labels.append(label[region] != 0)
    return roc_auc_score(np.concatenate(labels), np.concatenate(scores)), average_precision_score(
        np.concatenate(labels), np.concatenate(scores)
    )


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_evaluate_folder_numbers_and_files(cohort: dict[str, Path]) -> None:
    calls: list[tuple[int, int, str]] = []
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], progress=lambda *a: calls.append(a))

    assert isinstance(result, EvaluationResult)
    assert [row["subject"] for row in result.per_subject] == ["sub-a", "sub-b", "sub-c"]
    assert result.missing == ["sub-d"]
    assert calls == [(1, 3, "sub-a"), (2, 3, "sub-b"), (3, 3, "sub-c")]
    a, b, c = result.per_subject

    assert (a["auroc"], a["auprc"], a["best_dice"], a["best_dice_threshold"]) == (1.0, 1.0, 1.0, 1.0)
    assert (a["n_voxels"], a["n_positive"]) == (N_BRAIN, 64)

    assert b["auroc"] == pytest.approx(PARTIAL_AUROC, rel=1e-12)
    assert b["auprc"] == pytest.approx(PARTIAL_AUPRC, rel=1e-12)
    assert b["best_dice"] == pytest.approx(0.8, rel=1e-12)
    assert b["best_dice_threshold"] == pytest.approx(0.5)
    assert (b["n_voxels"], b["n_positive"]) == (N_BRAIN, 64)

    assert math.isnan(c["auroc"]) and math.isnan(c["auprc"]) and math.isnan(c["best_dice"])
    assert (c["n_voxels"], c["n_positive"]) == (N_BRAIN, 0)

    # pooled: all brain voxels together; the healthy subject adds 4096 normal voxels
    auroc, auprc = pooled_reference([perfect_subject(), partial_subject(), healthy_subject()])
    assert result.pooled["n_voxels"] == 3 * N_BRAIN and result.pooled["n_positive"] == 128
    assert result.pooled["auroc"] == pytest.approx(auroc, rel=1e-12)
    assert result.pooled["auprc"] == pytest.approx(auprc, rel=1e-12)
    # pooled thresholds: 1.0 -> TP 64, FP 0: 128/192; 0.9 -> TP 96, FP 32: 192/256;
    # 0.5 -> TP 128, FP 32 + 8 (the healthy subject's 0.6 voxels): 256/296; 0.1 -> everything
    assert result.pooled["best_dice"] == pytest.approx(256 / 296, rel=1e-12)
    assert result.pooled["best_dice_threshold"] == pytest.approx(0.5)

    out = cohort["out"]
    names = {"json": "metrics.json", "csv": "metrics.csv", "markdown": "report.md", "roc": "roc.png", "pr": "pr.png",
             "image_roc": "image_roc.png"}
    assert result.files == {kind: out / name for kind, name in names.items()}
    assert sorted(p.name for p in out.iterdir()) == sorted(names.values())  # no temp files
    for kind in ("roc", "pr", "image_roc"):
        assert result.files[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result.files[kind].stat().st_size > 10_000

    saved = strict_json(out / "metrics.json")
    assert [row["subject"] for row in saved["per_subject"]] == ["sub-a", "sub-b", "sub-c"]
    assert saved["per_subject"][1]["auroc"] == pytest.approx(PARTIAL_AUROC, rel=1e-12)
    assert saved["per_subject"][2]["auroc"] is None  # NaN written as null
    assert saved["pooled"]["auroc"] == pytest.approx(auroc, rel=1e-12)
    assert saved["inputs"]["maps_without_label"] == ["sub-d"]
    assert saved["inputs"]["labels_without_map"] == ["sub-e"]
    assert saved["inputs"]["subjects"][1]["label"].endswith("sub-b.nii")
    assert saved["inputs"]["brain_masks_dir"] is None

    with open(out / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["subject"] for row in rows] == ["sub-a", "sub-b", "sub-c"]
    assert float(rows[1]["best_dice"]) == pytest.approx(0.8)
    assert float(rows[1]["auprc"]) == pytest.approx(PARTIAL_AUPRC, rel=1e-12)
    assert math.isnan(float(rows[2]["auroc"]))
    assert int(rows[0]["n_positive"]) == 64

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| sub-b | 0.9940 | 0.5833 | 0.8000 | 0.5 | 4096 | 64 |" in report
    assert "| sub-c | n/a | n/a | n/a | n/a | 4096 | 0 |" in report
    assert "| all (pooled) |" in report
    assert "sub-d" in report and "Best Dice" in report


def test_brain_masks_dir_is_honoured(cohort: dict[str, Path]) -> None:
    masks = cohort["root"] / "masks"
    whole = np.ones(SHAPE, dtype=np.uint8)  # includes the zero background of the maps
    half = np.zeros(SHAPE, dtype=np.uint8)
    half[:10] = 1  # z < 10: the whole partial lesion (z 4..7), none of its false positives (z 12..13)
    write_volume(whole, masks / "sub-a.nii.gz")
    write_volume(half, masks / "sub-b.nii.gz")
    write_volume(whole, masks / "sub-c.nii")

    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], brain_masks_dir=masks)
    a, b, c = result.per_subject
    assert a["n_voxels"] == 20**3 and a["auroc"] == 1.0
    assert b["n_voxels"] == 10 * 20 * 20 and b["n_positive"] == 64
    # without the false positives the best Dice is 1 at threshold 0.5
    assert b["best_dice"] == 1.0 and b["best_dice_threshold"] == pytest.approx(0.5)
    score_b, label_b = partial_subject()
    assert b["auroc"] == pytest.approx(roc_auc_score(label_b[:10].ravel(), score_b[:10].ravel()), rel=1e-12)
    assert c["n_voxels"] == 20**3
    assert result.pooled["n_voxels"] == 2 * 20**3 + 10 * 20 * 20
    assert strict_json(result.files["json"])["inputs"]["subjects"][2]["brain_mask"].endswith("sub-c.nii")


def test_lesion_outside_the_brain_mask_is_not_counted(tmp_path: Path) -> None:
    score, label = perfect_subject()
    write_volume(score, tmp_path / "maps" / "s.nii.gz")
    write_volume(label, tmp_path / "labels" / "s.nii.gz")
    mask = np.ones(SHAPE, dtype=np.uint8)
    mask[8:10] = 0  # removes half of the lesion cube
    write_volume(mask, tmp_path / "masks" / "s.nii.gz")
    result = evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out", brain_masks_dir=tmp_path / "masks")
    assert result.per_subject[0]["n_positive"] == 32
    assert result.per_subject[0]["n_voxels"] == 20**3 - 2 * 20 * 20


def test_each_volume_is_read_once(cohort: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    original = uadct.io._read_header

    def counting(path: Path):
        reads.append(Path(path).relative_to(cohort["root"]).as_posix())
        return original(path)

    monkeypatch.setattr(uadct.io, "_read_header", counting)
    evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"])
    expected = [f"maps/sub-{s}.nii.gz" for s in "abc"] + ["labels/sub-a.nii.gz", "labels/sub-b.nii", "labels/sub-c.nii.gz"]
    assert sorted(reads) == sorted(expected)  # 3 maps + 3 labels, each once; sub-d/sub-e never opened


def test_label_on_another_grid_raises_naming_the_file(tmp_path: Path) -> None:
    score, label = perfect_subject()
    write_volume(score, tmp_path / "maps" / "s.nii.gz")
    write_volume(label, tmp_path / "labels" / "s.nii.gz", spacing=(2.0, 2.0, 2.0))
    with pytest.raises(InputError, match=r"labels/s\.nii\.gz.*grid"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()

    write_volume(label[:, :, :10], tmp_path / "labels" / "s.nii.gz")  # another size
    with pytest.raises(InputError, match=r"labels/s\.nii\.gz.*size"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out")


def test_brain_mask_problems_raise_naming_the_file(tmp_path: Path) -> None:
    score, label = perfect_subject()
    write_volume(score, tmp_path / "maps" / "s.nii.gz")
    write_volume(label, tmp_path / "labels" / "s.nii.gz")
    (tmp_path / "masks").mkdir()
    with pytest.raises(InputError, match=r"masks.*no brain mask for 1 subject\(s\): s"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out", brain_masks_dir=tmp_path / "masks")
    write_volume(np.ones((10, 20, 20), dtype=np.uint8), tmp_path / "masks" / "s.nii.gz")
    with pytest.raises(InputError, match=r"masks/s\.nii\.gz.*grid"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out", brain_masks_dir=tmp_path / "masks")
    write_volume(np.zeros(SHAPE, dtype=np.uint8), tmp_path / "masks" / "s.nii.gz")
    with pytest.raises(InputError, match=r"masks/s\.nii\.gz.*empty"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out", brain_masks_dir=tmp_path / "masks")


def test_empty_or_unmatched_folders_raise(tmp_path: Path) -> None:
    maps, labels = tmp_path / "maps", tmp_path / "labels"
    maps.mkdir()
    labels.mkdir()
    with pytest.raises(InputError, match=r"maps.*no anomaly maps"):
        evaluate_folder(maps, labels, tmp_path / "out")

    score, label = perfect_subject()
    write_volume(score, maps / "s1.nii.gz")
    with pytest.raises(InputError, match=r"no anomaly map in .*maps has a label .* in .*labels"):
        evaluate_folder(maps, labels, tmp_path / "out")

    write_volume(label, labels / "s2.nii.gz")  # names do not match
    with pytest.raises(InputError, match=r"maps: s1; labels: s2"):
        evaluate_folder(maps, labels, tmp_path / "out")

    with pytest.raises(InputError, match="not a folder"):
        evaluate_folder(tmp_path / "nowhere", labels, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_files_for_one_subject_raise(tmp_path: Path) -> None:
    score, label = perfect_subject()
    write_volume(score, tmp_path / "maps" / "s.nii.gz")
    write_volume(score, tmp_path / "maps" / "s.nii")
    write_volume(label, tmp_path / "labels" / "s.nii.gz")
    with pytest.raises(InputError, match="same subject id 's'"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out")


def test_all_zero_map_without_lesion_raises(tmp_path: Path) -> None:
    write_volume(np.zeros(SHAPE, dtype=np.float32), tmp_path / "maps" / "s.nii.gz")
    write_volume(np.zeros(SHAPE, dtype=np.uint8), tmp_path / "labels" / "s.nii.gz")
    with pytest.raises(InputError, match=r"maps/s\.nii\.gz.*no brain region"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out")


def options(**overrides) -> EvaluationOptions:
    """Fast defaults for tests: no plots, few resamples."""
    return EvaluationOptions(**{"plots": False, "bootstrap": 200, **overrides})


def test_dice_at_fixed_fpr_per_subject_and_pooled(cohort: dict[str, Path]) -> None:
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(fprs=(0.01, 0.002)))
    a, b, c = result.per_subject
    # sub-b: 4000 normal voxels at 0.1, 32 at 0.9. At 1 % (40 allowed) the lowest threshold is 0.5:
    # FP 32 (0.8 %), TP 64 -> Dice 128 / 160
    assert b["threshold_at_fpr_0.01"] == pytest.approx(0.5) and b["dice_at_fpr_0.01"] == pytest.approx(0.8)
    # at 0.2 % (8 allowed) the 32 false positives at 0.9 cannot be flagged, nor the lesion below them
    assert b["threshold_at_fpr_0.002"] > np.float32(0.9) and b["dice_at_fpr_0.002"] == 0.0
    assert a["dice_at_fpr_0.01"] == 1.0 and a["threshold_at_fpr_0.01"] == 1.0
    assert math.isnan(c["dice_at_fpr_0.01"])  # no lesion
    # pooled: 12160 normal voxels (12120 at 0.1, 8 at 0.6, 32 at 0.9).
    # 1 %: 121 may be flagged -> threshold 0.5: FP 40, TP 128 -> 256 / 296
    assert result.pooled["threshold_at_fpr_0.01"] == pytest.approx(0.5)
    assert result.pooled["dice_at_fpr_0.01"] == pytest.approx(256 / 296)
    # 0.2 %: 24 may be flagged -> not the 32 at 0.9; threshold 1.0: TP 64, FP 0 -> 128 / 192
    assert result.pooled["threshold_at_fpr_0.002"] == pytest.approx(1.0)
    assert result.pooled["dice_at_fpr_0.002"] == pytest.approx(128 / 192)


def test_lesion_level_counts(cohort: dict[str, Path]) -> None:
    # default: the pooled best-Dice threshold, 0.5
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options())
    a, b, c = result.per_subject
    assert (a["n_lesions"], a["n_detected"], a["n_fp_clusters"]) == (1, 1, 0)
    assert (b["n_lesions"], b["n_detected"], b["n_fp_clusters"], b["n_predicted_clusters"]) == (1, 1, 1, 2)
    assert (c["n_lesions"], c["n_detected"], c["n_fp_clusters"]) == (0, 0, 1)
    assert math.isnan(c["detection_rate"]) and b["detection_rate"] == 1.0
    lesion = result.pooled["lesion"]
    assert lesion["threshold"] == pytest.approx(0.5) and "optimistic" in lesion["threshold_source"]
    assert (lesion["n_lesions"], lesion["n_detected"], lesion["detection_rate"]) == (2, 2, 1.0)
    assert lesion["fp_clusters_per_subject"] == pytest.approx(2 / 3)

    # a given threshold above sub-b's lesion scores: sub-b's lesion is missed, no false positives
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(threshold=0.95))
    assert [row["n_detected"] for row in result.per_subject] == [1, 0, 0]
    assert [row["n_fp_clusters"] for row in result.per_subject] == [0, 0, 0]
    assert result.pooled["lesion"]["detection_rate"] == 0.5

    # at 0.9 half of sub-b's lesion is flagged: detected with overlap 0.5, not with 0.6
    half = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(threshold=0.9, lesion_overlap=0.5))
    assert half.per_subject[1]["n_detected"] == 1
    more = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(threshold=0.9, lesion_overlap=0.6))
    assert more.per_subject[1]["n_detected"] == 0


def test_small_component_removal_applies_to_binarised_maps_only(cohort: dict[str, Path]) -> None:
    plain = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options())
    cleaned = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(min_component_size=40))
    for before, after in zip(plain.per_subject, cleaned.per_subject):
        for name in ("auroc", "auprc", "best_dice", "best_dice_threshold"):  # continuous: untouched
            assert before[name] == after[name] or (math.isnan(before[name]) and math.isnan(after[name]))
    a, b, c = cleaned.per_subject
    # sub-b at its best threshold 0.5: the 32-voxel false-positive block is removed, the 64-voxel lesion kept
    assert b["best_dice"] == pytest.approx(0.8) and b["dice_cc_at_best_threshold"] == 1.0
    assert b["dice_at_fpr_0.01"] == 1.0  # same threshold 0.5, false positives removed
    assert (b["n_fp_clusters"], c["n_fp_clusters"]) == (0, 0)  # c's 8-voxel block is gone too
    # pooled at 0.5: TP 128, FP 0
    assert cleaned.pooled["dice_cc_at_best_threshold"] == 1.0
    assert cleaned.pooled["lesion"]["fp_clusters_per_subject"] == 0.0
    assert "dice_cc_at_best_threshold" not in plain.per_subject[0]


def test_median_filter_smooths_the_map_before_every_metric(tmp_path: Path) -> None:
    from scipy import ndimage

    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:12, 6:12, 6:12] = 1
    score = brain_map()
    score[label == 1] = 1.0
    rng = np.random.default_rng(0)
    salt = rng.choice(np.flatnonzero(brain_map().ravel()), size=40, replace=False)
    score.ravel()[salt] = 2.0  # isolated hot voxels (some may fall in the lesion)
    write_volume(score, tmp_path / "maps" / "s.nii.gz")
    write_volume(label, tmp_path / "labels" / "s.nii.gz")
    raw = evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "raw", options=options(threshold=0.5))
    smooth = evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "smooth",
                             options=options(threshold=0.5, median_filter=3))
    # reference: scipy's median over the volume with the background at 0, scored on the same brain voxels
    brain = score != 0
    filtered = ndimage.median_filter(np.where(brain, score, 0).astype(np.float32), size=3, mode="constant", cval=0.0)
    expected = roc_auc_score(label[brain].ravel(), filtered[brain].ravel())
    assert smooth.per_subject[0]["auroc"] == pytest.approx(expected, rel=1e-12)
    assert smooth.per_subject[0]["n_voxels"] == raw.per_subject[0]["n_voxels"] == N_BRAIN
    assert raw.per_subject[0]["n_fp_clusters"] > 20 and smooth.per_subject[0]["n_fp_clusters"] == 0
    assert smooth.per_subject[0]["n_detected"] == raw.per_subject[0]["n_detected"] == 1


def test_image_level_scores_thresholds_and_validation_round_trip(cohort: dict[str, Path]) -> None:
    (cohort["maps"] / "sub-a.json").write_text(json.dumps({"image_score": 5.0, "model": "vae"}))  # as `uadct score` writes
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options())
    a, b, c = result.per_subject
    assert (a["abnormal"], b["abnormal"], c["abnormal"]) == (True, True, False)
    assert a["image_score"] == 5.0
    # no sidecar: mean of the top 1000 brain voxels
    assert b["image_score"] == pytest.approx((64 * 0.9 + 32 * 0.5 + 904 * 0.1) / 1000, rel=1e-6)
    assert c["image_score"] == pytest.approx((8 * 0.6 + 992 * 0.1) / 1000, rel=1e-6)
    image = result.pooled["image_level"]
    assert image["auroc"] == 1.0 and (image["n_abnormal"], image["n_normal"]) == (2, 1)
    assert image["f1_optimal_threshold"] == pytest.approx(b["image_score"])
    assert image["optimistic"] is True and image["f1"] == 1.0 and image["accuracy"] == 1.0
    saved = strict_json(result.files["json"])
    assert saved["inputs"]["subjects"][0]["image_score_source"] == "sidecar"
    assert saved["inputs"]["subjects"][1]["image_score_source"] == "top-1000 mean"

    # a validation report with a higher image threshold and voxel threshold
    validation = cohort["root"] / "validation.json"
    validation.write_text(json.dumps({"pooled": {"best_dice_threshold": 0.95, "image_level": {"f1_optimal_threshold": 0.2}}}))
    applied = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(threshold_from=validation))
    image = applied.pooled["image_level"]
    assert image["threshold"] == 0.2 and image["optimistic"] is False and "validation" in image["threshold_source"]
    # sub-a (5.0) abnormal, sub-b (0.164) missed, sub-c (0.104) normal
    assert (image["tp"], image["fn"], image["tn"], image["fp"]) == (1, 1, 1, 0)
    assert image["sensitivity"] == 0.5 and image["specificity"] == 1.0 and image["precision"] == 1.0
    assert image["f1"] == pytest.approx(2 / 3) and image["accuracy"] == pytest.approx(2 / 3)
    assert applied.pooled["lesion"]["threshold"] == 0.95  # the validation's voxel threshold
    assert [row["n_detected"] for row in applied.per_subject] == [1, 0, 0]

    # the metrics.json of one run is the validation report of the next
    again = evaluate_folder(cohort["maps"], cohort["labels"], cohort["root"] / "again", options=options(threshold_from=result.files["json"]))
    assert again.pooled["image_level"]["threshold"] == pytest.approx(result.pooled["image_level"]["f1_optimal_threshold"])
    assert again.pooled["lesion"]["threshold"] == pytest.approx(result.pooled["best_dice_threshold"])

    with pytest.raises(InputError, match=r"nowhere\.json"):
        evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(threshold_from=cohort["root"] / "nowhere.json"))
    (cohort["root"] / "bad.json").write_text('{"pooled": {}}')
    with pytest.raises(InputError, match=r"bad\.json.*not a metrics.json"):
        evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(threshold_from=cohort["root"] / "bad.json"))


def test_maps_without_a_label_can_count_as_normal(cohort: dict[str, Path]) -> None:
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(unlabelled_are_normal=True))
    assert [row["subject"] for row in result.per_subject] == ["sub-a", "sub-b", "sub-c", "sub-d"]
    assert result.missing == []
    d = result.per_subject[3]
    assert d["abnormal"] is False and d["n_positive"] == 0 and d["n_fp_clusters"] == 1  # its hot cube is a false positive
    assert result.pooled["n_voxels"] == 4 * N_BRAIN
    assert result.pooled["image_level"]["n_normal"] == 2
    assert strict_json(result.files["json"])["inputs"]["subjects"][3]["label"] is None


def test_bootstrap_intervals_hold_the_estimates(cohort: dict[str, Path]) -> None:
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(bootstrap=500))
    intervals = result.pooled["confidence_intervals"]
    mean = result.pooled["mean_over_subjects"]
    for name in ("auroc", "best_dice", "dice_at_fpr_0.01", "n_fp_clusters"):
        low, high = intervals[f"mean_{name}"]
        assert low <= mean[name] <= high, name
    low, high = intervals["pooled_dice_at_fpr_0.01"]
    assert low <= result.pooled["dice_at_fpr_0.01"] <= high
    assert "500 resamples" in intervals["method"]
    again = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(bootstrap=500))
    assert again.pooled["confidence_intervals"] == intervals  # seeded
    none = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options(bootstrap=0))
    assert set(none.pooled["confidence_intervals"]) == {"method"}


def test_a_bad_subject_is_left_out_and_reported(cohort: dict[str, Path]) -> None:
    write_volume(perfect_subject()[1], cohort["labels"] / "sub-d.nii.gz", spacing=(2.0, 2.0, 2.0))  # another grid
    result = evaluate_folder(cohort["maps"], cohort["labels"], cohort["out"], options=options())
    assert [row["subject"] for row in result.per_subject] == ["sub-a", "sub-b", "sub-c"]
    assert [name for name, _ in result.failed] == ["sub-d"]
    assert "labels/sub-d.nii.gz" in result.failed[0][1] and "maps/sub-d.nii.gz" in result.failed[0][1]
    assert "sub-d" in result.files["markdown"].read_text(encoding="utf-8")


def test_bad_options_raise() -> None:
    for bad in ({"fprs": (0.0,)}, {"fprs": (1.2,)}, {"median_filter": -1}, {"lesion_overlap": 2.0},
                {"bootstrap": 1.5}, {"threshold": float("nan")}, {"image_top_k": 0}):
        with pytest.raises(UadctError):
            EvaluationOptions(**bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uadct", *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)


@pytest.mark.slow


def test_cli_end_to_end_files_and_exit_codes(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "report"
    done = run_cli("evaluate", str(cohort["maps"]), str(cohort["labels"]), "-o", str(out), "--fpr", "0.01,0.05",
                   "--median-filter", "3", "--min-component-size", "5", "--bootstrap", "100")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["image_roc.png", "metrics.csv", "metrics.json", "pr.png", "report.md", "roc.png"]
    saved = strict_json(out / "metrics.json")
    assert saved["options"]["median_filter"] == 3 and saved["options"]["fprs"] == [0.01, 0.05]
    assert "dice_at_fpr_0.05" in (out / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "pooled" in done.stdout and "image level" in done.stdout

    # a validation report applied; then a subject with a bad label: report written, exit 1
    write_volume(perfect_subject()[1][:, :, :10], cohort["labels"] / "sub-d.nii.gz")
    failed = run_cli("evaluate", str(cohort["maps"]), str(cohort["labels"]), "-o", str(cohort["root"] / "r2"),
                     "--threshold-from", str(out / "metrics.json"), "--no-plots", "--bootstrap", "0")
    assert failed.returncode == 1
    assert "sub-d" in failed.stderr and "Traceback" not in failed.stderr
    assert strict_json(cohort["root"] / "r2" / "metrics.json")["pooled"]["image_level"]["optimistic"] is False

    bad = run_cli("evaluate", str(cohort["maps"]), str(cohort["labels"]), "-o", str(out), "--fpr", "one")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--fpr" in bad.stderr


def test_slice_level_image_metrics(tmp_path: Path) -> None:
    """Axial slices as samples: slice scores and flags follow the anatomy, not the stored array order."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[8:10, 5:15, 5:15] = 1  # lesion on array slices 8, 9 (axis 0)
    score = brain_map()
    score[label == 1] = 1.0
    score[12, 5:10, 5:10] = 0.7  # a hot patch on normal slice 12
    write_volume(score, tmp_path / "maps" / "s.nii.gz")
    write_volume(label, tmp_path / "labels" / "s.nii.gz")
    result = evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out",
                             options=options(image_level="slice", bootstrap=50))
    image = result.pooled["image_level"]
    assert image["unit"] == "slice" and (image["n_abnormal"], image["n_normal"]) == (2, 14)  # 16 brain slices
    # each slice has 256 brain voxels; its score is the mean of the top 13 (5 %): 1.0 on lesion slices,
    # 0.7 on slice 12, 0.1 elsewhere -> perfect separation, F1-optimal threshold 1.0
    assert image["auroc"] == 1.0 and image["f1_optimal_threshold"] == pytest.approx(1.0) and image["f1"] == 1.0

    # the same volume stored with axial along the last array axis: the same slices are found
    moved = tmp_path / "moved"
    for name, array in (("maps", score), ("labels", label)):
        image_ = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, 2)))
        image_.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))  # index x runs along z (superior)
        (moved / name).mkdir(parents=True)
        sitk.WriteImage(image_, str(moved / name / "s.nii.gz"))
    again = evaluate_folder(moved / "maps", moved / "labels", moved / "out", options=options(image_level="slice", bootstrap=0))
    assert (again.pooled["image_level"]["n_abnormal"], again.pooled["image_level"]["n_normal"]) == (2, 14)

    # a subject-level validation threshold does not apply to slices
    subject_report = evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "subject", options=options())
    with pytest.raises(InputError, match=r"per subject.*per slice"):
        evaluate_folder(tmp_path / "maps", tmp_path / "labels", tmp_path / "out",
                        options=options(image_level="slice", threshold_from=subject_report.files["json"]))
