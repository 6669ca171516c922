"""``export/to_onnx.py``: export a SegEarth-OV / SimFeatUp segmenter to a verified ONNX model folder.

    python export/to_onnx.py --upsampler upsampler.safetensors --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model ViT-B-16 --pretrained openai --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model my_clip.json --pretrained my_clip.safetensors --out model_onnx
    python export/to_onnx.py --upsampler upsampler.safetensors --static-window 224 --batch 4 --out model_static

Torch-free until the export itself runs, so ``--help`` works without the torch extra.
"""
from __future__ import annotations

import argparse

from ..entry import run_command, setup_logging
from ..model_folder import DEFAULT_STATIC_QUERIES

DTYPES = ("fp16", "fp32")  # simfeatup.export.DTYPES; not imported here so --help works without torch


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="to_onnx", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--upsampler", required=True, help="SimFeatUp artefact (.safetensors or its .json), or 'bilinear'")
    p.add_argument(
        "--model",
        help="open_clip model name, or a model config .json in open_clip's model_configs format "
        "(default: the upsampler's backbone, else ViT-B-16)",
    )
    p.add_argument(
        "--pretrained",
        help="open_clip weights tag or local weights file; a model config needs a file "
        "(default: the upsampler's, else openai)",
    )
    p.add_argument(
        "--attention",
        help="last-block attention: segearth, clearclip, sclip, maskclip, vanilla "
        "(default: the upsampler's, else segearth)",
    )
    p.add_argument("--out", required=True, help="model folder to write (must not exist unless --overwrite)")
    p.add_argument(
        "--dtype", default="fp32", choices=sorted(DTYPES), help="weight precision of the graphs (default fp32)"
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--static-window",
        type=int,
        metavar="SIDE",
        help="graphs with no dynamic dim, for TensorRT, OpenVINO, CoreML, NPUs: windows SIDE x SIDE "
        "(the model's window, 224); see docs/model-folder.md, 'Static shapes'",
    )
    p.add_argument(
        "--batch", type=_positive_int, default=1, help="windows per call of a static image graph (default 1)"
    )
    p.add_argument(
        "--queries", type=_positive_int, default=DEFAULT_STATIC_QUERIES,
        help=f"queries per call of a static image graph; fewer are padded, more run in groups "
        f"(default {DEFAULT_STATIC_QUERIES})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.static_window is None and (args.batch != 1 or args.queries != DEFAULT_STATIC_QUERIES):
        p.error("--batch and --queries fix the shapes of a static export: give --static-window 224 too")

    def body():
        from . import export_onnx  # inside: a missing torch extra is reported like a user error

        options = (
            "upsampler", "model", "pretrained", "attention", "dtype", "opset", "overwrite", "static_window", "batch",
            "queries",
        )
        export_onnx(args.out, **{name: getattr(args, name) for name in options})

    return run_command("to_onnx", body, needs="export", verbose=args.verbose)
