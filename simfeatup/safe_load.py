"""Reading torch.save files (checkpoints, .pt/.bin state dicts) safely: the one home for torch.load.

Every such file simfeatup reads goes through :func:`load`, i.e. ``torch.load(weights_only=True)``:
tensors, containers and plain Python values only, never code. Whatever goes wrong ends in one
:class:`TorchFileError` line naming the file, what is wrong with it and the caller's fix. A
file that holds pickle globals (a class, a function: code that loading would run) is refused
and called so; we never suggest loading it with ``weights_only=False``.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

CODE = "refused: this file contains code (pickle globals{}), not only tensors"
RESAVE = "if you trust its source, re-save its state_dict (tensors only) and use that file"
_GLOBAL = re.compile(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # torch.save's zip format; a pickle's PROTO opcode (legacy torch.save)


class TorchFileError(ValueError):
    """A torch.save file that cannot be used: missing, damaged, of another format, or holding code."""


@contextmanager
def quiet() -> Iterator[None]:
    """Without torch's warning about a pickle protocol it does not expect (it precedes our own line)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def load(path, *, fix: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure is one TorchFileError line ending in ``fix``.

    fix: what the user should do when the file cannot be used (e.g. "pass another checkpoint").
    """
    try:
        with quiet():
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, TypeError,
            AttributeError, ImportError, IndexError, MemoryError) as err:
        raise TorchFileError(f"{path}: {explain(path, err, fix)}") from None


def explain(path, err: BaseException, fix: str) -> str:
    """What is wrong with the torch.save file ``path`` that failed to load with ``err``, then the fix.

    The fix is ``fix`` (none when empty); for a file holding code it first says to re-save its tensors alone.
    """
    path, fix = Path(path), f"; {fix}" if fix else ""
    if isinstance(err, FileNotFoundError) or not path.exists():
        return f"no such file{fix}"
    if path.is_dir():
        return f"a folder, not a file{fix}"
    if isinstance(err, OSError):
        return f"cannot be read ({_first_line(err)}){fix}"
    code = _code_in(path, err)
    head = _head(path)
    if code is not None and not _torch_name_cut_short(code):
        return CODE.format(f", e.g. {code}" if code else "") + f"; {RESAVE}" + fix.replace(";", ", or", 1)
    if code is not None:  # a truncated legacy file ends inside the name of one of torch's own globals
        what = f"damaged or truncated (it ends inside the name {code})"
    elif not head:
        what = "an empty file (a write that never finished?)"
    elif head.startswith(_ZIP):
        what = f"damaged or truncated ({_first_line(err)})"
    elif head.startswith(_PICKLE) and isinstance(err, EOFError):
        what = "damaged or truncated (it ends too early)"
    elif head.startswith(_PICKLE):
        what = "a Python pickle that torch.save did not write, not a PyTorch checkpoint"
    else:
        what = "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
    return what + fix


def _code_in(path: Path, err: BaseException) -> str | None:
    """The first pickle global the file holds ("" when unnamed), None when the failure is not about code."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    found = _GLOBAL.search(str(err))
    if found:  # torch's weights-only unpickler met a global ("Unsupported global" / "unsupported GLOBAL")
        return found.group(1)
    if not _head(path).startswith(_PICKLE):
        return None
    if "unsupported operand" not in str(err).lower():
        return None
    return _raw_pickle_global(path)  # a plain pickle torch could not parse: list its globals without running it


def _torch_name_cut_short(name: str) -> bool:
    """Whether ``name`` looks like one of torch's own globals but names nothing (nothing is imported)."""
    if not name.startswith("torch."):
        return False
    obj = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return True
    return False


def _raw_pickle_global(path: Path) -> str | None:
    """The first global a plain pickle file imports, read by opcode (nothing is executed); None if none."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL" or op.name == "INST":
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:]) if len(strings) >= 2 else ""
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 -- a truncated or garbled stream: nothing more to tell
        return None
    return None


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _first_line(err: BaseException) -> str:
    """The first sentence of torch's message (the rest is advice about how the file may have broken)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")
    return text if len(text) <= 120 else text[:117] + "..."
