"""How every command-line entry point runs and ends: `simfeatup`, train/fit.py, export/to_onnx.py.

Torch-free, so that a missing optional install is reported by the same code as everything else.
Exit codes, the same everywhere:

- 0: done.
- 2: a problem the user can fix, in one line ``PROG: error: MESSAGE`` on stderr: a bad path,
  flag, file or missing weights (``ValueError`` and ``OSError``: UsageError,
  WeightsUnavailableError, FileNotFoundError, a full disk ...), or an optional install that is
  missing (the pip command that adds it). argparse's own usage errors exit 2 as well.
- 1: the job failed although the input was fine (:class:`Failure`, e.g. exported graphs that
  disagree with torch), one line ``PROG: failed: MESSAGE``; or the reader of stdout went away.

Never a traceback for these; with ``verbose`` it is logged as well. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .allocator import keep_freed_memory
from .extras import missing_extra

USER_ERROR = 2
FAILED = 1

logger = logging.getLogger("simfeatup")


class UsageError(ValueError):
    """A command-line mistake; its message is shown as is (exit code 2)."""


class Failure(RuntimeError):
    """The job could not be done although the input was fine (exit code 1), e.g. a failed export check."""


def setup_logging(verbose: bool = False) -> None:
    """INFO from simfeatup, WARNING from other libraries (their INFO is chatter); DEBUG for all with ``verbose``.

    Records go to stderr through :class:`TqdmHandler`, so a message never lands on the line of a
    progress bar. A process whose logging is already configured (root handlers present) keeps its
    handlers. Lightning keeps its own INFO level and the handler it adds to the "lightning" logger
    on import; it is kept from passing its records on to ours too, which would print each twice.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logging.getLogger("lightning").propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


class TqdmHandler(logging.Handler):
    """Log records to stderr on lines of their own: active tqdm bars are cleared, then redrawn below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.format(record))
        except Exception:  # noqa: BLE001 -- logging's contract: a failing handler reports, never raises
            self.handleError(record)


def _write_line(text: str) -> None:
    """One line on stderr (looked up now: it may be redirected), never glued onto a progress bar."""
    from tqdm import tqdm  # a base dependency; imported late so that importing entry stays light

    tqdm.write(text, file=sys.stderr)


def run_command(prog: str, body: Callable[[], int | None], *, needs: str, verbose: bool = False) -> int:
    """Run an entry point's ``body`` and return its exit code (None counts as 0), errors as above.

    prog: what starts the error line (``"simfeatup segment"``, ``"fit"``, ``"to_onnx"``).
    needs: what needs a missing optional package, for its line: ``"<needs> needs torch, which
    is not installed: pip install ..."``. Import the optional packages inside ``body``.
    """
    keep_freed_memory()
    try:
        code = body()
    except BrokenPipeError:  # `simfeatup presets | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED
    except ModuleNotFoundError as err:
        message = missing_extra(err, needs)
        if message is None:  # a broken install, not a missing extra: the traceback is the report
            raise
        return _report(prog, "error", message, USER_ERROR, verbose)
    except Failure as err:
        return _report(prog, "failed", err, FAILED, verbose)
    except (ValueError, OSError) as err:  # OSError: unwritable or missing paths, full disks
        return _report(prog, "error", err, USER_ERROR, verbose)
    return 0 if code is None else code


def _report(prog: str, kind: str, message, code: int, verbose: bool) -> int:
    if verbose:
        logger.exception("%s: %s", prog, kind)
    text = " ".join(str(message).split())  # one line, whatever the message holds
    _write_line(f"{prog}: {kind}: {text}")
    return code
