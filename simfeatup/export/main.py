"""``export/to_onnx.py``: export a SegEarth-OV / SimFeatUp segmenter to a verified ONNX model folder.

    python export/to_onnx.py --upsampler upsampler.safetensors --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model ViT-B-16 --pretrained openai --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model my_clip.json --pretrained my_clip.safetensors --out model_onnx

Torch-free until the export itself runs, so ``--help`` works without the torch extra.
"""
from __future__ import annotations

import argparse

from ..entry import run_command, setup_logging

DTYPES = ("fp16", "fp32", "int8")  # simfeatup.export.DTYPES; not imported here so --help works without torch


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
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="weight precision of the graphs (default fp32); int8: the image tower's linear layers "
        "quantised, verified by label agreement on the bundled samples",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    def body():
        from . import export_onnx  # inside: a missing torch extra is reported like a user error

        options = ("upsampler", "model", "pretrained", "attention", "dtype", "opset", "overwrite")
        export_onnx(args.out, **{name: getattr(args, name) for name in options})

    return run_command("to_onnx", body, needs="export", verbose=args.verbose)
