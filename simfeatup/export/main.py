"""``export/to_onnx.py``: export a SegEarth-OV / SimFeatUp segmenter to a verified ONNX model folder.

    python export/to_onnx.py --upsampler upsampler.safetensors --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model ViT-B-16 --pretrained openai --out model_onnx

Torch-free until the export itself runs, so ``--help`` works without the torch extra.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..extras import missing_extra

DTYPES = ("fp16", "fp32")  # simfeatup.export.DTYPES; not imported here so --help works without torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="to_onnx", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--upsampler", required=True, help="SimFeatUp artefact (.safetensors or its .json), or 'bilinear'")
    p.add_argument("--model", help="open_clip model name (default: the upsampler's backbone, else ViT-B-16)")
    p.add_argument("--pretrained", help="open_clip weights tag or local weights file (default: the upsampler's, else openai)")
    p.add_argument("--attention", help="last-block attention: segearth, clearclip, sclip, maskclip, vanilla (default: the upsampler's, else segearth)")
    p.add_argument("--out", required=True, help="model folder to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight precision of the graphs (default fp32)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    # INFO from simfeatup only: open_clip and the exporter's internals chatter at INFO too
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("simfeatup").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        from . import OnnxExportError, export_onnx
    except ModuleNotFoundError as err:
        return _missing(err)
    try:
        export_onnx(args.out, upsampler=args.upsampler, model=args.model, pretrained=args.pretrained,
                    attention=args.attention, dtype=args.dtype, opset=args.opset, overwrite=args.overwrite)
    except ValueError as err:  # user mistakes: bad path, weights, flags (WeightsUnavailableError, UpsamplerFileError, ...)
        sys.stderr.write(f"to_onnx: error: {err}\n")
        return 2
    except OnnxExportError as err:  # the graphs do not reproduce torch; nothing was written
        sys.stderr.write(f"to_onnx: export failed: {err}\n")
        return 1
    except ModuleNotFoundError as err:  # onnxruntime, for the self-check; nothing was written
        return _missing(err)
    return 0


def _missing(err: ModuleNotFoundError) -> int:
    message = missing_extra(err, "export")
    if message is None:
        raise err
    sys.stderr.write(f"to_onnx: error: {message}\n")
    return 2
