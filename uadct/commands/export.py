"""`uadct export`: the patch network to ONNX or TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from uadct.commands import _console as ui
from uadct.errors import InputError

def export(
    model: Path = typer.Argument(..., help="Checkpoint written by `uadct train`."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="./<checkpoint name>.onnx (.ts for torchscript)",
                                          help="Network file to write (model.onnx or model.ts); <file>.json goes beside it."),
    export_format: str = typer.Option("onnx", "--format", metavar="onnx|torchscript", help="ONNX (needs uadct[export]) or TorchScript."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Export the patch network (dynamic batch axis) with a JSON of its preprocessing and patch metadata."""
    from uadct.default_outputs import export_output
    from uadct.export import export_checkpoint, export_json_path
    from uadct.outputs import check_output_file, refuse_overwriting_inputs

    output = output or ui.announce(export_output(model, export_format))
    refuse_overwriting_inputs([output, export_json_path(output)], [model])
    check_output_file(output, "exported network")
    if output.exists() and not force:
        raise InputError(f"{output}: exists; pass --force to overwrite")
    result = export_checkpoint(model, output, export_format)
    ui.out.print(f"{result.format}: {result.path} (inputs {', '.join(result.inputs)}; outputs {', '.join(result.outputs)})")
    ui.out.print(f"metadata: {result.json_path}")


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Export the patch network to ONNX or TorchScript.")(export)
