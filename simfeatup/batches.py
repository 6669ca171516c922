"""Many inputs into one ``--out`` folder, across runs and machines: shards, finished inputs, the shared legend.

- Shards: ``--shard-index I --num-shards N`` (or a SLURM job array's task, read from its
  environment) keeps every N-th input of the sorted input list, starting at the I-th, so
  array tasks split a batch without talking to each other and each input belongs to one task.
- Finished inputs (``--skip-existing``): an input whose planned output files all exist is not
  segmented again. Outputs appear under their final names only when complete (:mod:`simfeatup.atomic`),
  so an existing file is a finished one and a killed batch resumes where it stopped.
- The legend ``classes.json`` names the classes of every label map in the folder: a run with
  other classes is refused before the model loads (``--overwrite`` replaces it); with the same
  classes it is kept as is, so array tasks sharing the folder agree.

Light at import (the parser adds the flags): no numpy, no model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

from . import flags
from .entry import UsageError

logger = logging.getLogger("simfeatup")

LEGEND = "classes.json"  # the output folder's legend: index, class line and colour of every label value


def add_flags(p: argparse.ArgumentParser) -> None:
    flags.either_switch(
        p,
        {
            "--skip-existing": "leave out inputs whose outputs (label map and what the flags ask for) are all in "
            "--out already: a killed batch resumes where it stopped",
            "--overwrite": f"segment into an --out folder whose {LEGEND} lists other classes, replacing it "
            "(its earlier label maps then no longer match the legend)",
        },
    )
    p.add_argument(
        "--shard-index",
        type=_count(0),
        metavar="I",
        help="segment only shard I (0-based) of --num-shards: every N-th input of the sorted list, from the I-th "
        "(default: SLURM_ARRAY_TASK_ID's place in a SLURM job array, else all inputs)",
    )
    p.add_argument(
        "--num-shards",
        type=_count(1),
        metavar="N",
        help="how many shards the inputs are split into (default: the SLURM job array's size)",
    )


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {low}")
        return value

    return parse


class Shard(NamedTuple):
    """Shard ``index`` (0-based) of ``count``; ``source`` says where it came from (for the log), None for flags."""

    index: int
    count: int
    source: str | None = None


def resolve_shard(index: int | None, count: int | None, environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard this run segments: from the flags, else from a SLURM job array, else everything.

    A SLURM array task has ``SLURM_ARRAY_TASK_ID`` (its index as given to ``sbatch --array``),
    ``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_MIN``/``MAX`` and ``SLURM_ARRAY_TASK_STEP``:
    ``--array=1-16`` or ``--array=0-30:2`` are shards 0..15 of 16. An array whose indices are not
    one evenly stepped range (``--array=1,4,9``) has no such place: the flags must say it.
    """
    if (index is None) != (count is None):
        raise UsageError("give both --shard-index and --num-shards, or neither")
    if count is not None:
        if index >= count:
            raise UsageError(f"--shard-index {index} is not below --num-shards {count}: shards are 0..{count - 1}")
        return Shard(index, count)
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return Shard(0, 1)
    names = ("ID", "COUNT", "MIN", "MAX", "STEP")
    found = {n: environ.get(f"SLURM_ARRAY_TASK_{n}") for n in names}
    given = ", ".join(f"SLURM_ARRAY_TASK_{n}={v}" for n, v in found.items() if v is not None)
    try:
        task, total = int(found["ID"]), int(found["COUNT"])
        low, step = int(found["MIN"] or 0), int(found["STEP"] or 1)
        high = int(found["MAX"]) if found["MAX"] is not None else low + (total - 1) * step
    except (TypeError, ValueError):
        raise UsageError(
            f"this SLURM array task's variables ({given}) do not say its place in the array: "
            "give --shard-index and --num-shards"
        ) from None
    offset = task - low
    if step < 1 or total < 1 or offset % step or not 0 <= offset // step < total or low + (total - 1) * step != high:
        raise UsageError(
            f"this SLURM array ({given}) is not one evenly stepped range such as --array=0-15: "
            "give --shard-index and --num-shards"
        )
    return Shard(offset // step, total, given)


def take_shard(inputs: list[Path], shard: Shard) -> list[Path]:
    """The inputs of ``shard``, in their given order: every ``count``-th of the sorted, de-duplicated
    paths, from the ``index``-th. Every array task sorts the same list the same way."""
    if shard.count == 1 and shard.source is None:
        return inputs
    ordered = sorted(dict.fromkeys(inputs), key=str)
    chosen = set(ordered[shard.index :: shard.count])
    mine = [p for p in dict.fromkeys(inputs) if p in chosen]
    logger.info(
        "shard %d of %d (0-based%s): %d of %d input(s)",
        shard.index,
        shard.count,
        f", from {shard.source}; --shard-index/--num-shards override it" if shard.source else "",
        len(mine),
        len(ordered),
    )
    return mine


def unfinished(inputs: Iterable[Path], planned: Callable[[Path], list[Path]], out: Path) -> list[Path]:
    """The inputs some of whose ``planned(input)`` output files do not exist yet; the others are logged once."""
    inputs = list(inputs)
    todo = [p for p in inputs if not all(f.is_file() for f in planned(p))]
    if len(todo) < len(inputs):
        logger.info(
            "--skip-existing: %d of %d input(s) already have all their outputs in %s, not segmented again",
            len(inputs) - len(todo),
            len(inputs),
            out,
        )
    return todo


def legend(classes: list[str]) -> list[dict]:
    """The legend entries of ``classes`` (class lines): index, class line, palette colour."""
    from .visualize import palette

    colours = palette(classes)
    return [{"index": k, "class": line, "color": colours[k].tolist()} for k, line in enumerate(classes)]


def legend_to_write(out: Path, classes: list[str], *, overwrite: bool) -> list[dict] | None:
    """The legend to write to ``out``, or None when ``out`` holds this one already.

    Refuses (UsageError) a folder whose legend lists other classes unless ``overwrite``: its
    label maps would otherwise carry the wrong legend. Reads only; call it before the model
    loads, and again just before writing (another run may have written meanwhile).
    """
    path = out / LEGEND
    if not path.is_file():
        return legend(classes)
    try:
        earlier = [entry["class"] for entry in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError, KeyError) as err:
        if overwrite:
            return legend(classes)
        raise UsageError(
            f"{path} is not a legend simfeatup can read ({err}): use another --out, or --overwrite to replace it"
        ) from None
    if earlier == classes:
        return None
    if not overwrite:
        raise UsageError(
            f"{out} holds label maps of other classes ({LEGEND}: {';'.join(earlier)!r}; now: {';'.join(classes)!r}): "
            f"use another --out, or --overwrite to replace its legend"
        )
    logger.warning("--overwrite: %s listed %r, now %r", path, ";".join(earlier), ";".join(classes))
    return legend(classes)


def write_legend(out: Path, classes: list[str], *, overwrite: bool) -> None:
    """Write ``out/classes.json`` (atomically) unless it holds these classes already; see :func:`legend_to_write`."""
    from .atomic import atomic_write

    entries = legend_to_write(out, classes, overwrite=overwrite)
    if entries is None:
        return
    with atomic_write(out / LEGEND) as tmp:
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
