"""`uadct demo`: generate the demo cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from uadct.commands import _console as ui


def demo(
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="uadct-demo/",
                                          help="Folder for the demo cohort."),
    healthy: int = typer.Option(8, help="Number of healthy subjects."),
    test: int = typer.Option(4, help="Number of test subjects with inserted lesions."),
    seed: int = typer.Option(0, help="Random seed (same seed, same cohort)."),
    voxel_scale: float = typer.Option(1.0, help="Multiply voxel sizes (2.0 makes small, fast volumes)."),
) -> None:
    """Generate a demo cohort from the SRI24 head T1: healthy scans, and test scans with lesion masks."""
    from uadct.default_outputs import demo_output
    from uadct.demo import generate_cohort
    from uadct.outputs import check_output_folder

    output = output or ui.announce(demo_output())
    check_output_folder(output)
    with ui.progress() as bar:
        task = bar.add_task("demo cohort", total=healthy + test, info="")
        cohort = generate_cohort(output, healthy, test, seed=seed, voxel_scale=voxel_scale,
                                 progress=lambda done, total: bar.update(task, completed=done))
    ui.out.print(f"healthy: {output / 'healthy'} ({len(cohort.healthy)})  test: {output / 'test'} ({len(cohort.test)})  labels: {output / 'labels'}")


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Generate a demo cohort from the SRI24 head T1.")(demo)
