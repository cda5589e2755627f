"""`uadct models`: the model registry, one model's options, or the shipped pretrained models' cards."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from uadct.commands import _console as ui


def models_list(
    name: Optional[str] = typer.Argument(None, help="Show this model's options (for `train -O KEY=VALUE`)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the options of every model."),
    pretrained: bool = typer.Option(False, "--pretrained", help="List the pretrained models shipped in the package with their model cards."),
    as_json: bool = typer.Option(False, "--json", help="With --pretrained: print the model cards as JSON."),
) -> None:
    """List the available models, or one model's options with their defaults and meaning."""
    from uadct.models import available_models
    from uadct.models.base import model_class, model_options

    if pretrained:
        from uadct.pretrained import card_text, model_card, pretrained_names

        names = [name] if name is not None else pretrained_names()
        if as_json:
            print(json.dumps({n: model_card(n) for n in names}, indent=2))
            return
        if not names:
            ui.out.print("no pretrained models are shipped in this installation")
        for item in names:
            ui.out.print(card_text(item, model_card(item)), highlight=False, soft_wrap=True)
        return

    if name is None and not verbose:
        table = Table("model", "description")
        for model, summary in available_models().items():
            table.add_row(model, summary)
        ui.out.print(table)
        return
    for model in [name] if name is not None else list(available_models()):
        table = Table("option", "type", "default", "meaning", title=f"{model}: {model_class(model).summary}")
        for option in model_options(model):
            table.add_row(option.name, option.type, repr(option.default), option.help)
        ui.out.print(table)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command("models", short_help="List the models, or one model's options.")(models_list)
