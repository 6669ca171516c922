"""``python train/fit.py``: train a SimFeatUp upsampler from the command line (`main`).

Torch-free at import, so a missing ``simfeatup[torch]`` install is reported in one line by
`simfeatup.entry.run_command`, as in every entry point. With no ``--config`` the quick-start
recipe ``configs/train/quickstart.yaml`` of the checkout this package lives in is the default
(train/fit.py puts its checkout first on ``sys.path``, so that is the checkout it belongs to).
"""
from __future__ import annotations

import re
from pathlib import Path

from simfeatup.entry import UsageError, run_command, setup_logging

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "train" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) with `SimFeatUpCLI`, train; returns the exit code."""
    setup_logging()
    return run_command("fit", lambda: _fit(argv), needs="training")


def _fit(argv: list[str] | None) -> None:
    import simfeatup.encoder  # noqa: F401 -- torch and open_clip first: a missing extra is named by them
    from simfeatup.backbone import BackboneError
    from simfeatup.training.cli import SimFeatUpCLI

    try:
        SimFeatUpCLI(args=argv, parser_kwargs={"default_config_files": [str(QUICKSTART)]}).fit()
    except BackboneError as err:  # unavailable weights, unreadable model config: its advice names segment's flags
        raise BackboneError(fit_flags(str(err))) from None
    except ValueError as err:  # raised in a DataLoader worker, it arrives wrapped in that worker's traceback
        lines = str(err).strip().splitlines()
        if "Original Traceback" not in str(err):
            raise
        raise UsageError(lines[-1].split(": ", 1)[-1]) from None


# segment's backbone flags (which the shared backbone messages name) -> this command's
_BACKBONE_FLAGS = re.compile(r"(?<![\w.-])--(model|pretrained|attention)(?![\w.-])")


def fit_flags(message: str) -> str:
    """A backbone message with fit's flags: ``--pretrained`` -> ``--model.pretrained`` and so on."""
    translated = _BACKBONE_FLAGS.sub(lambda m: f"--model.{m.group(1)}", message)
    if translated == message:  # it names no flag: say which ones set the backbone here
        translated += (" Here the backbone is --model.model (an open_clip name or a model config .json) "
                       "and --model.pretrained (a tag or a local weights file).")
    return translated
