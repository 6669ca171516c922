"""Per-image segmentation time of every CPU path (issue 10's table), ViT-B/16 + SimFeatUp, in one run.

    python bench/e2e.py                       # 448 x 448 image, random ViT-B/16 + random SimFeatUp, every row
    python bench/e2e.py --rows vit ort-simfeatup torch-bf16 --repeats 2 --no-rss   # a quick run
    python bench/e2e.py --repeats 5 --onnx-window-batch 2 --profile --keep /tmp/e2e_folders

The rows (``--rows``, default all): ``vit`` plain open_clip ViT-B/16 eager on the 9 windows (the
reference's upsampler-OFF cost, the baseline of every ratio), ``ort-bilinear``, ``ort-simfeatup``,
``torch-simfeatup`` (fp32 eager), ``torch-bf16`` (image tower in bf16), ``ort-int8`` (export
``--dtype int8``), ``ov-f32`` and ``ov-bf16`` (OpenVINO over the fp32 folder). Each prints its
ratio to ``vit`` and its label agreement with the fp32 torch SimFeatUp labels (share of equal
pixels of the full-size label map; the bilinear row is another method, so it has none). The
machine's CPU features (VNNI, bf16 units) and its fp32 and bf16 2048^2 GEMM GFLOP/s (torch; float16 at 1024^2) are
printed first, so readers can scale; the bf16 rows are skipped, saying why, on a CPU without bf16
units (PyTorch would emulate bf16, and OpenVINO refuses it).

Both backends get the same random weights (open_clip's ViT-B-16 architecture, nothing is
downloaded), the same image and vocabulary; the ONNX folder is exported and verified first.
Times are medians over interleaved repeats (the machine may be shared: read the ratio).
Peak RSS is measured in fresh processes as the number of images grows, so a leak or a
buffer that scales with the windows processed would show as a rising curve.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SAMPLE = ROOT / "samples" / "spacenet6_rotterdam.jpg"

_RSS_SCRIPT = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
backend, model_dir, counts, window_batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
image = np.load({image!r})
from simfeatup.vocabulary import Vocabulary
vocabulary = Vocabulary.from_preset("openearthmap")
if backend == "onnxruntime":
    from simfeatup.runtime import OnnxSegmenter
    segmenter = OnnxSegmenter(model_dir, window_batch=window_batch, cache=False)
else:
    from bench.e2e import build_torch
    segmenter = build_torch(window_batch)
from simfeatup.scores import Scoring
text = segmenter.encode_queries(vocabulary.queries)
run = lambda: segmenter.segment([image], vocabulary, scoring=Scoring(prob_thd=0.1), text=text)
def kib():
    # VmHWM is this process's own peak; ru_maxrss would include the parent's RSS at fork time
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded, done, out = kib(), 0, []
for n in counts:
    while done < n:
        run()
        done += 1
    out.append([n, kib()])
print(json.dumps({{"loaded": loaded, "curve": out}}))
"""


def build_torch(window_batch: int | None = None, seed: int = 0):
    """Random ViT-B/16 (open_clip architecture, no download) + random-init SimFeatUp, fp32 CPU."""
    import open_clip
    import torch

    from simfeatup.backbone import Backbone
    from simfeatup.encoder import DenseCLIP
    from simfeatup.segmenter import Segmenter
    from simfeatup.upsampler import SimFeatUp

    torch.manual_seed(seed)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    encoder = DenseCLIP(clip, backbone=Backbone(model="ViT-B-16"))  # random weights
    upsampler = SimFeatUp(encoder.embed_dim, encoder.patch_size)
    return Segmenter(encoder, upsampler, window_batch=window_batch).eval()


def test_image(size: int = 448):
    """A real aerial image (bundled SpaceNet 6 tile) resized to size x size: 9 windows."""
    import cv2

    from simfeatup import imaging

    return cv2.resize(imaging.load_image(SAMPLE), (size, size), interpolation=cv2.INTER_AREA)


