"""SimFeatUp's inference cost per window vs one ViT-B/16 window forward and vs the reference's unfold form.

    python bench/upsampler.py                       # C=512, 14x14 -> 224x224, one window, 1 thread
    python bench/upsampler.py --baseline /work/main --rounds 3   # also time another checkout's code
    python bench/upsampler.py --threads 2 --naive-dims 16 32 64

Rows: ``cosine_logits`` (what the segmenter runs per window: the upsampled features scored
against --queries text embeddings, on the upsampling operator's h*w columns), ``forward`` (the
(C, H, W) feature map), the JBU steps on all C channels, and the unfold form (the reference's
PyTorch fallback, which materialises (C, 121, H, W), 12 GB at C=512: it runs at a few small
channel counts and is extrapolated to --dim with a straight line through them; a fit that
does not rise with C is refused). A ViT-B/16-architecture window forward (random weights, no
download) is the yardstick.

Allocator: every row runs as the simfeatup commands do, with large freed buffers kept for reuse
(simfeatup/allocator.py); one more row times cosine_logits with glibc's default allocator.

Timing: CPU seconds (``time.process_time``, all threads of the process), best of --repeats
after one cold call, each measurement in its own subprocess (so its peak RSS is its own), the
--rounds interleaved so a change of machine load hits every row alike. CPU time instead of
wall time because the ratio to the ViT is what is claimed: wall time on a shared machine
inflates multi-threaded short ops far more than the ViT's large GEMMs. ``--baseline DIR``
times DIR's simfeatup (another checkout, e.g. before a change) in the same rounds and prints
our time over its time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def unfold_step(step, source, guide):
    """One JBU step as the reference's fallback computes it: every window unfolded."""
    B, C = source.shape[:2]
    H, W = guide.shape[-2:]
    r, d = step.radius, step.diameter
    key = step.range_proj(guide)
    neighbours = F.unfold(F.pad(key, [r] * 4, mode="reflect"), d).view(B, -1, d * d, H, W)
    temp = step.range_temp.exp().clamp(1e-4, 1e4)
    k = torch.softmax(temp * torch.einsum("bkohw,bkhw->bohw", neighbours, key), dim=1)
    k = k * step.spatial_kernel().view(1, -1, 1, 1)
    k = k / k.sum(1, keepdim=True).clamp(min=1e-7)
    k = k + 0.1 * step.fixup_proj(torch.cat([k, guide], dim=1))
    src = F.interpolate(source, (H, W), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(src, [r] * 4, mode="reflect"), d).view(B, C, d * d, H, W)
    return torch.einsum("bohw,bcohw->bchw", k, patches)


def unfold_forward(module, feats, guidance):
    h, w = feats.shape[-2:]
    steps = module.steps()
    x = feats
    for i, step in enumerate(steps):
        size = guidance.shape[-2:] if i == len(steps) - 1 else (h << (i + 1), w << (i + 1))
        x = unfold_step(step, x, F.adaptive_avg_pool2d(guidance, size))
    return x + 0.1 * module.fixup_proj(x)


def per_channel_forward(module, feats, guidance):
    """Ours without the operator trick: the JBU steps run on all C channels."""
    conv = module.fixup_proj[1]
    x = feats + 0.1 * F.conv2d(feats, conv.weight)
    return module._upsample(x, guidance) + 0.1 * conv.bias.view(1, -1, 1, 1)


QUERIES = 16  # text embeddings scored per window in the cosine_logits row
DEFAULT_ALLOCATOR = "+default-allocator"  # a row measured without the CLI's allocator setting


