"""`simfeatup` command line: segment, evaluate, compare, convert-weights, make-shards, presets.

Every subcommand parses flags and calls the library; errors a user can fix end in one line
on stderr and exit code 2, never a traceback (:mod:`simfeatup.entry`). segment and evaluate
live in :mod:`simfeatup.cli_segment`, compare in :mod:`simfeatup.cli_compare`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import batches, cli_compare, cli_segment, flags, scene_cli
from .constants import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .entry import UsageError, run_command, setup_logging

logger = logging.getLogger("simfeatup")


def _add_vocabulary_flags(p: argparse.ArgumentParser) -> None:
    # none of them: a fixed-vocabulary --onnx folder's classes (cli_segment checks)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help="dataset preset (see `simfeatup presets`): classes and thresholds")
    group.add_argument(
        "--classes", help='class lines, e.g. "building,roof;road;water" (; between classes, , between synonyms)'
    )
    group.add_argument("--classes-file", type=Path, help="text file with one class line per line")
    p.add_argument(
        "--prob-thd",
        type=flags.probability,
        help="below this class probability (0..1) a pixel becomes --bg-idx (preset value, else 0)",
    )
    p.add_argument(
        "--bg-idx", type=flags.index, help="class index used where no class is confident (preset value, else 0)"
    )
    p.add_argument(
        "--lam", type=flags.finite, help="weight of the [CLS] similarity in the logits (preset value, else -0.3)"
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upsampler", default=None, help="SimFeatUp artefact (.safetensors or its .json), or 'bilinear' (default)"
    )
    p.add_argument(
        "--onnx", type=Path, help="model folder from export/to_onnx.py: run with onnxruntime instead of torch"
    )
    p.add_argument(
        "--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
        help="with --onnx: what runs the model folder (openvino: pip install 'simfeatup[openvino]')",
    )
    p.add_argument(
        "--precision", choices=["f32", "bf16"],
        help="with --runtime openvino: the image graph's precision (default f32; bf16 on CPUs with bf16 units)",
    )
    p.add_argument(
        "--model",
        help="open_clip model name, or a model config .json in open_clip's model_configs format "
        f"(default: the upsampler's backbone, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--pretrained",
        help="open_clip weights tag or local weights file; a model config needs a file "
        f"(default: the upsampler's, else {DEFAULT_PRETRAINED})",
    )
    p.add_argument("--attention", help="last-block attention: segearth (default), clearclip, sclip, maskclip, vanilla")
    p.add_argument("--batch-size", type=int, default=2, help="images whose windows are batched together (default 2)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if present), cpu, cuda, cuda:1 ... (torch device, or with --onnx the onnxruntime provider)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: float32 on CPU, float16 on CUDA; bfloat16 casts the image tower only (CPUs with bf16 units)",
    )
    p.add_argument(
        "--threads", type=flags.count,
        help="CPU threads of the model (torch, onnxruntime or OpenVINO; default: theirs, one per core): "
        "set it to the cores you were given on a shared node",
    )
    p.add_argument("--bands", help="for multi-band images: the 0-based bands that are R,G,B, e.g. 3,2,1")
    p.add_argument(
        "--stretch",
        default="percentile",
        type=_stretch,
        help="how 16-bit/float images become 8-bit: percentile (2-98%%, default), minmax, "
        "or the value that maps to 255 (e.g. 2047)",
    )


def _stretch(text: str):
    if text in ("percentile", "minmax"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use percentile, minmax or a number") from None


def _parser() -> argparse.ArgumentParser:
    parser = flags.Parser(
        prog="simfeatup",
        description="Training-free open-vocabulary segmentation of remote-sensing images (SegEarth-OV + SimFeatUp).",
        epilog="`simfeatup COMMAND --help` gives a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # -v after the subcommand too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")

    p = sub.add_parser("segment", parents=[common], help="segment images with class names typed on the command line")
    p.add_argument("images", nargs="+", type=Path, help="jpg/png/tif images, or folders of them")
    _add_vocabulary_flags(p)
    p.add_argument("--out", type=Path, required=True, help="output folder for <image>.png label maps")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write <image>_overlay.jpg: labels blended over the image, a legend below (scenes: decimated "
        "to a viewable size)",
    )
    p.add_argument(
        "--save-probs",
        action="store_true",
        help="also write <image>_probs.npy, (K, H, W) float16 class probabilities (scenes: <image>_probs.tif, "
        "one scaled uint8 band per class)",
    )
    _add_model_flags(p)
    batches.add_flags(p)
    scene_cli.add_flags(p)
    p.set_defaults(func=cli_segment.segment)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="score segmentations against ground-truth labels (IoU over the whole dataset, SPEC 6)",
    )
    p.add_argument("images", nargs="+", type=Path, help="jpg/png/tif images, or folders of them")
    p.add_argument(
        "--labels",
        type=Path,
        nargs="+",
        required=True,
        help="label folder(s), searched in order for <image stem><--label-suffix>.png/.tif/.tiff/.bmp",
    )
    p.add_argument(
        "--label-suffix",
        default="",
        help="label file name = image stem + this (e.g. _label, or --label-suffix=-gt); default none",
    )
    p.add_argument(
        "--image-suffix",
        default="",
        help="strip this from image stems first (e.g. _sat for DeepGlobe's x_sat.jpg -> x_mask.png)",
    )
    _add_vocabulary_flags(p)
    p.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        help="label 0 is no-data, the others shift down by 1 (default: the preset's, e.g. LoveDA)",
    )
    p.add_argument(
        "--binary-255",
        action=argparse.BooleanOptionalAction,
        help="labels are 0/255 masks: 255 is the second class, not ignored (default: the preset's)",
    )
    p.add_argument(
        "--foreground-iou",
        action=argparse.BooleanOptionalAction,
        help="report the second class's IoU instead of mIoU: single-class sets (default: the preset's)",
    )
    p.add_argument("--report", type=Path, help="also write the scores as JSON to this file")
    _add_model_flags(p)
    p.set_defaults(func=cli_segment.evaluate)

    p = sub.add_parser(
        "compare", parents=[common], help="image | bilinear | SimFeatUp side by side: what the upsampler changes"
    )
    p.add_argument("images", nargs="+", type=Path, help="jpg/png/tif images, or folders of them")
    _add_vocabulary_flags(p)
    p.add_argument("--out", type=Path, required=True, help="output folder for <image>_compare.jpg pictures")
    _add_model_flags(p)
    p.add_argument(
        "--onnx-bilinear", type=Path,
        help="with --onnx: a model folder exported from the same backbone with --upsampler bilinear",
    )
    p.set_defaults(func=cli_compare.compare)

    p = sub.add_parser(
        "convert-weights", parents=[common], help="import the authors' released SimFeatUp checkpoint as safetensors"
    )
    p.add_argument(
        "src",
        type=Path,
        help="Lightning checkpoint (e.g. xclip_jbu_one_million_aid.ckpt), bare upsampler state dict, "
        "safetensors, or our artefact",
    )
    p.add_argument("dst", type=Path, help="output .safetensors (a .json with its config is written beside it)")
    p.add_argument(
        "--model",
        help="backbone the weights were trained for: open_clip name or model config .json, recorded with its "
        f"patch size (default: the source artefact's, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--pretrained",
        help="its weights tag or file, recorded by name and sha256 "
        f"(default: the source artefact's, else {DEFAULT_PRETRAINED})",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "make-shards", parents=[common], help="pack folders of images into WebDataset shards for training"
    )
    p.add_argument("sources", nargs="+", type=Path, help="image folders (searched recursively) or files")
    p.add_argument("pattern", help="output shard pattern, e.g. shards/train-%%06d.tar")
    p.add_argument("--maxcount", type=int, default=1000, help="images per shard at most (default 1000)")
    p.add_argument("--maxsize", type=float, default=3e9, help="bytes per shard at most (default 3e9)")
    p.set_defaults(func=_make_shards)

    p = sub.add_parser(
        "presets", parents=[common], help="list the dataset presets and their classes, or show one in full"
    )
    p.add_argument("name", nargs="?", help="a preset to show: its class lines, thresholds and label notes")
    p.set_defaults(func=_presets)
    return parser


def _convert(args) -> int:
    from .convert import convert_checkpoint

    convert_checkpoint(args.src, args.dst, model=args.model, pretrained=args.pretrained)
    logger.info("wrote %s (+ %s)", args.dst, args.dst.with_suffix(".json"))
    return 0


def _make_shards(args) -> int:
    from .shards import make_shards

    summary = make_shards(args.sources, args.pattern, maxcount=args.maxcount, maxsize=int(args.maxsize))
    logger.info("%s", summary.describe())
    if summary.written == 0:
        raise UsageError(f"no images written from {', '.join(map(str, args.sources))}: nothing readable was found")
    return 0


def _presets(args) -> int:
    from . import presets

    if args.name is not None:
        sys.stdout.write(_preset_details(presets.load(args.name)))
        return 0
    for key in presets.available():
        preset = presets.load(key)
        names = ", ".join(line.split(",")[0] for line in preset.classes)  # a class line's first synonym names it
        sys.stdout.write(f"{key:14s} {len(preset.classes):2d} classes: {names}\n")
    return 0


def _preset_details(preset) -> str:
    """`simfeatup presets NAME`: every class line with its index, the scoring values, the label notes."""
    lines = [f"{preset.name} (--preset {preset.key})", "classes (index: class line, commas between synonyms):"]
    lines += [f"  {i:2d}: {line}" for i, line in enumerate(preset.classes)]
    background = preset.classes[preset.bg_idx]
    lines.append(f"prob_thd {preset.prob_thd}  bg_idx {preset.bg_idx} ({background})  lam {preset.lam}")
    flags = [f"--{'' if on else 'no-'}{key.replace('_', '-')}" for key, on in preset.labels.items() if key != "note"]
    if flags:  # what `evaluate --preset` applies to the labels
        lines.append(f"evaluate's label notes: {' '.join(flags)} ({preset.labels.get('note', '')})")
    return "\n".join(lines) + "\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simfeatup")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        return "unknown (not installed)"


def _what_needs_it(args) -> str:
    if args.command == "segment":
        return "segment --onnx" if args.onnx else "segmenting with PyTorch (without --onnx)"
    return args.command


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `simfeatup`: the commands, not one error line
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(
        f"simfeatup {args.command}", lambda: args.func(args), needs=_what_needs_it(args), verbose=args.verbose
    )


if __name__ == "__main__":
    sys.exit(main())
