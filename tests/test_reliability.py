"""Reliability of scoring: memory budgets, killed runs, and array tasks sharing an output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from uadct.checkpoint import load_checkpoint, read_checkpoint_payload
from uadct.cli import app
from uadct.errors import CheckpointError, UadctError
from uadct.io import read_image
from uadct.locks import LOCK_FOLDER, output_lock, remove_stale_temporaries
from uadct.memory import AdaptiveBatches, MemoryLimitError, parse_memory, plan_batch

runner = CliRunner()


@pytest.fixture(scope="module")
def scoring_setup(atlas_grid_subjects, tmp_path_factory):
    """A `threshold` model and five prepared 2 mm subjects."""
    root = tmp_path_factory.mktemp("reliability")
    _, prep = atlas_grid_subjects(root, [f"case-{i}" for i in range(5)], contrast_step=0.1)
    model = root / "threshold.pt"
    trained = runner.invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold", "--validation-patches", "256"])
    assert trained.exit_code == 0, trained.output
    return model, prep


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_image(path, allow_empty=True))


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- memory budgets
@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5GB", int(1.5 * (1 << 30))),
                                            ("2000", 2000), ("64k", 64 << 10), ("3GiB", 3 << 30)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "4X", "0"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(UadctError, match="--max-memory"):
        parse_memory(text)


def test_plan_batch_fits_the_budget_or_says_what_would():
    plan = plan_batch(None, per_patch=1000, fixed=10_000, budget=110_000)
    assert plan.batch_size == 100
    assert plan_batch(50, 1000, 10_000, 110_000).batch_size == 50
    with pytest.raises(MemoryLimitError, match="use --batch-size 100 or less"):
        plan_batch(101, 1000, 10_000, 110_000)
    with pytest.raises(MemoryLimitError, match="raise --max-memory"):
        plan_batch(None, 1000, 200_000, 110_000)


def test_adaptive_batches_split_on_out_of_memory_and_keep_results():
    calls: list[int] = []

    def scarce(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(batch) > 12:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 2.0

    def run(adaptive: AdaptiveBatches, data: np.ndarray) -> np.ndarray:
        parts = list(adaptive.map(data))
        np.testing.assert_array_equal(np.concatenate([part for part, _ in parts]), data)  # covered once, in order
        return np.concatenate([result for _, result in parts])

    adaptive = AdaptiveBatches(scarce, batch_size=100)
    data = np.arange(50, dtype=np.float64)
    np.testing.assert_array_equal(run(adaptive, data), data * 2.0)
    assert adaptive.batch_size <= 12 and adaptive.reductions >= 1
    calls.clear()
    np.testing.assert_array_equal(run(adaptive, data[:30]), data[:30] * 2.0)
    assert max(calls) <= 12  # the smaller size is kept, no more failing attempts

    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("shape mismatch")  # not a memory problem: never retried

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(AdaptiveBatches(broken, 8).map(data))


def test_score_refuses_a_batch_beyond_max_memory_before_writing(scoring_setup, tmp_path):
    model, prep = scoring_setup
    target = tmp_path / "map.nii.gz"
    result = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(target),
                                 "--batch-size", "1000000", "--max-memory", "256M"])
    assert isinstance(result.exception, MemoryLimitError)
    message = str(result.exception)
    assert "\n" not in message and "--max-memory" in message and "use --batch-size" in message
    assert not target.exists() and not _temporaries(tmp_path)
    tiny = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(target), "--max-memory", "1M"])
    assert isinstance(tiny.exception, MemoryLimitError) and not target.exists()


def test_automatic_batch_gives_the_same_map_as_a_fixed_one(scoring_setup, tmp_path):
    model, prep = scoring_setup
    auto = runner.invoke(app, ["score", str(model), str(prep / "case-1"), "-o", str(tmp_path / "auto.nii.gz"), "--max-memory", "300M"])
    fixed = runner.invoke(app, ["score", str(model), str(prep / "case-1"), "-o", str(tmp_path / "fixed.nii.gz"), "--batch-size", "37"])
    assert auto.exit_code == 0 and fixed.exit_code == 0, auto.output + fixed.output
    batch = json.loads((tmp_path / "auto.json").read_text(encoding="utf-8"))["batch"]
    assert batch["batch_size"] > 37 and batch["memory_budget_bytes"] == 300 << 20
    assert batch["fixed_bytes"] + batch["batch_size"] * batch["bytes_per_patch"] <= 300 << 20
    np.testing.assert_array_equal(_array(tmp_path / "auto.nii.gz"), _array(tmp_path / "fixed.nii.gz"))


@pytest.mark.slow
def test_real_allocation_failure_halves_the_batch(scoring_setup, tmp_path):
    """Under an address-space limit a huge batch fails to allocate; scoring adapts and finishes."""
    model, prep = scoring_setup
    script = textwrap.dedent(f"""
        import json, resource, sys
        import numpy as np, SimpleITK as sitk
        from uadct.checkpoint import load_checkpoint
        from uadct.inference import score_volume
        from uadct.preprocess.prepared import load_prepared
        checkpoint = load_checkpoint({str(model)!r})
        prepared = load_prepared({str(prep / 'case-2')!r})
        image, mask = sitk.GetArrayFromImage(prepared.image), sitk.GetArrayFromImage(prepared.mask)
        reference = score_volume(checkpoint, image, mask, stride=1, batch_size=4096, device="cpu")
        # stride 1: ~300k patches of 16x16; their float32 copies alone need 320 MB in one batch
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (200 << 20), resource.RLIM_INFINITY))
        plan = {{}}
        adapted = score_volume(checkpoint, image, mask, stride=1, batch_size=10**7, device="cpu", max_memory=1 << 40, plan_out=plan)
        print(json.dumps({{"equal": bool(np.array_equal(reference, adapted)), **plan}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["equal"]
    assert report["out_of_memory_retries"] >= 1 and report["final_batch_size"] < report["batch_size"]
    assert "out of memory with" in done.stderr


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_whose_patch_geometry_disagrees_is_refused(scoring_setup, tmp_path):
    import torch

    model, _ = scoring_setup
    payload = read_checkpoint_payload(model)
    metadata = json.loads(payload["metadata"])
    metadata["patch"]["size"] = metadata["model_config"]["patch_size"] * 2
    payload["metadata"] = json.dumps(metadata)
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    with pytest.raises(CheckpointError, match="patch size .* disagrees"):
        load_checkpoint(edited)
    result = runner.invoke(app, ["score", str(edited), str(tmp_path), "-o", str(tmp_path / "m.nii.gz")])
    assert isinstance(result.exception, CheckpointError) and not (tmp_path / "m.nii.gz").exists()


# ----------------------------------------------------------------------------- killed and repeated runs
def test_incomplete_outputs_of_a_killed_run_are_redone(scoring_setup, tmp_path):
    model, prep = scoring_setup
    out = tmp_path / "maps"
    first = runner.invoke(app, ["score", str(model), str(prep), "-o", str(out), "--json"])
    assert first.exit_code == 0, first.output
    reference = _array(out / "case-0.nii.gz")
    # what kill -9 can leave: a temporary file, and a map whose sidecar was never written
    (out / ".case-1.nii.gz.k3j2.tmp.nii.gz").write_bytes(b"\x1f\x8b half a file")
    (out / "case-0.json").unlink()
    (out / "case-0.nii.gz").write_bytes(b"truncated")
    again = runner.invoke(app, ["score", str(model), str(prep), "-o", str(out), "--json"])
    assert again.exit_code == 0, again.output
    statuses = {r["subject"]: r["status"] for r in json.loads(again.stdout)}
    assert statuses["case-0"] == "done" and statuses["case-2"] == "skipped"
    np.testing.assert_array_equal(_array(out / "case-0.nii.gz"), reference)
    assert not _temporaries(out)


def test_map_made_with_other_settings_is_not_silently_kept(scoring_setup, tmp_path):
    model, prep = scoring_setup
    target = tmp_path / "m.nii.gz"
    assert runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(target)]).exit_code == 0
    other = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(target), "--stride", "8"])
    assert isinstance(other.exception, UadctError) and "--force" in str(other.exception)
    forced = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(target), "--stride", "8", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["settings"]["stride"] == 8


