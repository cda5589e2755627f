"""The ``uadct`` command line: builds the Typer app from :mod:`uadct.commands` and runs it.

The commands themselves live in ``uadct/commands/`` (one module per command or group); each
parses options, calls one library function and draws rich progress and tables. Here: the app,
its global options, and :func:`main`, where a :class:`~uadct.errors.UadctError` becomes a
one-line message on stderr and exit code 2. Heavy modules (torch, SimpleITK, itk) are imported
inside commands so ``uadct --help`` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.text import Text

from uadct import __version__
from uadct.commands import _console, atlas, data, demo, evaluate, export, heatmap, models, preprocess, score, train
from uadct.errors import UadctError

app = typer.Typer(
    name="uadct",
    help="Unsupervised anomaly detection in brain MRI, head CT and 2D images (X-rays, CT slides): preprocess -> train -> score -> heatmap -> evaluate.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps at the terminal width (80 in logs), never cuts a word; "[default: ...]" is not markup
    context_settings={"max_content_width": 100},
)
app.add_typer(atlas.app, name="atlas")
app.add_typer(data.app, name="data")
for _commands in (demo, preprocess, train, models, score, heatmap, export, evaluate):  # the order of `uadct --help`
    _commands.register(app)


def _version(value: bool) -> None:
    if value:
        print(f"uadct {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # library warnings (numpy, torch, ITK) would print lines before the one-line error
        import warnings

        warnings.simplefilter("ignore")


def main() -> None:
    """Console-script entry point: UadctError -> one line on stderr, exit code 2."""
    previous_allowance = os.environ.get("UADCT_MAX_IMAGE_MEMORY")
    try:
        app()
    except UadctError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _console.console.print(Text("error: ", style="red") + Text(message), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _console.console.print("interrupted")
        sys.exit(130)
    finally:  # in-process callers (tests, notebooks) get the environment back
        if previous_allowance is None:
            os.environ.pop("UADCT_MAX_IMAGE_MEMORY", None)
        else:
            os.environ["UADCT_MAX_IMAGE_MEMORY"] = previous_allowance
