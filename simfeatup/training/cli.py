"""LightningCLI for SimFeatUp training: ``SimFeatUpModule`` + ``ShardDataModule``, fit only.

Config keys (YAML or ``--key value``): ``model.*`` (SimFeatUpModule), ``data.*``
(ShardDataModule), ``trainer.*`` (lightning.Trainer), ``checkpoint.*`` (ModelCheckpoint,
always on, saving ``last.ckpt``), ``ckpt_path`` ("last" resumes) and ``seed_everything``.
Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` so that ``--ckpt_path last``
finds them again in a new process; the upsampler artefact goes to ``default_root_dir``.
Relative local shard paths written in a recipe file are relative to that file (the bundled
recipes name the bundled samples so, from any working directory); on the command line, to the
current directory.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from simfeatup.training.checkpoint import newest_checkpoint, warn_if_epochs_cap_steps
from simfeatup.training.data import expand_urls
from simfeatup.training.datamodule import ShardDataModule
from simfeatup.training.module import ARTEFACT_NAME, SimFeatUpModule

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
SHARD_KEYS = ("train_shards", "val_shards")  # the data.* keys that hold shard specs


# Lightning's rank-zero messages come from one of these (whichever of lightning.pytorch and
# lightning.fabric was imported last names the logger).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)  # "Tip: ... try installing [litlogger] ...", on every Trainer


@contextmanager
def expected_warnings() -> Iterator[None]:
    """Silence, while a run lasts, what every SimFeatUp run makes Lightning say and no user can act on.

    Only inside the block: importing simfeatup never changes the process's warning filters or loggers.
    """
    with warnings.catch_warnings():
        # With manual optimisation ModelCheckpoint warns that a step checkpoint holds the weights
        # AFTER that step's update: exactly what resuming needs (global_step counts the updates).
        warnings.filterwarnings(
            "ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning
        )
        # The frozen backbone is in eval mode on purpose (SimFeatUpModule.train keeps it there).
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
        # The resampled training stream's length is exact whatever num_workers: steps_per_epoch
        # batches per rank, shared among its workers (simfeatup.training.data, stage 6).
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)
        # Lightning's own pytree helper calls an API this torch deprecates: nothing to change on our side.
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        loggers = [logging.getLogger(name) for name in _RANK_ZERO_LOGGERS]
        for log in loggers:
            log.addFilter(_not_an_advert)
        try:
            yield
        finally:
            for log in loggers:
                log.removeFilter(_not_an_advert)


def checkpoint_dir(default_root_dir: str | None) -> str:
    """Where a run's checkpoints live: fixed per run directory, never per logger version."""
    return os.path.join(default_root_dir or os.getcwd(), CHECKPOINT_SUBDIR)


class Trainer(pl.Trainer):
    """lightning's Trainer with its batch limits typed int-first for the parser.

    lightning annotates them ``float | int | None``, so the parser turned ``limit_val_batches: 1``
    (one batch) into 1.0 (every batch). Whole numbers stay batch counts, fractions shares.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs,
    ):
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )


class SimFeatUpCLI(LightningCLI):
    """Parse and instantiate; ``.fit()`` then trains (``run=False``: no subcommands to type)."""

    def __init__(self, args=None, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites config.yaml
        trainer_defaults = {
            "plugins": [{"class_path": "simfeatup.training.checkpoint.AtomicCheckpointIO"}],
            **kwargs.pop("trainer_defaults", {}),
        }
        kwargs.setdefault("trainer_class", Trainer)
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

    def before_instantiate_classes(self) -> None:
        """Shard paths resolved and checked before anything is built or any run folder is made."""
        data = self.config["data"]
        for key, value in recipe_relative_shards(self.config, data).items():
            data[key] = value
        for key in SHARD_KEYS:
            if data.get(key):
                expand_urls(data[key])  # ValueError naming the missing path and the current directory
        check_cpu_precision(self.config["trainer"])

    def fit(self) -> None:
        ckpt_path = self.config.ckpt_path
        if ckpt_path == "last":  # Lightning's "last" is the newest last*.ckpt, even when a step checkpoint is newer
            ckpt_path = newest_checkpoint(self.trainer.checkpoint_callback.dirpath)
        warn_if_epochs_cap_steps(self.trainer, self.datamodule)
        with expected_warnings():
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        if self.trainer.is_global_zero:
            log_results(self.trainer, self.model)


def check_cpu_precision(trainer) -> None:
    """A bf16 recipe (simfeatup_vitb16.yaml's bf16-mixed) on a machine that will train on its CPU:
    refused in one line where PyTorch would emulate bf16 (no bf16 units, no AVX-512: many times
    slower than 32-true), warned where it is emulated by oneDNN (docs/method.md section 8)."""
    from simfeatup.entry import UsageError
    from simfeatup.hardware import cpu_dtype_advice

    precision, accelerator = str(trainer.get("precision")), str(trainer.get("accelerator") or "auto")
    if not precision.startswith("bf16"):
        return
    if accelerator == "auto":
        import torch

        if torch.cuda.is_available() or torch.backends.mps.is_available():
            return
    elif accelerator != "cpu":
        return
    advice = cpu_dtype_advice("bfloat16", fix="train with --trainer.precision 32-true")
    if advice is None:
        return
    if advice[0] == "error":
        raise UsageError(f"--trainer.precision {precision} on this CPU: {advice[1]}")
    logger.warning("--trainer.precision %s on this CPU: %s", precision, advice[1])


def recipe_relative_shards(config, data) -> dict[str, str]:
    """The data.* shard specs that came from a recipe file, made absolute against that file's folder.

    The recipes are the default config file and every ``--config`` file, read in the order the
    parser applied them; a value is the recipe's when the last file that sets it has this very
    value (a command-line value that overrides it is left as given). URLs, ``pipe:`` and absolute
    paths are left alone; ``::``-joined lists are resolved part by part.
    """
    files = [config.get("__default_config__"), *(config.get("config") or [])]
    files = [f for item in files for f in (item if isinstance(item, list) else [item]) if f is not None]
    source: dict[str, tuple[str, Path]] = {}
    for file in files:
        path = Path(str(getattr(file, "absolute", file)))
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key in SHARD_KEYS:
            value = (recipe.get("data") or {}).get(key)
            if isinstance(value, str):
                source[key] = (value, path.parent)
    resolved = {}
    for key, (value, folder) in source.items():
        if data.get(key) == value:
            resolved[key] = "::".join(_beside(part.strip(), folder) for part in value.split("::"))
    return resolved


def _beside(spec: str, folder: Path) -> str:
    local = spec.removeprefix("file:")
    if "://" in spec or spec.startswith("pipe:") or os.path.isabs(os.path.expanduser(local)):
        return spec
    return os.path.normpath(folder / local)


def log_results(trainer: pl.Trainer, module: SimFeatUpModule) -> None:
    """Where a finished run left its results, and how to look at its previews."""
    root = Path(module.hparams.artefact_dir or trainer.default_root_dir)
    logger.info("upsampler: %s (give it to simfeatup segment --upsampler)", root / ARTEFACT_NAME)
    checkpoints = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
    if checkpoints:
        logger.info("checkpoints: %s (resume: the same command plus --ckpt_path last)", checkpoints)
    previews = module.preview_dir()
    if previews.is_dir():
        logger.info("previews (image | low-res | upsampled | bilinear features): %s", previews)
    board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if board is not None:
        logger.info("losses and previews: tensorboard --logdir %s", board.root_dir)
