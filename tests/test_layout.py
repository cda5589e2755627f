"""The module layout: no import circles, no module importing a higher layer, each room importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import uadct

PACKAGE = Path(uadct.__file__).parent

# lower number = lower floor; a module may import its own floor or lower ones only
LAYERS = {
    0: ("uadct", "uadct.__init__", "uadct.errors", "uadct.names", "uadct.outputs", "uadct.dicom", "uadct.device", "uadct.locks", "uadct.writing", "uadct.io",
        "uadct.arrays", "uadct.batch", "uadct.images2d",
        "uadct.memory", "uadct.patches", "uadct.atlas", "uadct.scoremap", "uadct.calibration"),
    1: ("uadct.models", "uadct.preprocess", "uadct.augment", "uadct.checkpoint", "uadct.synthetic", "uadct.demo",
        "uadct.metrics", "uadct.lesions", "uadct.default_outputs", "uadct.datasets",
        "uadct.postprocess", "uadct.pretrained", "uadct.forest", "uadct.forest_scorer", "uadct.covariates"),
    2: ("uadct.training", "uadct.inference", "uadct.patch_scoring", "uadct.training_volumes", "uadct.calibrate_maps"),
    3: ("uadct.evaluation_report", "uadct.evaluation_subjects", "uadct.evaluate", "uadct.report", "uadct.report_page", "uadct.report_curves", "uadct.viewer", "uadct.export",
        "uadct.heatmap2d", "uadct.image_labels"),
    4: ("uadct.commands", "uadct.cli", "uadct.__main__"),
}


def _layer(module: str) -> int:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (layer, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py"
    return best[0]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """uadct modules imported anywhere in ``path`` (also inside functions; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for node in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uadct"):
            for alias in node.names:  # `from uadct.models import base` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("uadct"))
    return {name for name in found if name in modules}


def test_no_module_imports_a_higher_layer_and_there_is_no_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if _layer(b) > _layer(a) and not (a == "uadct" or b == "uadct")]
    assert upward == []
    # depth-first search for a circle (package __init__ re-exports count as edges too)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if target == "uadct" or node == "uadct":
                continue
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.slow


def test_each_room_imports_on_its_own_in_a_fresh_interpreter():
    failures = {}
    for room in ("uadct.calibration", "uadct.inference", "uadct.training", "uadct.preprocess.prepared"):
        done = subprocess.run([sys.executable, "-c", f"import {room}"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
        if done.returncode != 0:
            failures[room] = done.stderr.strip().splitlines()[-1:]
    assert failures == {}


def test_modules_stay_small_unless_their_docstring_says_why():
    too_long = []
    for name, path in _modules().items():
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > 500 and "Size:" not in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""):
            too_long.append(f"{name} ({lines} lines)")
    assert too_long == []


def test_rich_is_drawn_by_the_command_layer_only():
    """The library reports through callbacks and return values; only uadct.cli and uadct.commands import rich."""
    drawing = []
    for name, path in _modules().items():
        if _layer(name) == 4:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(item == "rich" or item.startswith("rich.") for item in names):
                drawing.append(name)
    assert drawing == []


def test_cli_only_builds_the_app():
    """uadct/cli.py holds no command of its own: every command is defined in a module of uadct.commands."""
    from typer.main import get_command

    from uadct.cli import app

    def commands(group):
        for command in group.commands.values():
            yield command
            if hasattr(command, "commands"):
                yield from commands(command)

    homes = {command.name: command.callback.__module__ for command in commands(get_command(app)) if command.callback}
    assert homes and all(home.startswith("uadct.commands.") for home in homes.values()), homes
