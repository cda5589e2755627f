"""Export a checkpoint's patch network to ONNX or TorchScript, with a JSON of what scoring needs.

The exported graph is the model's ``score_patches`` on its own: patches ``(B, 1, *patch)``
float32 (and, for position-conditioned models, the patch centres ``(B, 3)``) in, the
model's declared outputs out (``voxel`` ``(B, *patch)`` error maps, ``scalar`` ``(B,)``
scores), with a dynamic batch axis. Everything around it (preprocessing onto the atlas
grid, the patch grid over the brain mask, overlap averaging, the image score, MOOD
scaling) is described in the JSON written beside the network (``<file>.json``), so a
runtime without uadct can rebuild a map; :func:`onnx_predictor` plugs an exported file
into :func:`uadct.patches.sliding_window_map` to do so with uadct.

onnx, onnxruntime and onnxscript (torch's ONNX exporter needs it) are the optional extra
``uadct[export]``; TorchScript needs nothing beyond torch.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uadct.errors import UadctError
from uadct.io import atomic_path, sha256_of, write_json

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT_TAG = "uadct-export"
EXPORT_FORMAT_VERSION = 1
ONNX_OPSET = 18
DEFAULT_STRIDE = 4  # voxels, as `uadct score`
IMAGE_SCORE_TOP_K = 1000  # as uadct.inference.IMAGE_SCORE_TOP_K (not imported: it pulls the whole scorer)
EXPORT_BATCH = 2  # example batch used to trace; the batch axis stays dynamic

# Models whose score is not one pass of a network over the patch batch, with the reason.
# Every model registered today scores in one pass (GANomaly: encoder -> decoder -> encoder;
# f-AnoGAN: encoder -> generator -> critic features; OC-SVM: features -> RBF kernel over the
# stored support vectors), so this is empty; a model added later that iterates per patch
# (e.g. AnoGAN's latent search) must be listed here.
NOT_ONE_PASS: dict[str, str] = {}


class ExportError(UadctError):
    """A model cannot be exported, or an exported file cannot be used."""


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    path: Path
    json_path: Path
    format: str
    outputs: list[str]
    inputs: list[str]


def export_json_path(path: str | Path) -> Path:
    """The metadata file beside an exported network: ``model.onnx`` -> ``model.onnx.json``."""
    return Path(str(path) + ".json")


def _patch_network(model: Any) -> Any:
    """``model.score_patches`` as an ``nn.Module`` whose forward returns the declared outputs (float32)."""
    import torch
    from torch import nn

    outputs = tuple(model.outputs)
    conditioned = bool(getattr(model, "uses_positions", False))

    class PatchNetwork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, patches: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
            extra = {"positions": positions} if conditioned else {}
            scores = self.model.score_patches(patches, None, **extra)
            return tuple(scores[key].to(torch.float32) for key in outputs)

    return PatchNetwork().eval()


def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path, format: str = "onnx",
                      opset: int = ONNX_OPSET) -> ExportResult:
    """Write the patch network of ``checkpoint_path`` to ``out_path`` and its metadata beside it.

    ``format`` is ``onnx`` or ``torchscript``. Raises :class:`ExportError` (one line) for a
    model whose score is not one network pass, an unknown format, or a missing exporter;
    nothing is left at ``out_path`` on failure.
    """
    import torch

    from uadct.checkpoint import load_checkpoint
    from uadct.patches import PatchSpec

    if format not in EXPORT_FORMATS:
        raise ExportError(f"{out_path}: unknown export format {format!r}; choose {' or '.join(EXPORT_FORMATS)}")
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.model
    if hasattr(model, "fit_volumes"):
        raise ExportError(f"{checkpoint_path}: model {model.name!r} cannot be exported: it maps whole volumes on the atlas "
                          "grid from stored voxel statistics, not patches through a network")
    if hasattr(model, "ensemble") or getattr(model, "uses_covariates", False):
        raise ExportError(f"{checkpoint_path}: model {model.name!r} cannot be exported: "
                          + ("its patch score is a tree ensemble (--scorer forest), evaluated outside the network"
                             if hasattr(model, "ensemble") else "it is conditioned on subject covariates, which the exported graph does not take"))
    if model.name in NOT_ONE_PASS:
        raise ExportError(f"{checkpoint_path}: model {model.name!r} cannot be exported: {NOT_ONE_PASS[model.name]}")
    patch = checkpoint.metadata.get("patch", {})
    spec = PatchSpec(int(patch.get("size", 16)), int(patch.get("dims", 2)))
    channels = int(getattr(model.config, "in_channels", 1))
    patch_shape = tuple(spec.shape[1:]) if spec.dims == 2 else tuple(spec.shape)
    generator = torch.Generator().manual_seed(0)
    example = (torch.rand((EXPORT_BATCH, channels, *patch_shape), generator=generator),)
    input_names = ["patches"]
    if model.uses_positions:
        example += (torch.rand((EXPORT_BATCH, 3), generator=generator) * 2 - 1,)
        input_names.append("positions")
    output_names = list(model.outputs)
    network = _patch_network(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        # tracing warns about every Python branch it records; _verify checks the recorded graph instead
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter warns it is the old one
        if format == "onnx":
            _export_onnx(network, example, tmp, input_names, output_names, opset, checkpoint_path)
        else:
            _export_torchscript(network, example, tmp, checkpoint_path)
        _verify(network, tmp, format, example, output_names, checkpoint_path, model.name)
        metadata = export_metadata(checkpoint, checkpoint_path, out_path.name, sha256_of(tmp), format, input_names,
                                   output_names, patch_shape, channels, opset if format == "onnx" else None)
        json_path = write_json(metadata, export_json_path(out_path))  # written before the network is renamed in
    return ExportResult(out_path, json_path, format, output_names, input_names)


def _export_onnx(network: Any, example: tuple, path: Path, input_names: list[str], output_names: list[str],
                 opset: int, source: str | Path) -> None:
    import torch

    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
    except ImportError:
        raise ExportError(f"{source}: ONNX export needs the onnx package: pip install 'uadct[export]'") from None
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    try:
        # the TorchScript-based exporter: the networks are plain convolutions, and it records
        # a trained model's Python branches (stage, fitted flags) as the constants they are
        torch.onnx.export(network, example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    except ExportError:
        raise
    except Exception as exc:  # the exporter's own failure, reported as the model that could not be exported
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{source}: ONNX export failed: {first}") from None


def _export_torchscript(network: Any, example: tuple, path: Path, source: str | Path) -> None:
    import torch

    try:
        with torch.no_grad():
            traced = torch.jit.trace(network, example, check_trace=False)
        traced.save(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{source}: TorchScript export failed: {first}") from None


VERIFY_TOLERANCE = 1e-4  # absolute, on outputs of order 1; exported graphs agree to ~1e-7


def _verify(network: Any, path: Path, format: str, example: tuple, output_names: list[str], source: str | Path,
            name: str) -> None:
    """Run the written file on a fresh batch of another size and compare with the model.

    A graph that recorded something of the example batch (a score that is not one pass of
    the network over the patches: a per-patch search, a data-dependent branch) disagrees
    here and the export is refused instead of writing a file that scores wrongly.
    """
    import torch

    generator = torch.Generator().manual_seed(1)
    check = (torch.rand((EXPORT_BATCH + 3, *example[0].shape[1:]), generator=generator),)
    if len(example) > 1:  # patch centres in [-1, 1]
        check += (torch.rand((EXPORT_BATCH + 3, 3), generator=generator) * 2 - 1,)
    with torch.no_grad():
        expected = [t.numpy() for t in network(*check)]
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            log.warning("%s: onnxruntime is not installed; the exported file was not checked", path)
            return
        session = _onnx_session(onnxruntime, path, 1)
        feed = {item.name: tensor.numpy() for item, tensor in zip(session.get_inputs(), check)}
        found = session.run(output_names, feed)
    else:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            found = [t.numpy() for t in loaded(*check)]
    for key, want, got in zip(output_names, expected, found):
        difference = float(np.max(np.abs(want - got))) if want.shape == got.shape else float("inf")
        if not difference <= VERIFY_TOLERANCE:
            raise ExportError(f"{source}: model {name!r} cannot be exported: its {key!r} score is not one network pass "
                              f"(the exported graph differs by {difference:.3g} on a check batch)")


def export_metadata(checkpoint: Any, checkpoint_path: str | Path, file_name: str, file_sha256: str, format: str,
                    input_names: list[str], output_names: list[str], patch_shape: tuple[int, ...], channels: int,
                    opset: int | None) -> dict[str, Any]:
    """Everything needed to score with the exported network, as plain JSON."""
    metadata = checkpoint.metadata
    patch = metadata.get("patch", {})
    dims = int(patch.get("dims", 2))
    preprocess = metadata.get("preprocess", {}) or {}
    inputs: list[dict[str, Any]] = [{
        "name": "patches", "dtype": "float32", "shape": ["batch", channels, *patch_shape],
        "meaning": ("axial 2D patches (z fixed), axes (channel, y, x) of the atlas-grid volume" if dims == 2
                    else "3D patches, axes (channel, z, y, x) of the atlas-grid volume"),
    }]
    if "positions" in input_names:
        inputs.append({"name": "positions", "dtype": "float32", "shape": ["batch", 3],
                       "meaning": "patch centres (z, y, x): 2 * (start + patch_shape / 2) / volume_shape - 1, in [-1, 1]"})
    output_meaning = {
        "voxel": ("voxel error map per patch", ["batch", *patch_shape]),
        "scalar": ("one anomaly score per patch, spread uniformly over the patch when mapping", ["batch"]),
    }
    outputs = [{"name": name, "dtype": "float32", "shape": output_meaning.get(name, ("", ["batch"]))[1],
                "meaning": output_meaning.get(name, ("model output", None))[0]} for name in output_names]
    return {
        "format": EXPORT_FORMAT_TAG,
        "format_version": EXPORT_FORMAT_VERSION,
        "file": file_name,
        "file_sha256": file_sha256,
        "runtime": format,
        "onnx_opset": opset,
        "checkpoint": {"file": Path(checkpoint_path).name, "sha256": checkpoint.sha256},
        "model": checkpoint.model.name,
        "model_config": checkpoint.model.config_dict(),
        "inputs": inputs,
        "outputs": outputs,
        "default_output": output_names[0],
        "patch": {
            "size": int(patch.get("size", 16)),
            "dims": dims,
            "shape_zyx": [1, *patch_shape] if dims == 2 else list(patch_shape),
            "stride_default": DEFAULT_STRIDE,
            "grid": "every patch (starts every `stride` voxels per axis, the last one flush with the volume end) "
                    "that holds at least one brain-mask voxel",
        },
        "aggregation": "overlap average: each voxel gets the mean of the outputs of the patches covering it "
                       "(a scalar output counts for every voxel of its patch); 0 where no patch falls and outside "
                       "the brain mask",
        "preprocess": preprocess,
        "normalisation": _normalisation(preprocess),
        "atlas": metadata.get("atlas"),
        "space": "the atlas grid of `atlas`; uadct score resamples the map back onto the scan through the inverse "
                 "registration transform",
        "score_scale": metadata.get("score_scale"),
        "score_scale_meaning": "0.999 quantile of healthy validation scores; MOOD maps are clip(map / score_scale, 0, 1)",
        "image_score": {"top_k": IMAGE_SCORE_TOP_K, "definition": "mean of the top_k highest map voxels inside the brain"},
    }


def _normalisation(preprocess: dict[str, Any]) -> dict[str, Any]:
    """The intensity normalisation the network expects, in words and numbers."""
    method = preprocess.get("normalization", "percentile")
    if method == "percentile":
        low, high = preprocess.get("percentiles", [5.0, 95.0])
        return {"method": method, "percentiles": [low, high],
                "definition": f"inside the brain mask the {low:g}th percentile -> 0 and the {high:g}th -> 1 "
                              "(linear); background 0"}
    if method == "zscore":
        return {"method": method, "definition": "inside the brain mask mean 0, standard deviation 1; background 0"}
    if method == "ct-window":
        level, width = preprocess.get("ct_window", [40.0, 80.0])
        return {"method": method, "ct_window_hu": [level, width],
                "definition": f"Hounsfield units [{level - width / 2:g}, {level + width / 2:g}] -> [0, 1]; background 0"}
    return {"method": method}


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON beside an exported network (``path`` is the network or the JSON itself)."""
    path = Path(path)
    json_path = path if path.suffix == ".json" else export_json_path(path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{json_path}: cannot read the export metadata ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT_TAG:
        raise ExportError(f"{json_path}: not a uadct export metadata file (no '{EXPORT_FORMAT_TAG}' format tag)")
    return data


def onnx_predictor(path: str | Path, output: str | None = None, volume_shape: tuple[int, int, int] | None = None,
                   threads: int = 0) -> Callable[..., np.ndarray]:
    """An exported ONNX file as a numpy predictor for :func:`uadct.patches.sliding_window_map`.

    ``(B, *patch) -> (B, *patch)`` or ``(B,)``, like :func:`uadct.inference.patch_predictor`;
    a position-conditioned network also takes the patch starts ``(B, 3)`` and needs
    ``volume_shape``. Runs on onnxruntime's CPU provider with ``threads`` threads (0: one per
    core), which wait without spinning (spinning threads take the CPU from everything else).
    """
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(f"{path}: running an ONNX file needs onnxruntime: pip install 'uadct[export]'") from None
    from uadct.patches import PatchSpec, patch_centres

    metadata = read_export_metadata(path)
    names = [item["name"] for item in metadata["outputs"]]
    key = output or metadata["default_output"]
    if key not in names:
        raise ExportError(f"{path}: the exported network has no {key!r} output; it has {', '.join(names)}")
    spec = PatchSpec(metadata["patch"]["size"], metadata["patch"]["dims"])
    conditioned = any(item["name"] == "positions" for item in metadata["inputs"])
    session = _onnx_session(onnxruntime, path, threads)

    def predict(patches: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        feed = {"patches": np.ascontiguousarray(patches, dtype=np.float32)[:, None]}
        if conditioned:
            if starts is None or volume_shape is None:
                raise ExportError(f"{path}: the network is conditioned on patch positions; give the starts and volume shape")
            feed["positions"] = patch_centres(starts, spec, volume_shape)
        return session.run([key], feed)[0]

    return predict


def _onnx_session(onnxruntime: Any, path: str | Path, threads: int) -> Any:
    """A CPU inference session whose worker threads do not spin while waiting."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exportable_models() -> dict[str, str | None]:
    """Every registered model with the reason it cannot be exported, or None when it can."""
    from uadct.models import available_models

    return {name: NOT_ONE_PASS.get(name) for name in available_models()}


__all__ = [
    "EXPORT_FORMATS", "ExportError", "ExportResult", "export_checkpoint", "export_json_path", "export_metadata",
    "exportable_models", "onnx_predictor", "read_export_metadata",
]
