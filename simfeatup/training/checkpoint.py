"""Checkpoint files that are never half-written under their final name."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from simfeatup.atomic import atomic_write, remove_stale_temporaries


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, fsync, then ``os.replace`` it into place.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp dir; when that is another filesystem (tmpfs /tmp, a cluster's scratch), the
    final "move" is a copy, and a run killed during it leaves a truncated ``last.ckpt`` that
    ``--ckpt_path last`` then fails to load. A rename within one directory cannot be torn.
    Remote URLs (``s3://`` ...) keep Lightning's behaviour. The first save into a folder
    removes the temporaries a killed earlier run left there (never a live run's).
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        folder = Path(path).parent
        if folder not in self._swept:
            remove_stale_temporaries(folder)
            self._swept.add(folder)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
