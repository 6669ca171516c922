"""SimFeatUp forward vs the reference's unfold formulation: time and peak memory, in one run.

    python bench/upsampler.py                       # C=512, 14x14 -> 224x224, one window
    python bench/upsampler.py --threads 1 --naive-dims 16 32 64  # channel counts the unfold form runs at

The unfold form (the reference's PyTorch fallback) materialises (C, 121, H, W), 12 GB at C=512,
so it runs at a few small channel counts and is extrapolated to --dim with a straight line
through them (its time and memory are affine in C); the output says so. Each measurement runs
in its own subprocess so its peak RSS (ru_maxrss above the after-setup level) is its own.
A ViT-B/16-architecture window forward (random weights, no download) is timed as the yardstick.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simfeatup.upsampler import SimFeatUp  # noqa: E402


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


def _child(kind: str, dim: int, grid: int, patch: int, repeats: int) -> dict:
    """Runs in a fresh process: one cold forward (its peak RSS), then the best of ``repeats``."""
    torch.manual_seed(0)
    if kind == "vit":
        import open_clip

        model = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
        args = (torch.randn(1, 3, 224, 224),)  # its native window, whatever --grid says
    else:
        up = SimFeatUp(dim, patch).eval()
        fn = {"ours": up, "per-channel": per_channel_forward, "unfold": unfold_forward}[kind]
        model = fn if kind == "ours" else (lambda f, g: fn(up, f, g))
        args = (torch.randn(1, dim, grid, grid), torch.randn(1, 3, grid * patch, grid * patch))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"kind": kind, "dim": dim, "seconds": min(times[1:] or times), "peak_mb": peak_mb}


def measure(kind: str, dim: int, grid: int, patch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dim", str(dim), "--grid", str(grid),
           "--patch", str(patch), "--repeats", str(repeats), "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"measuring {kind} at C={dim} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _line_through(xs: list[float], ys: list[float], x: float) -> float:
    """Least-squares straight line through (xs, ys), evaluated at x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return my + slope * (x - mx)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="feature channels C")
    parser.add_argument("--grid", type=int, default=14, help="token grid side h = w")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--naive-dims", type=int, nargs="+", default=[16, 64],
                        help="channel counts at which the unfold form is really run (>= 2 values)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one cold one (best counts)")
    parser.add_argument("--threads", type=int, help="torch threads in every measurement (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args.child, args.dim, args.grid, args.patch, args.repeats)))
        return {}
    if len(set(args.naive_dims)) < 2:
        parser.error("--naive-dims needs at least two different channel counts to fit a line")

    run = lambda kind, dim, repeats=args.repeats: measure(kind, dim, args.grid, args.patch, repeats)  # noqa: E731
    ours, per_channel, vit = run("ours", args.dim), run("per-channel", args.dim), run("vit", args.dim)
    naive = [run("unfold", c, 1) for c in args.naive_dims]
    cs = [float(c) for c in args.naive_dims]
    naive_s = _line_through(cs, [r["seconds"] for r in naive], args.dim)
    naive_mb = _line_through(cs, [r["peak_mb"] for r in naive], args.dim)

    side = args.grid * args.patch
    print(f"SimFeatUp forward, C={args.dim}, {args.grid}x{args.grid} -> {side}x{side}, batch 1, fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'':34} {'seconds':>8} {'peak MB':>9}")
    for r in naive:
        print(f"{'unfold (reference), C=' + str(r['dim']):34} {r['seconds']:>8.3f} {r['peak_mb']:>9.0f}")
    print(f"{'unfold (reference), C=' + str(args.dim) + ' (fitted)':34} {naive_s:>8.3f} {naive_mb:>9.0f}"
          f"   <- straight line through C={args.naive_dims}, not run")
    print(f"{'ours, steps on all C channels':34} {per_channel['seconds']:>8.3f} {per_channel['peak_mb']:>9.0f}")
    print(f"{'ours (SimFeatUp.forward)':34} {ours['seconds']:>8.3f} {ours['peak_mb']:>9.0f}")
    print(f"{'ViT-B/16 224 window fwd (random)':34} {vit['seconds']:>8.3f}")
    speedup, memory = naive_s / ours["seconds"], naive_mb / max(ours["peak_mb"], 1.0)
    print(f"ours vs unfold: {speedup:.0f}x faster (target >= 50x), {memory:.0f}x less peak memory (target >= 20x)")
    print(f"ours vs all-channel steps: {per_channel['seconds'] / ours['seconds']:.1f}x faster")
    print(f"ours = {ours['seconds'] / vit['seconds']:.2f} x one ViT-B/16 window forward")
    if os.getloadavg()[0] > os.cpu_count() and torch.get_num_threads() > 1:
        # Ours is ~1000 short parallel ops per forward; when another job holds a core each one
        # waits for the descheduled thread, so its time inflates far more than the unfold's.
        print(f"warning: load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; rerun idle or with --threads 1")
    return {"ours": ours, "per_channel": per_channel, "vit": vit, "unfold": naive,
            "unfold_fitted": {"seconds": naive_s, "peak_mb": naive_mb}, "speedup": speedup, "memory_ratio": memory}


if __name__ == "__main__":
    main()
