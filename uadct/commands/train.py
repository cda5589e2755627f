"""`uadct train`: options -> :class:`~uadct.training.TrainConfig` -> :func:`~uadct.training.train_model`, epochs on the progress bar."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from uadct.commands import _console as ui
from uadct.errors import InputError

def train(
    prep: Path = typer.Argument(..., help="Folder written by `uadct preprocess` (healthy subjects only)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="<model>.pt", help="Checkpoint file to write."),
    model: str = typer.Option("normative", help="Model name (see `uadct models`); default: the winner of the real-data benchmark."),
    option: list[str] = typer.Option([], "--option", "-O", metavar="KEY=VALUE",
                                     help="Model hyper-parameter, repeatable (e.g. -O latent_dim=64); `uadct models NAME` lists them."),
    patch_size: int = typer.Option(16, help="Patch edge in voxels (16 or 32 in the papers)."),
    dims: int = typer.Option(2, help="2: axial 2D patches; 3: cubic 3D patches."),
    batch_size: int = typer.Option(128, help="Patches per optimiser step (global, over all processes)."),
    learning_rate: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    epochs: int = typer.Option(50, help="Maximum number of epochs."),
    patience: int = typer.Option(10, help="Early stopping: epochs without validation improvement."),
    patches_per_epoch: int = typer.Option(8192, help="Training patches drawn per epoch."),
    validation_patches: int = typer.Option(2048, help="Validation patches (fixed, from the validation subjects)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same weights on a CPU)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    exclude_labels: Optional[Path] = typer.Option(None, help="Folder of <subject>.nii.gz lesion masks: patches overlapping them are never sampled."),
    augment: str = typer.Option("flip", help="Comma-separated augmentations: flip (horizontal), gmm (GMM/PCA contrast); 'none' for none."),
    workers: Optional[int] = typer.Option(None, min=0, show_default="min(4, cpus-1) per GPU on CUDA, 0 on CPU", help="Patch-sampling worker processes."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", show_default="on for CUDA, off otherwise", help="bfloat16 mixed precision."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", show_default="when it exists with the same settings", help="Continue from OUTPUT.resume.pt (written every epoch and on SIGTERM/SIGINT)."),
    force: bool = typer.Option(False, "--force", help="Start afresh even when an interrupted run left OUTPUT.resume.pt (same as --no-resume)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar="SIZE",
                                             help="Memory one training process may use for the model, optimiser and a batch, e.g. 8G (default: 90% of the device's free memory); a batch that cannot fit is refused before training."),
    scorer: str = typer.Option("model", metavar="model|forest",
                               help="Patch score: the model's own, or forest: a random forest on the model's latent features (healthy vs synthetic anomalies)."),
    forest_model: str = typer.Option("random-forest", metavar="random-forest|gradient-boosting", help="The --scorer forest classifier."),
    forest_trees: int = typer.Option(100, min=1, help="Trees (boosting iterations) of the --scorer forest classifier."),
    forest_patches: int = typer.Option(4096, min=16, help="Healthy training patches for --scorer forest (and as many with synthetic anomalies)."),
    covariates: Optional[Path] = typer.Option(None, "--covariates", metavar="TSV",
                                              help="participants.tsv (participant_id, age, sex): condition the model on each subject's covariates (age standardised, sex one-hot)."),
    covariate_columns: Optional[str] = typer.Option(None, "--covariate-columns", metavar="A,B",
                                                    help="Covariate columns of the --covariates table (default: age and sex where present)."),
) -> None:
    """Fit an anomaly model on patches of healthy prepared subjects.

    Runs again with the same command continue an interrupted (killed) run. Under
    torchrun every process runs this command (see examples/torchrun.sh).
    """
    from uadct.memory import parse_memory
    from uadct.models.base import parse_model_options
    from uadct.outputs import check_output_file, refuse_overwriting_inputs
    from uadct.training import TrainConfig, train_model

    from uadct.default_outputs import train_output

    if dims not in (2, 3):
        raise InputError(f"--dims must be 2 or 3, got {dims}")
    output = output or ui.announce(train_output(model))
    check_output_file(output, "checkpoint")  # before training, not after it
    refuse_overwriting_inputs([output, Path(f"{output}.resume.pt")], [prep])
    budget = parse_memory(max_memory) if max_memory else None
    augmentations = tuple(a.strip() for a in augment.split(",") if a.strip() and a.strip() != "none")
    config = TrainConfig(model=model, patch_size=patch_size, dims=dims, batch_size=batch_size, learning_rate=learning_rate,
                         max_epochs=epochs, patience=patience, patches_per_epoch=patches_per_epoch,
                         validation_patches=validation_patches, seed=seed, device=device,
                         exclude_labels=str(exclude_labels) if exclude_labels else None,
                         augment=augmentations, workers=workers, amp=amp,
                         model_options=parse_model_options(model, option), scorer=scorer, forest_model=forest_model,
                         forest_trees=forest_trees, forest_patches=forest_patches,
                         covariates=str(covariates) if covariates else None,
                         covariate_columns=tuple(c.strip() for c in (covariate_columns or "").split(",") if c.strip()))
    with ui.progress() as bar:
        task = bar.add_task("train", total=epochs, info="")

        def report(event: str, info: dict[str, Any]) -> None:
            if event == "epoch":
                line = (f"epoch {info['epoch']} train {info['train_loss']:.4f} val {info['validation_loss']:.4f} "
                        f"(best {info['best_epoch']}, {info['patches_per_second']:.0f} patches/s)")
                if info.get("stage_advanced"):  # a growing model (progressive GANomaly) moved to its next stage
                    line += "; next stage"
                bar.update(task, advance=1, info=line)
                if not ui.console.is_terminal:  # logs of batch jobs still show how training goes
                    ui.console.print(line, highlight=False)
            elif event == "resume":
                bar.update(task, completed=info["epoch"])
                ui.console.print(f"resuming the interrupted run from {info['path']} at epoch {info['epoch']}"
                                 + (f" step {info['step']}" if info["step"] else ""), highlight=False, soft_wrap=True)
            else:
                bar.update(task, info=f"epoch {info['epoch']} step {info['step']}/{info['steps']} loss {info['loss']:.4f}")

        result = train_model(prep, output, config, progress=report, resume=False if force else resume, max_memory=budget)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 reports
        return
    fitted = (f"best epoch {result.best_epoch} of {len(result.history)}, validation loss {result.best_validation_loss:.5f}"
              if result.history else "no trainable parameters: statistics fitted on training patches")
    ui.out.print(f"model {output}: {fitted}, {result.seconds:.0f} s; train {len(result.train_subjects)} / "
                 f"validation {len(result.validation_subjects)} subjects")


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Fit an anomaly model on healthy prepared subjects.")(train)
