"""LightningCLI for SimFeatUp training: ``SimFeatUpModule`` + ``ShardDataModule``, fit only.

Config keys (YAML or ``--key value``): ``model.*`` (SimFeatUpModule), ``data.*``
(ShardDataModule), ``trainer.*`` (lightning.Trainer), ``checkpoint.*`` (ModelCheckpoint,
always on, saving ``last.ckpt``), ``ckpt_path`` ("last" resumes) and ``seed_everything``.
Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` so that ``--ckpt_path last``
finds them again in a new process; the upsampler artefact goes to ``default_root_dir``.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from simfeatup.training.checkpoint import newest_checkpoint, warn_if_epochs_cap_steps
from simfeatup.training.datamodule import ShardDataModule
from simfeatup.training.module import SimFeatUpModule

CHECKPOINT_SUBDIR = "checkpoints"


@contextmanager
def expected_warnings() -> Iterator[None]:
    """Silence, while a run lasts, the two warnings every SimFeatUp run triggers by design.

    Only inside the block: importing simfeatup never changes the process's warning filters.
    """
    with warnings.catch_warnings():
        # With manual optimisation ModelCheckpoint warns that a step checkpoint holds the weights
        # AFTER that step's update: exactly what resuming needs (global_step counts the updates).
        warnings.filterwarnings(
            "ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning
        )
        # The frozen backbone is in eval mode on purpose (SimFeatUpModule.train keeps it there).
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
        yield


def checkpoint_dir(default_root_dir: str | None) -> str:
    """Where a run's checkpoints live: fixed per run directory, never per logger version."""
    return os.path.join(default_root_dir or os.getcwd(), CHECKPOINT_SUBDIR)


class SimFeatUpCLI(LightningCLI):
    """Parse and instantiate; ``.fit()`` then trains (``run=False``: no subcommands to type)."""

    def __init__(self, args=None, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites config.yaml
        trainer_defaults = {
            "plugins": [{"class_path": "simfeatup.training.checkpoint.AtomicCheckpointIO"}],
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(
            SimFeatUpModule,
            ShardDataModule,
            args=args,
            run=False,
            trainer_defaults=trainer_defaults,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help='checkpoint to resume from; "last" = the newest complete checkpoint of this run directory',
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)

    def fit(self) -> None:
        ckpt_path = self.config.ckpt_path
        if ckpt_path == "last":  # Lightning's "last" is the newest last*.ckpt, even when a step checkpoint is newer
            ckpt_path = newest_checkpoint(self.trainer.checkpoint_callback.dirpath)
        warn_if_epochs_cap_steps(self.trainer, self.datamodule)
        with expected_warnings():
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
