"""Training steps/s of a recipe (default: the tiny one) against what the shard loader delivers, in one run.

    python bench/train_steps.py                                  # tiny recipe, loader with 0 and 1 workers
    python bench/train_steps.py --config configs/train/quickstart.yaml --steps 2 --workers 1

The loader must feed at least 4x the images one training step consumes, so data never waits.
`train_step_rate` is the reusable measurement (bench/dataloader.py can import it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.dataloader import SAMPLE_SHARDS, loader_throughput  # noqa: E402
from simfeatup.training.module import SimFeatUpModule  # noqa: E402

TINY = ROOT / "configs" / "train" / "tiny.yaml"
HEADROOM = 4.0  # the loader must deliver at least this many times what training consumes


class _Crops(Dataset):
    """Fixed random uint8 batches: the step is timed without any data loading in it."""

    def __init__(self, n: int, batch_size: int, crop_size: int):
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, 256, (batch_size, 3, crop_size, crop_size), dtype=torch.uint8, generator=g)
                        for _ in range(n)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class _Clock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def train_step_rate(config: str | Path = TINY, *, steps: int = 4, warmup: int = 1) -> dict:
    """Steady-state optimizer steps/s of ``config``'s model and batch shape on this machine (CPU)."""
    cfg = yaml.safe_load(Path(config).read_text())
    batch_size, crop_size = cfg["data"]["batch_size"], cfg["data"].get("crop_size", 224)
    torch.manual_seed(0)
    module = SimFeatUpModule(**{**cfg.get("model", {}), "preview_every_n_steps": 0})
    clock = _Clock(warmup)
    loader = DataLoader(_Crops(warmup + steps, batch_size, crop_size), batch_size=None)
    with tempfile.TemporaryDirectory() as run_dir:  # the module writes its artefact at fit end
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[clock], default_root_dir=run_dir)
        trainer.fit(module, loader)
    seconds = clock.end - clock.start
    return {"config": str(config), "batch_size": batch_size, "crop_size": crop_size, "steps": steps,
            "seconds": seconds, "steps_per_s": steps / seconds, "images_per_s": steps * batch_size / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(TINY), help="training recipe YAML (model and data sections)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps")
    parser.add_argument("--shards", default=SAMPLE_SHARDS, help="shard spec for the loader measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="loader worker counts")
    args = parser.parse_args(argv)

    train = train_step_rate(args.config, steps=args.steps)
    loads = [loader_throughput(args.shards, num_workers=w, batch_size=train["batch_size"], crop_size=train["crop_size"],
                               batches=20, warmup=2) for w in args.workers]
    print(f"recipe: {args.config} (batch {train['batch_size']}, {train['crop_size']} px crops), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"training: {train['steps_per_s']:.3f} steps/s = {train['images_per_s']:.2f} images/s consumed "
          f"({train['steps']} steps in {train['seconds']:.1f} s)")
    print(f"{'workers':>7}  {'loader images/s':>15}  {'vs training':>11}")
    for r in loads:
        ratio = r["images_per_s"] / train["images_per_s"]
        verdict = "ok" if ratio >= HEADROOM else f"TOO SLOW (< {HEADROOM:g}x)"
        print(f"{r['num_workers']:>7}  {r['images_per_s']:>15.1f}  {ratio:>10.1f}x  {verdict}")
    return {"train": train, "loader": loads}


if __name__ == "__main__":
    main()
