"""Dataset presets (SPEC 5): the YAML files beside this module are the one source of truth.

``configs/datasets`` in the repository is a link to this folder. Torch-free: the ONNX
runtime uses the same presets.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    """Class lines and scoring thresholds of one benchmark dataset."""

    key: str
    name: str
    classes: tuple[str, ...]
    prob_thd: float
    bg_idx: int
    lam: float
    labels: dict = field(default_factory=dict)


def _key(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_").replace(" ", "_")


@lru_cache(maxsize=None)
def available() -> dict[str, Path]:
    """Preset key -> YAML file."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


@lru_cache(maxsize=None)
def load(name: str) -> Preset:
    """Load a preset by key or display name, case-insensitive (``loveda``, ``WHU-Sat.II``)."""
    files = available()
    key = _key(name)
    if key not in files:
        close = difflib.get_close_matches(key, files, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}.{hint} Valid presets: {', '.join(files)}.")
    data = yaml.safe_load(files[key].read_text())
    preset = Preset(
        key=key,
        name=data["name"],
        classes=tuple(data["classes"]),
        prob_thd=float(data["prob_thd"]),
        bg_idx=int(data["bg_idx"]),
        lam=float(data["lam"]),
        labels=dict(data.get("labels") or {}),
    )
    if not 0 <= preset.bg_idx < len(preset.classes):
        raise ValueError(f"{files[key]}: bg_idx {preset.bg_idx} is not a class index (0..{len(preset.classes) - 1})")
    return preset
