"""Images/s that the shard pipeline decodes + crops with 0, 1, 2 DataLoader workers, in one run.

    python bench/dataloader.py                      # bundled sample shards, 224 crops
    python bench/dataloader.py --workers 0 2 4 --shards 'data/train-{000000..000099}.tar'

Ratios are against the first worker count (the 0-worker, main-process baseline by default).
`loader_throughput` is the reusable measurement (e.g. to compare with training steps/s).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simfeatup.training.data import make_pipeline  # noqa: E402

SAMPLE_SHARDS = str(Path(__file__).resolve().parents[1] / "samples" / "shards" / "train-{000000..000003}.tar")


def loader_throughput(shards: str = SAMPLE_SHARDS, *, num_workers: int = 0, batch_size: int = 16,
                      crop_size: int = 224, batches: int = 40, warmup: int = 4, **pipeline_kw) -> dict:
    """Steady-state images/s of the training pipeline (resampled shards, random crops).

    The first ``warmup`` batches (worker start-up, shuffle-buffer fill) are timed separately
    as ``startup_s``; ``images_per_s`` counts the next ``batches`` batches.
    """
    torch.manual_seed(0)
    pipeline = make_pipeline(shards, train=True, resampled=True, steps_per_epoch=warmup + batches,
                             batch_size=batch_size, crop_size=crop_size, **pipeline_kw)
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers)
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    ready = time.perf_counter()
    images = sum(next(it).shape[0] for _ in range(batches))
    elapsed = time.perf_counter() - ready
    del it
    return {"num_workers": num_workers, "images_per_s": images / elapsed, "startup_s": ready - start,
            "images": images, "seconds": elapsed}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=SAMPLE_SHARDS, help="shard spec (brace pattern, folder, URL)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per setting")
    args = parser.parse_args(argv)

    results = [loader_throughput(args.shards, num_workers=w, batch_size=args.batch_size, crop_size=args.crop_size,
                                 batches=args.batches, warmup=args.warmup) for w in args.workers]
    base = results[0]["images_per_s"]
    print(f"shards: {args.shards}")
    print(f"decode + {args.crop_size}px random crop, batch {args.batch_size}, {args.batches} timed batches, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'workers':>7}  {'images/s':>9}  {'vs ' + str(args.workers[0]) + ' workers':>13}  {'start-up s':>10}")
    for r in results:
        print(
            f"{r['num_workers']:>7}  {r['images_per_s']:>9.1f}  "
            f"{r['images_per_s'] / base:>12.2f}x  {r['startup_s']:>10.2f}"
        )
    return results


if __name__ == "__main__":
    main()
