"""The hd-bet backend: a tiny nnU-Net model folder run end to end, safe checkpoint loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import PreprocessError

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _plans(architecture: dict) -> dict:
    """HD-BET-like plans (3d_fullres, z-score, SimpleITKIO) with a tiny network and a 4 mm target spacing."""
    return {
        "dataset_name": "Dataset001_TinyBET", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [4.0, 4.0, 4.0], "original_median_shape_after_transp": [40, 60, 60],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
                                                              "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 0.2}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [32, 32, 32], "median_image_size_in_voxels": [40, 60, 60], "spacing": [4.0, 4.0, 4.0],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": architecture, "batch_dice": False,
        }},
    }


def make_model_folder(root: Path, architecture: dict = ARCHITECTURE) -> Path:
    """A tiny nnU-Net model folder laid out like HD-BET's release_2.0.0, random weights (seed 0)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1},
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    (root / "plans.json").write_text(json.dumps(_plans(architecture)))
    torch.manual_seed(0)
    kwargs = dict(ARCHITECTURE["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    network = PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=False, **kwargs)
    with torch.no_grad():  # random weights: a small bias so that both labels occur
        network.decoder.seg_layers[-1].bias.copy_(torch.tensor([0.0, 0.1]))
    (root / "fold_all").mkdir()
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres", "fold": "all", "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 1,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)]}},
               root / "fold_all" / "checkpoint_final.pth")
    return root


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("hdbet") / "release_2.0.0")


@pytest.fixture(scope="module")
def head(atlas) -> sitk.Image:
    """The SRI24 head at 3 mm, stored RAS (not the atlas' LPS), so the array order matters."""
    grid = sitk.Image([80, 80, 52], sitk.sitkFloat32)
    grid.SetSpacing((3.0, 3.0, 3.0))
    grid.SetOrigin(atlas.head.GetOrigin())
    return sitk.DICOMOrient(sitk.Resample(atlas.head, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32), "RAS")


def test_hdbet_backend_runs_the_model_on_the_input_grid(model_folder, head):
    from uadct.io import same_grid
    from uadct.preprocess.skullstrip import extract_brain_mask

    mask = extract_brain_mask(head, "hd-bet", hdbet_weights=model_folder)
    assert same_grid(mask, head)
    assert mask.GetPixelID() == sitk.sitkUInt8
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    assert set(values.tolist()) <= {0, 1} and len(values) == 2, values


def test_hdbet_backend_matches_nnunets_own_file_path(model_folder, head, tmp_path):
    """Ours (weights_only, manual_initialization, in memory) == nnU-Net reading the file with SimpleITKIO."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from uadct.io import write_image
    from uadct.preprocess.hdbet import hdbet_mask

    write_image(head, tmp_path / "head.nii.gz")
    reference = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(model_folder), ("all",))  # our own file: pickle is fine here
    array, properties = SimpleITKIO().read_images([str(tmp_path / "head.nii.gz")])
    expected = reference.predict_single_npy_array(array, properties, None, None, False)
    ours = sitk.GetArrayFromImage(hdbet_mask(head, model_folder))
    assert expected.any() and (expected == 0).any()
    np.testing.assert_array_equal(ours, expected.astype(np.uint8))


class _Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['UADCT_TEST_MARKER']}",))


def test_a_hostile_pickle_in_the_weights_folder_is_refused(tmp_path, head, monkeypatch):
    from uadct.preprocess.hdbet import load_checkpoint_safely, hdbet_mask

    folder = make_model_folder(tmp_path / "hostile")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("UADCT_TEST_MARKER", str(marker))
    checkpoint = folder / "fold_all" / "checkpoint_final.pth"
    weights = torch.load(checkpoint, weights_only=False)
    weights["payload"] = _Hostile()
    torch.save(weights, checkpoint)
    with pytest.raises(PreprocessError, match=r"refused to load.*GLOBAL (posix|os)\.system"):
        load_checkpoint_safely(checkpoint)
    with pytest.raises(PreprocessError, match="refused"):
        hdbet_mask(head, folder)
    assert not marker.exists()
    # nnU-Net's own loader would have run it: the test's payload is real
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()


def test_plans_naming_a_foreign_class_are_refused(tmp_path, head):
    from uadct.preprocess.hdbet import hdbet_mask

    architecture = json.loads(json.dumps(ARCHITECTURE))
    architecture["network_class_name"] = "subprocess.Popen"
    with pytest.raises(PreprocessError, match="subprocess.Popen"):
        hdbet_mask(head, make_model_folder(tmp_path / "foreign", architecture))
    architecture = json.loads(json.dumps(ARCHITECTURE))
    architecture["arch_kwargs"]["nonlin"] = "os.system"
    with pytest.raises(PreprocessError, match="os.system"):
        hdbet_mask(head, make_model_folder(tmp_path / "layer", architecture))


def test_missing_weights_give_one_line_naming_the_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UADCT_HDBET_WEIGHTS", str(tmp_path / "from-env"))
    from uadct.preprocess.hdbet import resolve_weights

    with pytest.raises(PreprocessError) as error:
        resolve_weights(tmp_path / "given")
    message = str(error.value)
    assert "\n" not in message
    for folder in (tmp_path / "given", tmp_path / "from-env", tmp_path / "home" / "hd-bet_params" / "release_2.0.0"):
        assert str(folder) in message


def test_cli_hdbet_without_weights_fails_in_one_line(tmp_path, small_atlas_path):
    from uadct.io import read_image, write_image

    write_image(read_image(small_atlas_path), tmp_path / "raw" / "sub-01.nii.gz")
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    env.pop("UADCT_HDBET_WEIGHTS", None)
    result = subprocess.run([sys.executable, "-m", "uadct", "preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "prep"),
                             "--atlas", str(small_atlas_path), "--skull-strip", "hd-bet", "--hdbet-weights", str(tmp_path / "none")],
                            capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "no HD-BET weights" in result.stderr and str(tmp_path / "none") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
