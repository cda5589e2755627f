"""evaluate_folder on tiny synthetic NIfTI volumes with hand-computed numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score

import uadct.io
from uadct.errors import InputError
from uadct.evaluate import EvaluationResult, evaluate_folder

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

    return json.loads(path.read_text(), parse_constant=refuse)


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

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["subject"] for row in rows] == ["sub-a", "sub-b", "sub-c"]
    assert float(rows[1]["best_dice"]) == pytest.approx(0.8)
    assert float(rows[1]["auprc"]) == pytest.approx(PARTIAL_AUPRC, rel=1e-12)
    assert math.isnan(float(rows[2]["auroc"]))
    assert int(rows[0]["n_positive"]) == 64

    report = (out / "report.md").read_text()
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
