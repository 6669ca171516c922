"""``ShardDataModule``: the training data of ``train/fit.py`` (``data.*`` keys), over the
WebDataset pipeline of :mod:`simfeatup.training.data`."""
from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from simfeatup.imaging import STRETCHES
from simfeatup.training.data import SkipCounter, expand_urls, make_pipeline

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ DataModule
class ShardDataModule(L.LightningDataModule):
    """Unlabelled images from WebDataset shards as uint8 batches (B, 3, crop_size, crop_size).

    train_shards / val_shards: shard specs (see `expand_urls`); validation uses centre crops.
    resampled: True = endless random shards, ``steps_per_epoch`` batches per rank and epoch;
    False = each sample exactly once per epoch (needs >= world_size * num_workers shards).
    bands / stretch: TIFF band order for R, G, B and the 16-bit -> 8-bit mapping ("percentile",
    "minmax" or the value that maps to 255). Skipped samples: ``skipped``; also logged.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        *,
        batch_size: int = 4,
        num_workers: int = 2,
        crop_size: int = 224,
        resampled: bool = True,
        steps_per_epoch: int = 1000,
        bands: tuple[int, int, int] = (0, 1, 2),
        stretch: str | float = "percentile",
        shuffle_buffer: int = 1000,
        val_batch_size: int | None = None,
        max_consecutive_errors: int = 1000,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("crop_size", crop_size), ("steps_per_epoch", steps_per_epoch)):
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if len(tuple(bands)) != 3:
            raise ValueError(f"bands={bands} must name 3 bands (R, G, B), e.g. [2, 1, 0]")
        if not (isinstance(stretch, str) and stretch in STRETCHES):
            try:
                if float(stretch) <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"stretch={stretch!r}: use one of {STRETCHES} or a positive number") from None
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.crop_size = batch_size, num_workers, crop_size
        self.resampled, self.steps_per_epoch = resampled, steps_per_epoch
        self.bands, self.stretch, self.shuffle_buffer = tuple(bands), stretch, shuffle_buffer
        self.val_batch_size = val_batch_size or batch_size
        self.train_skips = SkipCounter(num_workers, max_consecutive_errors)
        self.val_skips = SkipCounter(num_workers, max_consecutive_errors)
        self._reported = 0

    @property
    def skipped(self) -> int:
        """Samples skipped so far by the train and validation loaders (all workers)."""
        return self.train_skips.skipped + self.val_skips.skipped

    def setup(self, stage: str | None = None) -> None:
        self._train_urls = expand_urls(self.train_shards)
        self._val_urls = expand_urls(self.val_shards) if self.val_shards else []
        world = self.trainer.world_size if self.trainer is not None else 1
        readers = world * max(1, self.num_workers)
        if not self.resampled and len(self._train_urls) < readers:
            raise ValueError(
                f"resampled=False needs at least world_size x num_workers = {world} x "
                f"{max(1, self.num_workers)} shards, got {len(self._train_urls)} in {self.train_shards!r}: "
                "write more shards, lower num_workers, or set resampled=True"
            )

    def _loader(self, pipeline, workers: int) -> DataLoader:
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if not hasattr(self, "_train_urls"):
            self.setup("fit")
        pipeline = make_pipeline(
            self._train_urls, train=True, batch_size=self.batch_size, resampled=self.resampled,
            steps_per_epoch=self.steps_per_epoch, shuffle_buffer=self.shuffle_buffer, counter=self.train_skips,
            **self._pixels(),
        )
        return self._loader(pipeline, self.num_workers)

    def _pixels(self) -> dict:
        """How both pipelines turn samples into crops."""
        return {"crop_size": self.crop_size, "bands": self.bands, "stretch": self.stretch}

    def val_dataloader(self):
        if not hasattr(self, "_train_urls"):
            self.setup("validate")
        if not self._val_urls:
            return []  # Lightning skips validation
        pipeline = make_pipeline(
            self._val_urls, train=False, batch_size=self.val_batch_size, counter=self.val_skips, **self._pixels()
        )
        return self._loader(pipeline, min(self.num_workers, len(self._val_urls)))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        skipped = self.skipped  # cheap: sums a tiny shared tensor
        if skipped > self._reported:
            logger.warning(
                "data: %d samples skipped so far (%d new); the worker logs above say which and why",
                skipped,
                skipped - self._reported,
            )
            self._reported = skipped
        return batch

    def teardown(self, stage: str) -> None:
        if self.skipped:
            logger.warning(
                "data: %d samples were skipped in total (train %d, val %d)",
                self.skipped,
                self.train_skips.skipped,
                self.val_skips.skipped,
            )
