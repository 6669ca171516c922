"""Training checkpoints: never half-written under their final name, loaded with weights_only=True,
and resumed from the newest complete one."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from simfeatup import safe_load
from simfeatup.atomic import atomic_write, sweep_once

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".ckpt"
RESUME_FIX = "pass another checkpoint with --ckpt_path, or delete this one (--ckpt_path last then takes the one before)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, fsync, then ``os.replace`` it into place; load safely.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp dir; when that is another filesystem (tmpfs /tmp, a cluster's scratch), the
    final "move" is a copy, and a run killed during it leaves a truncated ``last.ckpt`` that
    ``--ckpt_path last`` then fails to load. A rename within one directory cannot be torn.
    The first save into a folder removes the temporaries a killed earlier run left there
    (never a live run's).

    Loading is always ``torch.load(weights_only=True)`` (`simfeatup.safe_load`), whatever
    Lightning asks for: a checkpoint holding code is refused, a damaged one named, in one line.
    Lightning's own contents (hyper-parameters, loop, optimizer and callback state) are plain
    values and tensors, so no global needs allowing. Remote URLs (``s3://`` ...) keep
    Lightning's I/O, with weights_only=True.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        checkpoint = safe_load.load(path, map_location=map_location, fix=RESUME_FIX)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise safe_load.TorchFileError(f"{path}: not a Lightning checkpoint (no state_dict); {RESUME_FIX}")
        return checkpoint


def newest_checkpoint(folder) -> Path | None:
    """The complete checkpoint of ``folder`` with the most training steps (``--ckpt_path last``).

    ``last.ckpt`` and the step checkpoints alike: a run killed between writing a step checkpoint
    and ``last.ckpt`` resumes from the newer one. Damaged files are skipped with a warning naming
    them; a folder holding only damaged checkpoints is an error (one line: the files and the fix).
    None when there is no checkpoint yet (a first run with ``--ckpt_path last`` starts at step 0).
    Temporaries a killed run left are removed first.
    """
    folder = Path(folder)
    sweep_once(folder)
    found, damaged = [], []
    for path in sorted(folder.glob(f"*{CHECKPOINT_SUFFIX}")) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            checkpoint = safe_load.load(path, fix="")
            step = int(checkpoint["global_step"])
        except (safe_load.TorchFileError, KeyError, TypeError, ValueError) as err:
            damaged.append(str(err) if isinstance(err, safe_load.TorchFileError) else f"{path}: no global_step")
            continue
        found.append((step, path.stat().st_mtime, path))
    if not found and damaged:
        raise safe_load.TorchFileError(
            f"no complete checkpoint in {folder} to resume from ({'; '.join(damaged)}); delete the damaged files "
            "to start the run afresh, or pass another checkpoint with --ckpt_path"
        )
    if damaged:
        logger.warning("resume: skipped damaged checkpoints %s", "; ".join(damaged))
    if not found:
        logger.warning("resume: no checkpoint in %s yet; training starts at step 0", folder)
        return None
    step, _, path = max(found, key=lambda item: (item[0], item[1]))
    logger.info("resuming from %s (step %d)", path, step)
    return path


def warn_if_epochs_cap_steps(trainer, datamodule) -> None:
    """Say so when ``max_epochs`` would stop a resampled run before its ``max_steps``.

    Lightning stops at whichever limit comes first; a recipe capping epochs silently ignores a
    larger ``--trainer.max_steps``. Resampled epochs are ``steps_per_epoch`` batches, so it is known here.
    """
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    per_epoch = getattr(datamodule, "steps_per_epoch", None) if getattr(datamodule, "resampled", False) else None
    if max_steps is None or max_steps < 0 or max_epochs is None or max_epochs < 0 or not per_epoch:
        return
    if max_epochs * per_epoch < max_steps:
        logger.warning(
            "max_steps=%d will not be reached: max_epochs=%d x steps_per_epoch=%d stops at step %d; "
            "add --trainer.max_epochs -1 to stop at max_steps", max_steps, max_epochs, per_epoch, max_epochs * per_epoch
        )