def _score_command(model: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uadct", "score", str(model), str(inputs), "-o", str(out), "--json", *extra]


def _environment() -> dict[str, str]:
    root = str(Path(__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_kill_9_during_scoring_then_rerun_equals_an_uninterrupted_run(scoring_setup, tmp_path):
    model, prep = scoring_setup
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_score_command(model, prep, clean), check=True, capture_output=True, env=_environment(), timeout=600)
    process = subprocess.Popen(_score_command(model, prep, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=_environment())
    deadline = time.monotonic() + 300
    def finished_sidecars() -> list[Path]:  # a map's JSON, written last; not a hidden temporary file being written
        return [p for p in killed.glob("*.json") if not p.name.startswith(".")]

    while not finished_sidecars() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "scoring finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(finished_sidecars())
    assert 1 <= finished < 5
    rerun = subprocess.run(_score_command(model, prep, killed), capture_output=True, text=True, encoding="utf-8", errors="replace", env=_environment(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    statuses = [r["status"] for r in json.loads(rerun.stdout)]
    assert statuses.count("skipped") >= finished and "failed" not in statuses
    assert not _temporaries(killed)
    for reference in sorted(clean.glob("*.nii.gz")):
        np.testing.assert_array_equal(_array(killed / reference.name), _array(reference))
        assert json.loads((killed / reference.name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))["image_score"] == \
            json.loads((clean / reference.name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))["image_score"]


# ----------------------------------------------------------------------------- concurrent array tasks
def test_output_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from uadct.locks import output_lock
            with output_lock({str(tmp_path)!r}, "case-0.nii.gz") as mine:
                print(mine, flush=True)
                time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=_environment())
    assert holder.stdout.readline().strip() == "True"
    with output_lock(tmp_path, "case-0.nii.gz") as mine:
        assert not mine
    with output_lock(tmp_path, "case-1.nii.gz") as other:
        assert other  # other outputs are free
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with output_lock(tmp_path, "case-0.nii.gz") as mine:
        assert mine  # the kernel released the dead holder's lock
    assert not (tmp_path / LOCK_FOLDER).exists()  # released locks leave nothing behind


@pytest.mark.slow
def test_a_map_locked_by_another_task_is_left_alone(scoring_setup, tmp_path):
    model, prep = scoring_setup
    out = tmp_path / "maps"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from uadct.locks import output_lock
            with output_lock({str(out)!r}, "case-3.nii.gz") as mine:
                print(mine, flush=True)
                time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=_environment())
    try:
        assert holder.stdout.readline().strip() == "True"
        result = runner.invoke(app, ["score", str(model), str(prep), "-o", str(out), "--json"])
        assert result.exit_code == 0, result.output
        statuses = {r["subject"]: r["status"] for r in json.loads(result.stdout)}
        assert statuses["case-3"] == "busy" and not (out / "case-3.nii.gz").exists()
        assert sum(s == "done" for s in statuses.values()) == 4
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_two_overlapping_array_tasks_write_every_map_once_and_intact(scoring_setup, tmp_path):
    """Two tasks over the same subjects (shards overlapping by mistake) into one folder."""
    model, prep = scoring_setup
    clean, shared = tmp_path / "clean", tmp_path / "shared"
    subprocess.run(_score_command(model, prep, clean), check=True, capture_output=True, env=_environment(), timeout=600)
    tasks = [subprocess.Popen(_score_command(model, prep, shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                              env=_environment()) for _ in range(2)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), [o[1][-1000:] for o in outputs]
    records = [r for stdout, _ in outputs for r in json.loads(stdout)]
    written = [r["subject"] for r in records if r["status"] == "done"]
    assert sorted(set(written)) == [f"case-{i}" for i in range(5)]
    assert len(written) == 5  # nobody scored a map twice (the other saw it busy or done)
    assert not _temporaries(shared)
    for reference in sorted(clean.glob("*.nii.gz")):
        np.testing.assert_array_equal(_array(shared / reference.name), _array(reference))


def test_remove_stale_temporaries_only_touches_that_output(tmp_path):
    target = tmp_path / "case-0.nii.gz"
    mine = [tmp_path / ".case-0.nii.gz.abc.tmp.nii.gz", tmp_path / ".case-0.nii.gz.x1.tmp"]
    theirs = [tmp_path / ".case-01.nii.gz.abc.tmp.nii.gz", tmp_path / "case-0.nii.gz.bak", tmp_path / ".case-1.nii.gz.q.tmp.nii.gz"]
    for path in mine + theirs:
        path.write_text("x")
    (tmp_path / ".case-0.nii.gz.d.tmp").mkdir()
    removed = remove_stale_temporaries(target)
    assert len(removed) == 3
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in mine)


# ----------------------------------------------------------------------------- training memory
def test_training_memory_grows_with_the_patch_and_leaves_random_streams_alone():
    import torch

    from uadct.memory import training_memory
    from uadct.models import build_model

    small = build_model("cae", {"patch_size": 16})
    large = build_model("cae", {"patch_size": 32})
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    per_small, fixed_small = training_memory(small, (1, 16, 16), torch.device("cpu"), 1e-3)
    assert torch.equal(torch.rand(3), expected)  # the probe step did not consume the training stream
    per_large, fixed_large = training_memory(large, (1, 32, 32), torch.device("cpu"), 1e-3)
    assert per_large > 3 * per_small  # 4x the voxels
    parameters = sum(p.numel() * 4 for p in small.parameters())
    assert fixed_small >= 4 * parameters  # weights, gradients and Adam's two moments
    assert all(p.grad is None for p in small.parameters())  # the model itself was not touched


@pytest.mark.slow


def test_train_refuses_a_batch_beyond_max_memory_before_training(atlas_grid_subjects, tmp_path):
    _, prep = atlas_grid_subjects(tmp_path, ["case-0", "case-1"])
    model = tmp_path / "model.pt"
    result = runner.invoke(app, ["train", str(prep), "-o", str(model), "--model", "cae", "--batch-size", "100000", "--max-memory", "300M",
                                 "--epochs", "1"])
    assert isinstance(result.exception, MemoryLimitError), result.output
    message = str(result.exception)
    assert "\n" not in message and "training" in message and "use --batch-size" in message
    assert not model.exists() and not list(tmp_path.glob("model.pt*"))
    fits = runner.invoke(app, ["train", str(prep), "-o", str(model), "--model", "cae", "--batch-size", "32", "--max-memory", "300M",
                               "--epochs", "1", "--patches-per-epoch", "64", "--validation-patches", "64"])
    assert fits.exit_code == 0, fits.output
    assert model.is_file()


# ----------------------------------------------------------------------------- preprocessing: kills and shared folders
def _preprocess_command(raw: Path, out: Path, atlas_path: Path) -> list[str]:
    # elastix affine registration on, skull-strip and N4 off: a few seconds per 2 mm subject
    return [sys.executable, "-m", "uadct", "preprocess", str(raw), "-o", str(out), "--atlas", str(atlas_path),
            "--skull-strip", "none", "--no-bias-correction", "--json"]


@pytest.fixture(scope="module")
def raw_scans(atlas_grid_subjects, small_atlas_path, tmp_path_factory):
    """Four skull-stripped 2 mm scans and their uninterrupted preprocessing."""
    root = tmp_path_factory.mktemp("prep-reliability")
    raw, _ = atlas_grid_subjects(root, [f"sub-{i}" for i in range(4)], contrast_step=0.15, prepare=False)
    clean = root / "clean"
    subprocess.run(_preprocess_command(raw, clean, small_atlas_path), check=True, capture_output=True,
                   env=_environment(), timeout=900)
    return raw, clean


def _assert_same_preparation(reference: Path, other: Path) -> None:
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == sorted(p.name for p in other.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in folders:
        for image in sorted((reference / name).glob("*.nii.gz")):
            np.testing.assert_array_equal(_array(other / name / image.name), _array(image))


@pytest.mark.slow
def test_kill_9_during_preprocessing_then_rerun_equals_an_uninterrupted_run(raw_scans, small_atlas_path, tmp_path):
    raw, clean = raw_scans
    out = tmp_path / "prep"
    process = subprocess.Popen(_preprocess_command(raw, out, small_atlas_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_environment())
    deadline = time.monotonic() + 600
    while not list(out.glob("*/preprocess.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "preprocessing finished before it could be killed"
    time.sleep(0.5)  # into the next subject
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(out.glob("*/preprocess.json")))
    assert 1 <= finished < 4
    rerun = subprocess.run(_preprocess_command(raw, out, small_atlas_path), capture_output=True, text=True, encoding="utf-8", errors="replace",
                           env=_environment(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert len(summary["skipped"]) == finished and len(summary["done"]) == 4 - finished
    assert not _temporaries(out) and not (out / LOCK_FOLDER).exists()
    _assert_same_preparation(clean, out)


@pytest.mark.slow
def test_two_overlapping_preprocess_tasks_share_an_output_folder(raw_scans, small_atlas_path, tmp_path):
    raw, clean = raw_scans
    out = tmp_path / "prep"
    tasks = [subprocess.Popen(_preprocess_command(raw, out, small_atlas_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, encoding="utf-8", errors="replace", env=_environment()) for _ in range(2)]
    outputs = [task.communicate(timeout=900) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), [o[1][-1000:] for o in outputs]
    summaries = [json.loads(stdout) for stdout, _ in outputs]
    done = [p for summary in summaries for p in summary["done"]]
    assert sorted(Path(p).name for p in done) == [f"sub-{i}" for i in range(4)]  # each subject written exactly once
    assert not [s for summary in summaries for s in summary["failed"]]
    assert not _temporaries(out) and not (out / LOCK_FOLDER).exists()
    _assert_same_preparation(clean, out)
