"""``python train/fit.py``: train a SimFeatUp upsampler from the command line (`main`).

``--help`` prints :data:`SUMMARY`, the options users change, at once and without importing
torch or Lightning; ``--help-all`` prints LightningCLI's full list (every Trainer and
callback argument, ~700 lines, seconds to build).

Torch-free at import, so a missing ``simfeatup[torch]`` install is reported in one line by
`simfeatup.entry.run_command`, as in every entry point. With no ``--config`` the quick-start
recipe ``configs/train/quickstart.yaml`` of the checkout this package lives in is the default
(train/fit.py puts its checkout first on ``sys.path``, so that is the checkout it belongs to).
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

from simfeatup.entry import UsageError, run_command, setup_logging

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "train" / "quickstart.yaml"

HELP_FLAGS = ("-h", "--help")
FULL_HELP_FLAG = "--help-all"  # LightningCLI's own --help: every option
VERBOSE_FLAGS = ("-v", "--verbose")

SUMMARY = """\
usage: python train/fit.py [--config RECIPE.yaml] [--section.key VALUE ...]

Train a SimFeatUp upsampler for a frozen CLIP backbone on unlabelled imagery (WebDataset
shards). Without --config: the quick start (configs/train/quickstart.yaml: the bundled
samples, ViT-B/16 OpenAI weights, 20 steps on a CPU). Options override the recipe; the
recipe's own values are in the YAML file.

the options most runs change:
  --config RECIPE.yaml          a recipe: configs/train/quickstart.yaml, simfeatup_vitb16.yaml
                                (the paper's run), tiny.yaml (offline demo, random CLIP)
  --data.train_shards SPEC      training shards: 'shards/train-{000000..000099}.tar', a folder
                                of .tar, URLs; several joined with '::' (simfeatup make-shards)
  --data.val_shards SPEC        validation shards (a few hundred images are enough)
  --model.model NAME            open_clip model name, e.g. ViT-B-16, ViT-L-14
  --model.pretrained TAG|FILE   open_clip weights tag (openai) or a local weights file
  --model.clip_config JSON      a model config instead of --model.model (a custom CLIP)
  --trainer.accelerator A       auto (cuda if present), cpu, gpu
  --trainer.devices N           devices per node: 1, 2, auto
  --trainer.precision P         32-true (CPU), bf16-mixed, 16-mixed (GPUs without bf16)
  --trainer.max_steps N         stop after N optimiser steps; quickstart and simfeatup_vitb16
                                also stop after one epoch: add --trainer.max_epochs -1
  --data.steps_per_epoch N      batches per epoch (an epoch = N batches of fresh crops)
  --data.batch_size N           crops per device and step
  --data.num_workers N          DataLoader processes decoding the shards
  --trainer.default_root_dir D  output folder: D/upsampler.safetensors (for simfeatup segment
                                --upsampler), D/checkpoints, D/lightning_logs (TensorBoard)
  --ckpt_path last              resume the run in default_root_dir from its newest checkpoint
  --help-all                    every option (all of Lightning's Trainer and callbacks)
  --print_config                the resolved recipe as YAML, without training
  -v, --verbose                 debug logging: the resolved backbone and weights file, timings

examples:
  python train/fit.py                                            # quick start
  python train/fit.py --config configs/train/tiny.yaml           # offline demo (meaningless results)
  python train/fit.py --config configs/train/simfeatup_vitb16.yaml \\
      --data.train_shards 'shards/train-{000000..000099}.tar' --data.val_shards shards/val-000000.tar
  python train/fit.py --model.pretrained /path/to/ViT-B-16.bin   # local weights, no download
  python train/fit.py --config configs/train/simfeatup_vitb16.yaml --ckpt_path last   # resume
  python train/fit.py --trainer.max_steps 200 --trainer.max_epochs -1 --trainer.default_root_dir runs/longer
"""


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) with `SimFeatUpCLI`, train; returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(arg in HELP_FLAGS for arg in args):  # before any heavy import: the summary in an instant
        sys.stdout.write(SUMMARY)
        return 0
    args = ["--help" if arg == FULL_HELP_FLAG else arg for arg in args]
    verbose = any(arg in VERBOSE_FLAGS for arg in args)  # ours, not a LightningCLI option
    args = [arg for arg in args if arg not in VERBOSE_FLAGS]
    setup_logging(verbose)
    return run_command("fit", lambda: _fit(args), needs="training", verbose=verbose)


def _fit(argv: list[str] | None) -> None:
    import simfeatup.encoder  # noqa: F401 -- torch and open_clip first: a missing extra is named by them
    # isort: split
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from simfeatup.backbone import BackboneError
    from simfeatup.training.cli import SimFeatUpCLI, expected_warnings

    try:
        with expected_warnings(), warnings.catch_warnings():  # the Trainer is built here, and talks
            # argv is sys.argv[1:] (with --help-all spelled --help) or a test's: never a mix-up of the two
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            try:
                cli = SimFeatUpCLI(args=argv, parser_kwargs={"default_config_files": [str(QUICKSTART)],
                                                             "exit_on_error": False})
            except MisconfigurationException as err:  # Trainer settings this machine cannot run
                raise UsageError(_trainer_settings(err)) from None
        cli.fit()
    except BackboneError as err:  # unavailable weights, unreadable model config: its advice names segment's flags
        raise BackboneError(fit_flags(str(err))) from None
    except argparse.ArgumentError as err:  # jsonargparse's, one line (run_command joins it) instead of its usage block
        raise UsageError(f"{err} (see python train/fit.py --help, or --help-all for every option)") from None
    except ValueError as err:  # raised in a DataLoader worker, it arrives wrapped in that worker's traceback
        lines = str(err).strip().splitlines()
        if "Original Traceback" not in str(err):
            raise
        raise UsageError(lines[-1].split(": ", 1)[-1]) from None


def _trainer_settings(err: Exception) -> str:
    """Lightning's refusal of the Trainer settings, and the fix when no GPU is there (run_command: one line)."""
    import torch

    message = str(err)
    if not torch.cuda.is_available() and any(word in message.lower() for word in ("gpu", "cuda", "accelerator")):
        message += " (on a machine without a GPU: --trainer.accelerator cpu, or auto)"
    return f"the --trainer settings cannot run here: {message}"


# segment's backbone flags (which the shared backbone messages name) -> this command's
_BACKBONE_FLAGS = re.compile(r"(?<![\w.-])--(model|pretrained|attention)(?![\w.-])")


def fit_flags(message: str) -> str:
    """A backbone message with fit's flags: ``--pretrained`` -> ``--model.pretrained`` and so on."""
    translated = _BACKBONE_FLAGS.sub(lambda m: f"--model.{m.group(1)}", message)
    if translated == message:  # it names no flag: say which ones set the backbone here
        translated += (" Here the backbone is --model.model (an open_clip name or a model config .json) "
                       "and --model.pretrained (a tag or a local weights file).")
    return translated
