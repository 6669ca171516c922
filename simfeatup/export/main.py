"""``export/to_onnx.py``: export a SegEarth-OV / SimFeatUp segmenter to a verified ONNX model folder.

    python export/to_onnx.py --upsampler upsampler.safetensors --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model ViT-B-16 --pretrained openai --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model my_clip.json --pretrained my_clip.safetensors --out model_onnx
    python export/to_onnx.py --upsampler upsampler.safetensors --static-window 224 --batch 4 --out model_static

Torch-free until the export itself runs, so ``--help`` works without the torch extra.
"""
from __future__ import annotations

from .. import flags
from ..entry import UsageError, run_command, setup_logging
from ..model_folder import DEFAULT_STATIC_QUERIES

DTYPES = ("fp16", "fp32", "int8")  # simfeatup.export.DTYPES; not imported here so --help works without torch


def _fixed_vocabulary(args) -> dict:
    """--classes / --preset and the scoring flags -> export_onnx's vocabulary, scoring and uint8_input."""
    from .. import presets
    from ..scores import Scoring
    from ..vocabulary import Vocabulary

    tuning = {"lam": args.lam, "prob_thd": args.prob_thd, "bg_idx": args.bg_idx}
    if args.classes is None and args.preset is None:
        given = [f"--{k.replace('_', '-')}" for k, v in tuning.items() if v is not None]
        if args.uint8_input:
            given.append("--uint8-input")
        if given:
            raise UsageError(f"{', '.join(given)} only apply to a fixed vocabulary: add --classes or --preset")
        return {}
    preset = presets.load(args.preset) if args.preset else None
    vocabulary = Vocabulary.from_lines(preset.classes) if preset else Vocabulary.from_spec(args.classes)
    scoring = Scoring.resolve(preset, **tuning)
    if scoring.bg_idx >= len(vocabulary):
        raise UsageError(f"--bg-idx {scoring.bg_idx} is not a class index: there are {len(vocabulary)} classes")
    return {"vocabulary": vocabulary, "scoring": scoring, "uint8_input": args.uint8_input}


def main(argv=None) -> int:
    p = flags.Parser(prog="to_onnx", help_command="python export/to_onnx.py --help",
                     description=__doc__.splitlines()[0].split(": ", 1)[1])
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
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument(
        "--classes",
        help='bake a fixed vocabulary: class lines as for `simfeatup segment`, e.g. "building,roof;road;water"',
    )
    vocab.add_argument("--preset", help="bake a dataset preset's classes, prob_thd, bg_idx and lam (fixed vocabulary)")
    p.add_argument("--prob-thd", type=flags.probability, help="with --classes/--preset: the baked threshold")
    p.add_argument("--bg-idx", type=flags.index, help="with --classes/--preset: the baked background class")
    p.add_argument("--lam", type=flags.finite, help="with --classes/--preset: the baked [CLS] weight")
    p.add_argument(
        "--uint8-input",
        action="store_true",
        help="fixed vocabulary only: the image graph takes raw uint8 RGB windows (B, h, w, 3) and normalises "
        "and pads inside (docs/model-folder-fixed.md)",
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
        "--batch", type=flags.count, default=1, help="windows per call of a static image graph (default 1)"
    )
    p.add_argument(
        "--queries", type=flags.count, default=DEFAULT_STATIC_QUERIES,
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
            "upsampler", "model", "pretrained", "attention", "dtype", "opset", "overwrite", "preset", "static_window",
            "batch", "queries",
        )
        export_onnx(args.out, **{name: getattr(args, name) for name in options}, **_fixed_vocabulary(args))

    return run_command("to_onnx", body, needs="export", verbose=args.verbose)