def _onnx_cosine(up, args, grid: int):
    """cosine_logits in graph form (what the ONNX export traces), exported and run by onnxruntime."""
    import tempfile

    import onnxruntime as ort

    from simfeatup.export.graph_form import GraphUpsampler

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.form = GraphUpsampler(up, grid * grid)  # not "graph": torch.fx modules own that name

        def forward(self, feats, guidance, text):
            return self.form.cosine_logits(feats, guidance, text)

    path = Path(tempfile.mkdtemp()) / "scores.onnx"
    with torch.no_grad():
        torch.onnx.export(Scores().eval(), args, path, dynamo=True, input_names=["feats", "guidance", "text"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip(["feats", "guidance", "text"], (a.numpy() for a in args)))
    return lambda *_: session.run(None, feeds)


def _keep_freed_memory() -> bool:
    """What every simfeatup command does first (simfeatup/allocator.py), from this checkout's file
    whichever checkout is timed, so a --baseline is measured under the same allocator."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_allocator", ROOT / "simfeatup" / "allocator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keep_freed_memory()


def _child(kind: str, dim: int, grid: int, patch: int, repeats: int, code: str) -> dict:
    """Runs in a fresh process: one cold call (its peak RSS), then the best of ``repeats``."""
    if kind.endswith(DEFAULT_ALLOCATOR):
        kind = kind[: -len(DEFAULT_ALLOCATOR)]
    else:
        _keep_freed_memory()
    sys.path.insert(0, code)  # the checkout whose simfeatup is timed
    from simfeatup.upsampler import SimFeatUp

    torch.manual_seed(0)
    if kind == "vit":
        import open_clip

        model = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
        args = (torch.randn(1, 3, 224, 224),)  # its native window, whatever --grid says
    else:
        up = SimFeatUp(dim, patch).eval()
        args = (torch.randn(1, dim, grid, grid), torch.randn(1, 3, grid * patch, grid * patch))
        if kind in ("cosine", "onnx"):
            args = (*args, F.normalize(torch.randn(QUERIES, dim), dim=1))
            model = up.cosine_logits if kind == "cosine" else _onnx_cosine(up, args, grid)
        elif kind == "forward":
            model = up
        else:
            fn = {"per-channel": per_channel_forward, "unfold": unfold_forward}[kind]
            model = lambda f, g: fn(up, f, g)  # noqa: E731
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.process_time()
            model(*args)
            times.append(time.process_time() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"kind": kind, "dim": dim, "seconds": min(times[1:] or times), "peak_mb": peak_mb}


def measure(kind: str, dim: int, grid: int, patch: int, repeats: int, threads: int, code: Path = ROOT) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dim", str(dim), "--grid", str(grid), "--patch", str(patch),
           "--repeats", str(repeats), "--threads", str(threads), "--code", str(code)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"measuring {kind} at C={dim} ({code}) failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares straight line through (xs, ys) -> (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return my - slope * mx, slope


def extrapolate(xs: list[float], ys: list[float], x: float, what: str) -> float:
    """The line through (xs, ys) at x; refuses a line that does not rise with C (noise swamped the
    measurements: the channel counts were too small or too close) or that ends below a measurement."""
    intercept, slope = fit_line(xs, ys)
    value = intercept + slope * x
    if slope <= 0 or value < max(ys):
        raise SystemExit(
            f"bench/upsampler.py: the unfold form's {what} does not grow with C at --naive-dims "
            f"{[int(c) for c in xs]} ({[round(y, 3) for y in ys]}), so no line can be extrapolated to C={int(x)}: "
            "measure at larger, further apart channel counts, e.g. --naive-dims 16 64"
        )
    return value


def gemm_gflops(n: int = 1024, repeats: int = 3) -> float:
    """fp32 GEMM throughput of this process's threads (CPU time), to scale the ratios by."""
    a = torch.randn(n, n)
    a @ a
    start = time.process_time()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 * repeats / (time.process_time() - start) / 1e9


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="feature channels C")
    parser.add_argument("--grid", type=int, default=14, help="token grid side h = w")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--naive-dims", type=int, nargs="*", default=[16, 64],
                        help="channel counts at which the unfold form is really run (>= 2 values; [] to skip it)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one cold one (best counts)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every row (best counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every measurement")
    parser.add_argument("--baseline", type=Path, help="another checkout whose simfeatup is timed in the same rounds")
    parser.add_argument("--onnx", action="store_true",
                        help="also time cosine_logits exported in graph form, in onnxruntime (exports: slow)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args.child, args.dim, args.grid, args.patch, args.repeats, args.code)))
        return {}
    if args.naive_dims and len(set(args.naive_dims)) < 2:
        parser.error("--naive-dims needs at least two different channel counts to fit a line")
    if args.baseline is not None and not (args.baseline / "simfeatup" / "upsampler.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a checkout of simfeatup (no simfeatup/upsampler.py in it)")

    def run(kind, dim=args.dim, code=ROOT, repeats=args.repeats):
        return measure(kind, dim, args.grid, args.patch, repeats, args.threads, code)

    codes = {"ours": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    kinds = ("cosine", "forward") + (("onnx",) if args.onnx else ())
    rows = {(who, kind): [] for who in codes for kind in kinds}
    rows["vit"] = []
    rows[("ours", "cosine" + DEFAULT_ALLOCATOR)] = []
    for _ in range(args.rounds):
        for key, runs in rows.items():
            runs.append(run("vit") if key == "vit" else run(key[1], code=codes[key[0]]))
    rows["per-channel"] = [run("per-channel")]
    best = {key: _best(runs) for key, runs in rows.items()}
    vit = best["vit"]["seconds"]
    naive = [run("unfold", c, repeats=1) for c in args.naive_dims]

    from simfeatup import hardware  # this checkout's, for the header

    side = args.grid * args.patch
    print(f"SimFeatUp, C={args.dim}, {args.grid}x{args.grid} -> {side}x{side}, batch 1, fp32, "
          f"torch {torch.__version__}, {args.threads} thread(s), CPU seconds, "
          f"best of {args.repeats} x {args.rounds} round(s), load avg {os.getloadavg()[0]:.1f}, "
          f"fp32 GEMM {gemm_gflops():.0f} GFLOP/s\nCPU: {hardware.describe()}")
    print(f"{'':44} {'seconds':>8} {'peak MB':>9} {'x ViT':>7}")

    def line(name, r):
        print(f"{name:44} {r['seconds']:>8.3f} {r['peak_mb']:>9.0f} {r['seconds'] / vit:>7.2f}")

    result = {"vit": best["vit"]}
    for who in codes:
        tag = "" if who == "ours" else f" [baseline {args.baseline}]"
        line(f"cosine_logits, {QUERIES} queries{tag}", best[(who, "cosine")])
        line(f"forward (C-channel map){tag}", best[(who, "forward")])
        if args.onnx:
            line(f"cosine_logits, onnxruntime{tag}", best[(who, "onnx")])
        result[who] = {kind: best[(who, kind)] for kind in kinds}
    line("cosine_logits, glibc's default allocator", best[("ours", "cosine" + DEFAULT_ALLOCATOR)])
    line("JBU steps on all C channels", best["per-channel"])
    line("ViT-B/16 224 window forward (random)", best["vit"])
    for r in naive:
        line(f"unfold (reference), C={r['dim']}", r)
    if naive:
        cs = [float(c) for c in args.naive_dims]
        fitted = {"seconds": extrapolate(cs, [r["seconds"] for r in naive], args.dim, "time"),
                  "peak_mb": extrapolate(cs, [r["peak_mb"] for r in naive], args.dim, "peak memory")}
        line(f"unfold (reference), C={args.dim} (fitted, not run)", fitted)
        ours = best[("ours", "forward")]
        speedup, memory = fitted["seconds"] / ours["seconds"], fitted["peak_mb"] / max(ours["peak_mb"], 1.0)
        print(f"forward vs unfold: {speedup:.0f}x faster, {memory:.0f}x less peak memory")
        result.update(unfold=naive, unfold_fitted=fitted, speedup=speedup, memory_ratio=memory)
    cos = best[("ours", "cosine")]["seconds"]
    print(f"cosine_logits = {cos / vit:.2f} x one ViT-B/16 window forward (issue 10's target: <= 0.5)")
    if args.onnx:
        onnx = best[("ours", "onnx")]["seconds"]
        print(f"cosine_logits in onnxruntime = {onnx / vit:.2f} x the same (eager) ViT forward")
    if args.baseline:
        for kind in kinds:
            ratio = best[("ours", kind)]["seconds"] / best[("baseline", kind)]["seconds"]
            print(f"{kind}: ours / baseline = {ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
