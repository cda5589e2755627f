"""`uadct data fetch`: download a public dataset of healthy scans."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from uadct.commands import _console as ui

app = typer.Typer(help="Download public datasets of healthy scans to train on.", no_args_is_help=True, rich_markup_mode=None)


@app.command("fetch")
def data_fetch(
    dataset: str = typer.Argument("ixi", help="Dataset name (ixi)."),
    modality: str = typer.Option("T1", help="IXI modality: T1, T2, PD or MRA."),
    output: Path = typer.Option(Path("data"), "-o", "--output", help="Folder; the scans land in OUTPUT/<dataset>/<modality>/."),
    url: Optional[str] = typer.Option(None, help="Download from this mirror instead of the official site (give its --md5)."),
    md5: Optional[str] = typer.Option(None, help="Expected MD5 of the archive. [default: the official archive's]"),
    keep_archive: bool = typer.Option(False, "--keep-archive", help="Keep the downloaded tar archive after unpacking."),
    force: bool = typer.Option(False, "--force", help="Download and unpack again even if the folder exists."),
) -> None:
    """Download a dataset archive (resumable, checksummed) and unpack it. Needs the internet."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from uadct.datasets import dataset_archive, fetch_dataset

    archive = dataset_archive(dataset, modality, url=url, md5=md5)
    ui.console.print(f"licence: {archive.licence}", highlight=False)
    ui.console.print(f"source: {archive.url} (MD5 {archive.md5 or 'not checked'})", highlight=False, soft_wrap=True)
    ui.console.print(f"output: {output / archive.dataset / archive.modality}", highlight=False, soft_wrap=True)
    bar = Progress(TextColumn("[bold]download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   console=ui.console, disable=not ui.console.is_terminal)
    with bar:
        task = bar.add_task("download", total=None)
        result = fetch_dataset(archive, output, keep_archive=keep_archive, force=force,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    state = "already there" if result.skipped else "unpacked"
    ui.out.print(f"{archive.dataset} {archive.modality}: {len(result.files)} files {state} in {result.folder}", highlight=False)
