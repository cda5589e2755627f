"""Help that can be read at 80 columns and in logs; --version; summary tables that never cut subject ids."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table
from typer.main import get_command
from typer.testing import CliRunner

from uadct import __version__
from uadct.cli import app
from uadct.commands import _console, preprocess


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command and sub-command of a (Typer's own click) group, with its name path."""
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((prefix + (name,), command))
        if hasattr(command, "commands"):
            found += _commands(command, prefix + (name,))
    return found


COMMANDS = _commands(get_command(app))


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_is_whole_at_80_columns(path, command):
    """Every option name appears whole, every help text appears in full (only wrapped), no line over 80."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": None})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    words = set(re.findall(r"(?<![\w-])-{1,2}[\w-]+", text))
    for param in command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert name in words, f"{' '.join(path)}: {name} missing or cut"
        if getattr(param, "help", None):
            assert _squeeze(param.help) in _squeeze(text), f"{' '.join(path)}: help of {param.name} cut"


def test_group_help_lists_every_command_uncut():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    for path, command in COMMANDS:
        if len(path) == 1:
            summary = command.short_help or command.help.split(".")[0]
            assert summary.strip().rstrip(".") in result.output, path
    assert "..." not in result.output.replace("[ARGS]...", "")
    assert "--install-completion" in result.output


def test_help_in_a_log_and_version():
    """Not a TTY and no COLUMNS (a SLURM log): the same whole help; --version answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    done = subprocess.run([sys.executable, "-m", "uadct", "train", "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, check=True)
    for name in ("--patches-per-epoch", "--validation-patches", "--exclude-labels", "--max-memory"):
        assert name in done.stdout
    words = " ".join(done.stdout.split())  # help texts wrap; every word must be there, none cut
    assert "Model name (see `uadct models`); default: the winner of the real-data benchmark." in words
    version = subprocess.run([sys.executable, "-m", "uadct", "--version"], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
    assert version.stdout.strip() == f"uadct {__version__}"


def _log(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(_console, "out", Console(file=buffer, width=80, force_terminal=False))
    return buffer


@pytest.mark.parametrize("id_length", [8, 26, 37])
def test_subject_ids_never_cut_in_an_80_column_log(monkeypatch, id_length):
    """The preprocess summary at 80 columns: every id whole on one line, no cell cut."""
    buffer = _log(monkeypatch)
    ids = [f"sub-{i:02d}_ses-baseline_acq-mprage_run-01"[:id_length] for i in range(3)]
    rows = [{"subject": name, "input": f"/data/{name}.nii.gz", "status": "failed" if i == 1 else "done", "seconds": 12.3,
             "mask_dice": 0.91, "ncc": 0.8, "error": f"/data/{name}.nii.gz: broken gzip stream" if i == 1 else None,
             "warnings": ["registration Dice 0.75 below 0.8"] if i == 2 else []} for i, name in enumerate(ids)]
    preprocess.print_preprocess_summary(rows, Path("prep"))
    text = buffer.getvalue()
    assert "…" not in text
    for i, name in enumerate(ids):
        line = next(line for line in text.splitlines() if name in line)
        assert ("failed" if i == 1 else "done") in line and "0.910" in line
    if id_length < 30:  # boxed table
        assert max(len(line) for line in text.splitlines()) <= 80 and "┃ subject" in text


@pytest.mark.parametrize("subject", ["sub-01", "sub-01_ses-baseline_run-01"])
def test_wide_tables_shrink_without_cutting(monkeypatch, subject):
    """An evaluate-like table of 9 columns: borderless when that fits, else one line per row; nothing cut."""
    buffer = _log(monkeypatch)
    table = Table(_console.id_column(), "AUROC", "AUPRC", "best Dice", "Dice@FPR 0.01", "Dice@FPR 0.05", "lesions found",
                      "FP clusters", "image score", title="evaluation")
    for name in (subject, "pooled"):
        table.add_row(name, "0.967", "0.674", "0.671", "0.500", "0.400", "12/12", "3.250", "0.123")
    _console.print_table(table)
    text = buffer.getvalue()
    assert "…" not in text
    line = next(line for line in text.splitlines() if subject in line)
    assert all(value in line for value in ("0.967", "0.674", "0.671", "0.500", "0.400", "12/12", "3.250", "0.123"))
    if subject == "sub-01":
        assert max(len(line) for line in text.splitlines()) <= 80 and "Dice@FPR" in text
    else:
        assert "best Dice: 0.671" in line
