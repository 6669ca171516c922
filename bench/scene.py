"""Scene mode (SPEC 9) as the scene grows: peak RSS and time per megapixel, onnxruntime backend, in one run.

    python bench/scene.py                                  # 2048^2, 4096^2, 8192^2 GeoTIFFs
    python bench/scene.py --sizes 1024 2048                # a quick run
    python bench/scene.py --scale 0.5 --block 896          # resampled scenes, smaller blocks

The scenes are real aerial texture at realistic sizes: the bundled samples (SpaceNet 6 Rotterdam
and NEON Yellowstone) cut into a 1200 x 1200 mosaic, mirrored across every edge to fill the
scene (no seam jumps), written as tiled, DEFLATE-compressed GeoTIFFs in UTM 16N at 0.5 m into a
temporary folder. The model is a random CLIP exported to ONNX (nothing is downloaded; speed does
not depend on the weights), ViT-B/16's patch, window and token grid throughout:

- ``tiny`` (default): the tests' 2-block, width-64 CLIP without the upsampler (bilinear). Its
  windows cost milliseconds, so 8192^2 (about 6,000 window evaluations) runs in minutes on 2
  cores, and the scene machinery itself (reads, window averaging, scoring, the COG), where a
  cost growing with the scene would show, is most of the time measured.
- ``small``: a 4-block, width-256 CLIP plus SimFeatUp (seconds per window on 2 shared cores);
  ``vit-b-16``: the full architecture plus SimFeatUp. Both take hours at 8192^2 on 2 cores.

Each size runs in a fresh process (read, segment and write the label COG, as ``simfeatup
segment --scene`` does, timed after the model is loaded and the queries encoded). Peak RSS is the
process's own high-water mark (VmHWM). Both are printed with their ratio to the first (smallest)
size of this run: scene mode promises memory that does not grow with the scene and time that
grows with its pixels only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SAMPLES = (ROOT / "samples" / "spacenet6_rotterdam.jpg", ROOT / "samples" / "neon_yellowstone.jpg")
MOSAIC = 1200  # side of the texture tile mirrored over the scene
PIXEL = 0.5  # metres
ORIGIN = (733601.0, 3725139.0)  # UTM 16N (Atlanta), as the bundled GeoTIFF
CRS = "EPSG:32616"
WRITE_ROWS = 512

# CLIPs with ViT-B/16's patch, window and token grid at a fraction of its width and depth.
TINY_CLIP = {  # as tests/conftest.py
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SMALL_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1},
}


def mosaic():
    """(MOSAIC, MOSAIC, 3) uint8: the two sample images, each mirrored, as one texture tile."""
    import numpy as np

    from simfeatup import imaging

    half = MOSAIC // 2
    rotterdam, yellowstone = (imaging.load_image(p) for p in SAMPLES)
    a = rotterdam[:half, :half]
    b = yellowstone[200 : 200 + half, 300 : 300 + half]
    top = np.concatenate([a, b], axis=1)
    return np.concatenate([top, np.concatenate([b[::-1], a[:, ::-1]], axis=1)], axis=0)


def _mirrored(n: int, period: int):
    """Indices 0..n-1 folded into 0..period-1, mirrored at every edge (..., 1, 0, 0, 1, ...)."""
    import numpy as np

    k = np.arange(n) % (2 * period)
    return np.where(k < period, k, 2 * period - 1 - k)


def write_scene(path: Path, size: int) -> None:
    """A size x size RGB GeoTIFF of the mirrored mosaic, written strip by strip."""
    import rasterio
    from rasterio.transform import Affine

    tile = mosaic()
    index = _mirrored(size, MOSAIC)
    profile = {
        "driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8", "crs": CRS,
        "transform": Affine(PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1]), "tiled": True,
        "blockxsize": 512, "blockysize": 512, "compress": "deflate", "zlevel": 1, "photometric": "rgb",
        "bigtiff": "if_safer",
    }
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, WRITE_ROWS):
            rows = index[y0 : y0 + WRITE_ROWS]
            strip = tile[rows][:, index]  # (h, size, 3)
            ds.write(strip.transpose(2, 0, 1), window=rasterio.windows.Window(0, y0, size, len(rows)))


def export_model(out: Path, model: str) -> Path:
    """A random CLIP (+ random SimFeatUp but for ``tiny``) exported and verified as an ONNX model folder."""
    import torch

    from simfeatup.encoder import DenseCLIP
    from simfeatup.export import export_onnx
    from simfeatup.segmenter import Segmenter
    from simfeatup.upsampler import SimFeatUp

    torch.manual_seed(0)
    if model == "vit-b-16":
        from bench.e2e import build_torch

        segmenter = build_torch()
    elif model == "small":
        encoder = DenseCLIP.from_config(SMALL_CLIP)
        segmenter = Segmenter(encoder, SimFeatUp(encoder.embed_dim, encoder.patch_size), cache=False).eval()
    else:
        segmenter = Segmenter(DenseCLIP.from_config(TINY_CLIP), None, cache=False).eval()
    return export_onnx(out, segmenter=segmenter)


def _peak_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(scene_path: str, model_dir: str, out: str, block: int, window_batch: int, scale: float) -> dict:
    """One scene in this (fresh) process: what ``simfeatup segment --scene`` does, timed after setup."""
    from simfeatup import geo, scene
    from simfeatup.resample import ResampledScene, scaled_size
    from simfeatup.runtime import OnnxSegmenter
    from simfeatup.scores import Scoring
    from simfeatup.vocabulary import Vocabulary

    segmenter = OnnxSegmenter(model_dir, window_batch=window_batch, cache=False)
    vocabulary = Vocabulary.from_preset("openearthmap")
    text = segmenter.encode_queries(vocabulary.queries)
    loaded = _peak_kib()
    started = time.perf_counter()
    with geo.gdal_cache(), geo.RasterScene(scene_path) as raster:
        size = scaled_size(raster.height, raster.width, scale, scale)
        reader = raster if scale == 1 else ResampledScene(raster, *size)
        classes = [",".join(c) for c in vocabulary.classes]
        with geo.LabelRaster(out, height=reader.height, width=reader.width, crs=reader.crs,
                             transform=reader.transform, classes=classes, block=block) as labels:
            for b in scene.segment_scene(segmenter, reader, vocabulary, Scoring(prob_thd=0.1), text=text, block=block):
                labels.write(b.y0, b.y1, b.x0, b.x1, b.labels)
            segmented = _peak_kib()  # before the COG is assembled (overviews, copy) on leaving the block
    seconds = time.perf_counter() - started
    return {"pixels": reader.height * reader.width, "seconds": seconds, "loaded_kib": loaded,
            "segmented_kib": segmented, "peak_kib": _peak_kib(), "queries": len(vocabulary.queries)}


def run_size(size: int, work: Path, model_dir: Path, args) -> dict:
    scene_path = work / f"scene_{size}.tif"
    started = time.perf_counter()
    write_scene(scene_path, size)
    built = time.perf_counter() - started
    argv = [sys.executable, __file__, "--child", str(scene_path), str(model_dir), str(work / f"labels_{size}.tif"),
            str(args.block), str(args.window_batch), str(args.scale)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    scene_path.unlink()
    if done.returncode:
        raise RuntimeError(f"{size}^2 scene failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(size=size, build_seconds=built)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, model_dir, out, block, batch, scale = sys.argv[2:8]
        print(json.dumps(child(path, model_dir, out, int(block), int(batch), float(scale))))
        return []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="scene sides in pixels")
    parser.add_argument("--block", type=int, default=1792, help="scene mode's --block (a multiple of 112)")
    parser.add_argument("--window-batch", type=int, default=1, help="windows per onnxruntime call")
    parser.add_argument("--scale", type=float, default=1.0, help="resample the scenes by this first (--scale)")
    parser.add_argument("--model", choices=["tiny", "small", "vit-b-16"], default="tiny", help="random CLIP")
    parser.add_argument("--model-dir", type=Path, help="reuse an exported folder (from a previous run's --keep)")
    parser.add_argument("--keep", type=Path, help="export the model into this folder and keep it")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    sizes = sorted(args.sizes)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="simfeatup_scene_bench_") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            started = time.perf_counter()
            model_dir = export_model(args.keep or work / "onnx", args.model)
            print(f"export + verification ({args.model}): {time.perf_counter() - started:.0f} s -> {model_dir}")
        results = []
        for size in sizes:
            r = run_size(size, work, model_dir, args)
            results.append(r)
            print(f"  {size}^2 done: {r['seconds']:.0f} s, peak RSS {r['peak_kib'] / 1024:.0f} MiB", flush=True)
    end_load = os.getloadavg()

    base = results[0]
    per_mp = [r["seconds"] / (r["pixels"] / 1e6) for r in results]
    print(
        f"\nscene mode, onnxruntime {ort.__version__}, random {args.model} CLIP"
        f"{'' if args.model == 'tiny' else ' + SimFeatUp'}, block {args.block}, "
        f"window batch {args.window_batch}, {base['queries']} queries, scale {args.scale:g}; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start, {end_load[0]:.1f} at end"
    )
    print(f"  {'scene':>12} {'MP':>6} {'s':>7} {'s/MP':>7} {'x':>6} {'loaded MiB':>11} {'peak MiB':>9} {'x':>6}")
    for r, t in zip(results, per_mp):
        side = round(math.sqrt(r["pixels"]))
        print(
            f"  {f'{side}^2':>12} {r['pixels'] / 1e6:6.1f} {r['seconds']:7.1f} {t:7.2f} {t / per_mp[0]:6.2f} "
            f"{r['loaded_kib'] / 1024:11.0f} {r['peak_kib'] / 1024:9.0f} {r['peak_kib'] / base['peak_kib']:6.2f}"
        )
    rss = max(abs(r["peak_kib"] / base["peak_kib"] - 1) for r in results)
    slow = max(t / per_mp[0] for t in per_mp)
    print(
        f"  peak RSS within {100 * rss:.0f}% of the {sizes[0]}^2 run's "
        f"(target 20%: {'met' if rss <= 0.2 else 'MISSED'}); "
        f"time per MP at most {slow:.2f}x its (target 1.1x: {'met' if slow <= 1.1 else 'MISSED'})"
    )
    return results


if __name__ == "__main__":
    main()
