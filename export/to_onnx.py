"""Export a SegEarth-OV / SimFeatUp segmenter to a verified ONNX model folder.

    python export/to_onnx.py --upsampler upsampler.safetensors --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model ViT-B-16 --pretrained openai --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model my_clip.json --pretrained my_clip.safetensors --out model_onnx
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simfeatup.extras import missing_extra  # noqa: E402

DTYPES = ("fp16", "fp32")  # simfeatup.export.DTYPES; not imported here so --help works without torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upsampler", required=True, help="SimFeatUp artefact (.safetensors or its .json), or 'bilinear'")
    p.add_argument("--model", help="open_clip model name, or a model config .json in open_clip's model_configs format (default: the upsampler's backbone, else ViT-B-16)")
    p.add_argument("--pretrained", help="open_clip weights tag or local weights file; a model config needs a file (default: the upsampler's, else openai)")
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
        from simfeatup.export import OnnxExportError, export_onnx
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


if __name__ == "__main__":
    sys.exit(main())
