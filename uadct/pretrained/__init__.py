"""Pretrained models shipped inside the package, referred to by name.

Each model is ``<name>.pt`` (a checkpoint, read with ``weights_only=True`` like any other)
and ``<name>.json`` (its model card: training data, preprocessing, method, benchmark
figures, limits, speed, the checkpoint's SHA-256) in this folder. Wherever a checkpoint
path is accepted, a name works too: :func:`resolve_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uadct.errors import CheckpointError

PRETRAINED_DIR = Path(__file__).resolve().parent


def pretrained_names() -> list[str]:
    """Names of the shipped models (those with both a checkpoint and a card)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt") if p.with_suffix(".json").is_file())


def pretrained_path(name: str) -> Path:
    """The shipped checkpoint file of ``name``."""
    if name not in pretrained_names():
        raise CheckpointError(f"no pretrained model {name!r}; shipped: {', '.join(pretrained_names()) or 'none'}")
    return PRETRAINED_DIR / f"{name}.pt"


def model_card(name: str) -> dict[str, Any]:
    """The model card of ``name`` (parsed JSON)."""
    path = pretrained_path(name).with_suffix(".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: model card unreadable ({exc})") from None


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint file: an existing path as given, else a shipped model's file; a text that is
    neither is an error naming the shipped models."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if text in pretrained_names():
        return PRETRAINED_DIR / f"{text}.pt"
    names = ", ".join(pretrained_names()) or "none"
    raise CheckpointError(f"{text}: no such checkpoint file, and not a pretrained model name (pretrained: {names})")


def card_text(name: str, card: dict[str, Any]) -> str:
    """A model card as readable text (for `uadct models --pretrained`)."""
    lines = [f"[bold]{name}[/bold]: {card.get('title', '')}"]
    for key, label in (("method", "method"), ("preprocessing", "preprocessing")):
        if card.get(key):
            lines.append(f"  {label}: {card[key]}")
    data = card.get("training_data") or {}
    if data:
        lines.append("  training data: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in data.items()))
    for row in card.get("benchmark", {}).get("rows", []):
        lines.append("  benchmark: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in row.items()))
    if card.get("benchmark", {}).get("note"):
        lines.append(f"  benchmark note: {card['benchmark']['note']}")
    speed = card.get("speed") or {}
    if speed:
        lines.append("  speed: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in speed.items()))
    for limit in card.get("limits", []):
        lines.append(f"  limit: {limit}")
    lines.append(f"  file: {PRETRAINED_DIR / card.get('file', name + '.pt')} ({card.get('size_bytes', '?')} bytes)")
    lines.append(f"  SHA-256: {card.get('sha256', '?')}")
    if card.get("rebuild"):
        lines.append(f"  rebuild: {card['rebuild']}")
    return "\n".join(lines)
