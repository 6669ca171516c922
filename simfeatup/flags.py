"""Types for argparse flags: each checks its range when the command line is parsed, so a bad value
ends in one line (:class:`Parser`) before any work (no traceback, nothing written); and
:func:`check_output_folder`, the same promise for an output folder, checked before the model loads."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse for simfeatup's commands: a bad command line ends in ONE line, ``PROG: error: ... (see PROG
    --help)``, exit code 2, without argparse's usage block first (20 lines for segment). Subcommands'
    parsers are of this class too."""

    def __init__(self, *args, help_command: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.help_command = help_command or f"{self.prog} --help"  # how a user asks for the help

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.help_command})\n")


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def probability(text: str) -> float:
    value = finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability: give a value in [0, 1]")
    return value


def _finite_where(text: str, ok, what: str) -> float:
    try:
        value = finite(text)
    except argparse.ArgumentTypeError:
        value = math.nan
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def not_negative(text: str) -> float:
    return _finite_where(text, lambda v: v >= 0, "a finite number >= 0")


def positive(text: str) -> float:
    return _finite_where(text, lambda v: v > 0, "a positive number")


def count(text: str) -> int:
    """A whole number >= 1 (batch sizes, query counts)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: class indices start at 0")
    return value


def either_switch(p: argparse.ArgumentParser, switches: dict[str, str]) -> None:
    """On/off flags of which at most one may be given: {flag: help}."""
    group = p.add_mutually_exclusive_group()
    for flag, text in switches.items():
        group.add_argument(flag, action="store_true", help=text)


def check_output_folder(folder: Path, flag: str, *, staged_beside: bool = False) -> None:
    """Say in one line why ``folder`` cannot hold outputs, before any slow work; leaves nothing behind (a probe
    folder is made in the deepest existing parent and removed at once). ``staged_beside``: the folder is written
    under a temporary name beside it and swapped in whole, so an existing one's parent must take new folders."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder: give a folder (it is created if missing)")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} cannot be created in {existing} (not writable): choose another folder")
    # the permission bits do not show a read-only or pseudo file system (/proc), nor what root may not do there:
    # try it with a hidden folder of a fresh name, removed at once; where the folder is staged beside its final
    # name and replaced whole (the export), its parent is what must take it
    where = folder.parent if staged_beside and folder.exists() else existing
    try:
        probe = tempfile.mkdtemp(prefix=".simfeatup-probe-", dir=where)
    except OSError as err:
        raise ValueError(f"{flag} {folder} cannot be created in {where}: the file system refuses ({err.strerror}); "
                         "choose another folder") from None
    try:
        os.rmdir(probe)
    except OSError:
        pass