def rss_curve(backend: str, model_dir: Path, image_file: Path, counts: list[int], window_batch: int) -> dict:
    """Peak RSS (KiB) of a fresh process after segmenting 1, 2, 4, ... images one by one."""
    code = _RSS_SCRIPT.format(root=str(ROOT), image=str(image_file))
    done = subprocess.run([sys.executable, "-c", code, backend, str(model_dir), json.dumps(counts), str(window_batch)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"RSS probe ({backend}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def op_profile(model_dir: Path, windows, text, top: int = 12) -> list[tuple[str, float]]:
    """Share of onnxruntime's node time per op type for one call of the image graph."""
    import collections

    import numpy as np
    import onnxruntime as ort

    from simfeatup.runtime import session_options

    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "simfeatup_e2e")
    session = ort.InferenceSession(str(model_dir / "image.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"windows": windows, "text": text, "lam": np.asarray(-0.3, np.float32)}
    session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return [(op, d / total) for op, d in per_op.most_common(top)]


ROWS = {
    "vit": "plain open_clip ViT-B/16 eager, 9 windows (upsampler-OFF cost)",
    "ort-bilinear": "simfeatup onnxruntime, bilinear",
    "ort-simfeatup": "simfeatup onnxruntime, SimFeatUp",
    "torch-simfeatup": "simfeatup torch eager, SimFeatUp",
    "torch-bf16": "simfeatup torch eager bf16 ViT, SimFeatUp",
    "ort-int8": "simfeatup onnxruntime int8 ViT, SimFeatUp",
    "ov-f32": "simfeatup OpenVINO f32, SimFeatUp",
    "ov-bf16": "simfeatup OpenVINO bf16, SimFeatUp",
}
FOLDER_OF_ROW = {"ort-bilinear": "bilinear", "ort-simfeatup": "fp32", "ort-int8": "int8", "ov-f32": "fp32",
                 "ov-bf16": "fp32"}



def interleaved(runs: dict, repeats: int) -> dict:
    """{name: [seconds per call]}: every run once per round, so load spikes hit them all alike."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times

def gemm_gflops(dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of one n x n torch matmul in ``dtype`` (what the CPU's units deliver)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _folder(kind: str, torch_seg, root: Path) -> Path:
    """The exported folder of ``kind`` (fp32, bilinear, int8) under ``root``, exported once and reused."""
    from simfeatup.export import export_onnx
    from simfeatup.segmenter import Segmenter

    folder = root / kind
    if (folder / "manifest.json").is_file():
        return folder
    segmenter = torch_seg if kind != "bilinear" else Segmenter(torch_seg.encoder, None, cache=False).eval()
    started = time.perf_counter()
    export_onnx(folder, segmenter=segmenter, dtype="int8" if kind == "int8" else "fp32", overwrite=True)
    print(f"export + verification ({kind}): {time.perf_counter() - started:.0f} s -> {folder}", flush=True)
    return folder


def _skipped(row: str, bf16_refused: str | None) -> bool:
    """Whether ``row`` cannot run on this CPU (bf16 without bf16 units), saying so."""
    reason = None
    if row == "torch-bf16":
        reason = bf16_refused
    elif row == "ov-bf16":
        from simfeatup.openvino_runtime import bf16_problem, ov

        reason = bf16_problem(ov.Core())
    if reason:
        print(f"skipped {row}: {reason}", flush=True)
    return reason is not None


def table(args, root: Path) -> dict:
    """Issue 10's table: every selected row timed on the same image, interleaved, medians."""
    import copy

    import torch

    from simfeatup import hardware, imaging, windows
    from simfeatup.scores import Scoring
    from simfeatup.vocabulary import Vocabulary

    advice = hardware.cpu_dtype_advice("bfloat16")
    bf16_refused = advice[1] if advice and advice[0] == "error" else None
    # at 1024^2: float16, and bf16 where it is emulated (slow), each against fp32 at that size
    small_dtypes = (torch.float32, torch.float16, *((torch.bfloat16,) if bf16_refused else ()))
    small = {dtype: gemm_gflops(dtype, n=1024, repeats=2) for dtype in small_dtypes}
    if bf16_refused:
        bf16 = (f"no bf16 units: emulated, {small[torch.bfloat16]:.1f} GFLOP/s at 1024^2, "
                f"{small[torch.float32] / small[torch.bfloat16]:.0f}x slower than fp32 at that size")
    else:
        bf16 = f"{gemm_gflops(torch.bfloat16):.0f} GFLOP/s"
    print(f"CPU: {hardware.describe()}\nGEMM 2048^2 (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"fp32 {gemm_gflops(torch.float32):.0f} GFLOP/s, bf16 {bf16}; float16 at 1024^2 "
          f"{small[torch.float16]:.0f} GFLOP/s against fp32 {small[torch.float32]:.0f}", flush=True)
    args.rows = [row for row in args.rows if not _skipped(row, bf16_refused)]
    torch_seg = build_torch(args.torch_window_batch)
    image = test_image(args.size)
    vocabulary = Vocabulary.from_preset("openearthmap")
    scoring = Scoring(prob_thd=0.1)
    text = torch_seg.encode_queries(vocabulary.queries)  # fp32 text: every row scores the same queries
    segmenters = {}
    for row in args.rows:
        if row == "torch-simfeatup":
            segmenters[row] = torch_seg
        elif row == "torch-bf16":
            segmenters[row] = copy.deepcopy(torch_seg).to_dtype(torch.bfloat16)
        elif row in ("ort-bilinear", "ort-simfeatup", "ort-int8"):
            from simfeatup.runtime import OnnxSegmenter

            segmenters[row] = OnnxSegmenter(_folder(FOLDER_OF_ROW[row], torch_seg, root),
                                            window_batch=args.onnx_window_batch, cache=False)
        elif row in ("ov-f32", "ov-bf16"):
            from simfeatup.openvino_runtime import OpenVinoSegmenter

            segmenters[row] = OpenVinoSegmenter(_folder("fp32", torch_seg, root), precision=row[3:],
                                                window_batch=args.onnx_window_batch, cache=False)
    prepared = imaging.preprocess(image, torch_seg.long_side)
    boxes = windows.window_boxes(*prepared.shape[1:], torch_seg.window, torch_seg.stride)
    crops = [torch.from_numpy(prepared[:, y0:y1, x0:x1].copy())[None] for y0, y1, x0, x1 in boxes]
    visual = torch_seg.encoder.clip.visual

    def plain_vit():
        with torch.inference_mode():
            for crop in crops:  # the reference: one open_clip forward per window
                visual(crop)

    runs = {"vit": plain_vit}
    for row, seg in segmenters.items():
        runs[row] = lambda seg=seg: seg.segment([image], vocabulary, scoring=scoring, text=text)[0].labels
    labels = {row: run() for row, run in runs.items()}  # warm-up; the label maps compared below
    reference = labels.get("torch-simfeatup")
    if reference is None and any(r not in ("vit", "ort-bilinear") for r in runs):
        reference = torch_seg.segment([image], vocabulary, scoring=scoring, text=text)[0].labels
    times = interleaved(runs, args.repeats)
    med = {row: statistics.median(t) for row, t in times.items()}
    base = med.get("vit")
    print(f"\n{args.size}x{args.size} image, {len(boxes)} windows, {len(vocabulary.queries)} queries, "
          f"random ViT-B/16 + random SimFeatUp, medians of {args.repeats}\n")
    print("| path | s/image | ratio to plain ViT | labels = fp32 torch SimFeatUp |\n|---|---|---|---|")
    agreement = {}
    for row in runs:
        if row not in ("vit", "ort-bilinear"):
            agreement[row] = float((labels[row] == reference).mean())
        ratio = f"{med[row] / base:.2f}" if base else "-"
        agree = f"{100 * agreement[row]:.2f}%" if row in agreement else "-"
        print(f"| {ROWS[row]} | {med[row]:.2f} | {ratio} | {agree} |")
    if "ort-bilinear" in med and "ort-simfeatup" in med:
        print(f"\nonnxruntime fp32: SimFeatUp on / bilinear = {med['ort-simfeatup'] / med['ort-bilinear']:.2f} "
              "(issue 10's target: <= 1.5)")
    return {"seconds": med, "label_agreement": agreement}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=448, help="image side in pixels (448: 3 x 3 windows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per backend (after one warm-up each)")
    parser.add_argument(
        "--torch-window-batch", type=int, default=1, help="windows per torch forward (Segmenter's default on CPU)"
    )
    parser.add_argument(
        "--onnx-window-batch", type=int, default=1, help="windows per onnxruntime call (OnnxSegmenter's default)"
    )
    parser.add_argument(
        "--rss-images", type=int, nargs="+", default=[1, 2, 4, 6], help="image counts for the RSS curve"
    )
    parser.add_argument("--model-dir", type=Path, help="reuse an exported folder (from a previous run's --keep)")
    parser.add_argument("--keep", type=Path, help="export into this folder and keep it")
    parser.add_argument("--profile", action="store_true", help="print onnxruntime's time per op type")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="the table's rows (all)")
    parser.add_argument("--no-rss", action="store_true", help="skip the torch vs onnxruntime RSS curves")
    args = parser.parse_args(argv)
    from simfeatup.allocator import keep_freed_memory

    keep_freed_memory()  # as every simfeatup command does
    with tempfile.TemporaryDirectory(prefix="simfeatup_e2e_folders_") as tmp:  # each export is ~600 MB
        root = args.keep or Path(tmp)
        result = table(args, root)
        if args.no_rss and not args.profile:
            return result
        if args.model_dir is None:  # the RSS curves and the profile run on the table's fp32 folder
            args.model_dir = _folder("fp32", build_torch(args.torch_window_batch), root)
        return {**result, **_memory_and_profile(args)}


def _memory_and_profile(args) -> dict:
    """torch eager vs onnxruntime: their ratio, peak RSS curves, onnxruntime's op profile."""

    import numpy as np
    import onnxruntime as ort
    import torch

    from simfeatup.export import export_onnx
    from simfeatup.runtime import OnnxSegmenter
    from simfeatup.scores import Scoring
    from simfeatup.vocabulary import Vocabulary

    torch_seg = build_torch(args.torch_window_batch)
    with tempfile.TemporaryDirectory(prefix="simfeatup_e2e_") as tmp:  # the export is ~600 MB
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = args.keep or work / "onnx"
            started = time.perf_counter()
            export_onnx(model_dir, segmenter=torch_seg, overwrite=bool(args.keep))
            print(f"export + verification: {time.perf_counter() - started:.0f} s -> {model_dir}")
        onnx_seg = OnnxSegmenter(model_dir, window_batch=args.onnx_window_batch, cache=False)

        image = test_image(args.size)
        vocabulary = Vocabulary.from_preset("openearthmap")
        scoring = Scoring(prob_thd=0.1)
        # both backends start with their queries encoded
        texts = {seg: seg.encode_queries(vocabulary.queries) for seg in (torch_seg, onnx_seg)}
        runs = {
            "torch eager": lambda: torch_seg.segment([image], vocabulary, scoring=scoring, text=texts[torch_seg])[0],
            "onnxruntime": lambda: onnx_seg.segment([image], vocabulary, scoring=scoring, text=texts[onnx_seg])[0],
        }
        results = {name: run() for name, run in runs.items()}  # warm-up; also the label maps compared below
        times = interleaved(runs, args.repeats)

        agree = float((results["torch eager"].labels == results["onnxruntime"].labels).mean())
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio = med["torch eager"] / med["onnxruntime"]
        print(
            f"\nViT-B/16 (random weights) + SimFeatUp (random init), {args.size}x{args.size} image, "
            f"{len(vocabulary.queries)} queries, windows per call: torch {args.torch_window_batch}, "
            f"onnxruntime {args.onnx_window_batch}"
        )
        print(
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
            f"({', '.join(onnx_seg.image_session.get_providers())})"
        )
        for name in runs:
            spread = ", ".join(f"{t:.2f}" for t in times[name])
            print(f"  {name:12s} {med[name]:6.2f} s/image   (runs: {spread})")
        print(
            f"  torch eager / onnxruntime time: {ratio:.2f}x (target <= 1.3x: {'met' if ratio <= 1.3 else 'MISSED'})"
        )
        print(f"  label agreement: {100 * agree:.4f}% of pixels")

        np.save(work / "image.npy", image)
        curves = {}
        for backend, batch in (("torch", args.torch_window_batch), ("onnxruntime", args.onnx_window_batch)):
            curves[backend] = rss_curve(backend, model_dir, work / "image.npy", sorted(args.rss_images), batch)
            points = "  ".join(f"{n} img: {kib / 1024:.0f} MiB" for n, kib in curves[backend]["curve"])
            print(f"  peak RSS {backend:12s} after loading {curves[backend]['loaded'] / 1024:.0f} MiB;  {points}")

        profile = None
        if args.profile:
            windows = np.random.default_rng(0).standard_normal((args.onnx_window_batch, 3, 224, 224)).astype(np.float32)
            profile = op_profile(model_dir, windows, texts[onnx_seg])
            print("  onnxruntime time per op type: " + ", ".join(f"{op} {100 * share:.0f}%" for op, share in profile))
    return {"seconds": med, "speedup": ratio, "label_agreement": agree, "rss_kib": curves, "profile": profile}


if __name__ == "__main__":
    main()
