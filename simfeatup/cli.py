"""`simfeatup` command line: segment, convert-weights, make-shards, presets.

Every subcommand parses flags and calls the library; errors a user can fix end in one line
on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from . import scene_cli
from .constants import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .entry import run_command, setup_logging

logger = logging.getLogger("simfeatup")


class UsageError(ValueError):
    """A command-line mistake; its message is shown as is."""


def _add_vocabulary_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="dataset preset (see `simfeatup presets`): classes and thresholds")
    group.add_argument(
        "--classes", help='class lines, e.g. "building,roof;road;water" (; between classes, , between synonyms)'
    )
    group.add_argument("--classes-file", type=Path, help="text file with one class line per line")
    p.add_argument(
        "--prob-thd",
        type=_probability,
        help="below this class probability (0..1) a pixel becomes --bg-idx (preset value, else 0)",
    )
    p.add_argument("--bg-idx", type=_index, help="class index used where no class is confident (preset value, else 0)")
    p.add_argument("--lam", type=_finite, help="weight of the [CLS] similarity in the logits (preset value, else -0.3)")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _probability(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability: give a value in [0, 1]")
    return value


def _index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: class indices start at 0")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upsampler", default=None, help="SimFeatUp artefact (.safetensors or its .json), or 'bilinear' (default)"
    )
    p.add_argument(
        "--onnx", type=Path, help="model folder from export/to_onnx.py: run with onnxruntime instead of torch"
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
        help="auto: float32 on CPU, float16 on CUDA",
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
    parser = argparse.ArgumentParser(prog="simfeatup", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # -v after the subcommand too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")

    p = sub.add_parser("segment", parents=[common], help="segment images with class names typed on the command line")
    p.add_argument("images", nargs="+", type=Path, help="jpg/png/tif images, or folders of them")
    _add_vocabulary_flags(p)
    p.add_argument("--out", type=Path, required=True, help="output folder for <image>.png label maps")
    p.add_argument(
        "--overlay", action="store_true", help="also write <image>_overlay.jpg (labels blended over the image)"
    )
    p.add_argument(
        "--save-probs", action="store_true", help="also write <image>_probs.npy (K, H, W) class probabilities"
    )
    _add_model_flags(p)
    scene_cli.add_flags(p)
    p.set_defaults(func=_segment)

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
    p.set_defaults(func=_evaluate)

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

    p = sub.add_parser("presets", parents=[common], help="list the dataset presets")
    p.set_defaults(func=_presets)
    return parser


def _vocabulary_and_scoring(args):
    from . import presets
    from .scores import Scoring
    from .vocabulary import Vocabulary

    preset = presets.load(args.preset) if args.preset else None
    if preset is not None:
        vocabulary = Vocabulary.from_lines(preset.classes)
    elif args.classes is not None:
        vocabulary = Vocabulary.from_spec(args.classes)
    else:
        vocabulary = Vocabulary.from_file(args.classes_file)
    scoring = Scoring.resolve(
        preset, lam=args.lam, prob_thd=args.prob_thd, bg_idx=args.bg_idx
    )  # flags checked by argparse
    if scoring.bg_idx >= len(vocabulary):
        raise UsageError(
            f"--bg-idx {scoring.bg_idx} is not a class index: "
            f"there are {len(vocabulary)} classes (0..{len(vocabulary) - 1})"
        )
    return vocabulary, scoring


def _output_names(images: list[Path]) -> list[str]:
    stems = [image.stem for image in images]
    seen = {}
    for image, stem in zip(images, stems):
        if stem in seen and seen[stem] != image:
            raise UsageError(
                f"{seen[stem]} and {image} would both be written as {stem}.png: rename one or segment them separately"
            )
        seen[stem] = image
    return stems


def _inputs(args):
    """What segment and evaluate share: image files, vocabulary, scoring settings, band choice."""
    from . import imaging

    missing = [str(p) for p in args.images if not p.exists()]
    if missing:
        raise UsageError(f"image not found: {', '.join(missing)}")
    images = imaging.list_images(args.images)
    if not images:
        raise UsageError(
            f"no {'/'.join(imaging.IMAGE_SUFFIXES)} images in {', '.join(map(str, args.images))} "
            "(folders are not searched recursively)"
        )
    vocabulary, scoring = _vocabulary_and_scoring(args)
    try:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else (0, 1, 2)
    except ValueError:
        raise UsageError(f"--bands {args.bands!r}: give three 0-based band indices, e.g. 3,2,1") from None
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    return images, vocabulary, scoring, bands


def _run_batches(args, segmenter, images, vocabulary, scoring, bands, *, desc, on_error=None, return_probs=False):
    """Yield (index, image array, Segmentation) per image, ``--batch-size`` images at a time.

    The queries are encoded once. An unreadable image goes to ``on_error(path, err)`` when
    given, else stops the run.
    """
    from tqdm import tqdm

    from . import imaging

    text = segmenter.encode_queries(vocabulary.queries)
    with tqdm(total=len(images), desc=desc, unit="img") as bar:
        for start in range(0, len(images), args.batch_size):
            loaded = []
            for i in range(start, min(start + args.batch_size, len(images))):
                try:
                    image = imaging.load_image(images[i], bands=bands, stretch=args.stretch)
                    imaging.check_size(image, segmenter.patch_size, images[i])
                    loaded.append((i, image))
                except imaging.ImageError as err:
                    if on_error is None:
                        raise
                    on_error(images[i], err)
                    bar.update(1)
            if not loaded:
                continue
            results = segmenter.segment(
                [image for _, image in loaded], vocabulary, scoring=scoring, text=text, return_probs=return_probs
            )
            for (i, image), result in zip(loaded, results):
                yield i, image, result
                bar.update(1)


def _segment(args) -> int:
    from . import atomic, visualize

    images, vocabulary, scoring, bands = _inputs(args)
    stems = _output_names(images)
    scenes = scene_cli.pick_scenes(args, images, bands if args.bands else None)
    pictures = [i for i, path in enumerate(images) if path not in scenes]
    segmenter = _segmenter(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(args.out)  # what a killed earlier run left half-written
    colours = visualize.palette(len(vocabulary))
    legend = [
        {"index": k, "class": line, "color": colours[k].tolist()}
        for k, line in enumerate(",".join(c) for c in vocabulary.classes)
    ]
    (args.out / "classes.json").write_text(json.dumps(legend, indent=2) + "\n")

    failed = []

    def skip(path, err):
        logger.error("skipped: %s", err)
        failed.append(path)

    pictures_only = [images[i] for i in pictures]
    batches = (
        _run_batches(args, segmenter, pictures_only, vocabulary, scoring, bands, desc="segment", on_error=skip,
                     return_probs=args.save_probs)
        if pictures else ()
    )
    for j, image, result in batches:
        name = stems[pictures[j]]
        visualize.save_atomic(visualize.label_image(result.labels, colours), args.out / f"{name}.png")
        if args.overlay:
            visualize.save_atomic(visualize.overlay(image, result.labels, colours), args.out / f"{name}_overlay.jpg")
        if args.save_probs:
            import numpy as np

            from .atomic import atomic_write

            with atomic_write(args.out / f"{name}_probs.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, result.probs.astype(np.float16))
    failed += scene_cli.segment_scenes(args, segmenter, scenes, dict(zip(images, stems)), vocabulary, scoring, bands if args.bands else None)
    done = len(images) - len(failed)
    logger.info("wrote %d label map(s) to %s (legend: %s)", done, args.out, args.out / "classes.json")
    if failed:
        raise UsageError(f"{len(failed)} of {len(images)} image(s) could not be segmented (see the messages above)")
    return 0


def _evaluate(args) -> int:
    from tqdm import tqdm

    from . import evaluation

    images, vocabulary, scoring, bands = _inputs(args)
    preset_labels = None
    if args.preset:
        from . import presets

        preset_labels = presets.load(args.preset).labels
    notes = evaluation.LabelNotes.resolve(
        preset_labels,
        reduce_zero_label=args.reduce_zero_label,
        binary_255=args.binary_255,
        foreground_iou=args.foreground_iou,
    )
    if args.report is not None and args.report.is_dir():
        raise UsageError(f"--report {args.report} is a folder: give a file name, e.g. {args.report / 'report.json'}")
    dataset = evaluation.LabelledImages(
        images, args.labels, len(vocabulary), notes, suffix=args.label_suffix, image_suffix=args.image_suffix
    )
    # Every label is read and size-checked before the model loads: a bad label at image 900
    # must not cost 899 inferences.
    for i in tqdm(range(len(dataset)), desc="check labels", unit="label", leave=False):
        dataset.check(i)

    segmenter = _segmenter(args)
    iou = evaluation.IoU(len(vocabulary))
    for i, _, result in _run_batches(args, segmenter, dataset.images, vocabulary, scoring, bands, desc="evaluate"):
        iou.update(result.labels, dataset.label(i))
    if iou.confusion.sum() == 0:
        raise UsageError(
            "every label pixel is ignored (255, or 0 with --reduce-zero-label): nothing to score; check the label notes"
        )
    report = iou.summary(vocabulary.names, foreground_only=notes.foreground_iou)
    unlabelled = [name for name, count in zip(report.per_class, iou.confusion.sum(1)) if count == 0]
    if unlabelled:
        logger.warning(
            "no labelled pixels of %s in the whole dataset%s",
            ", ".join(unlabelled),
            " (0/255 masks need --binary-255: 255 is otherwise ignored)"
            if len(vocabulary) == 2 and not notes.binary_255
            else "",
        )
    sys.stdout.write(report.table() + "\n")
    if args.report:
        from dataclasses import asdict

        from .atomic import atomic_write

        record = {
            **report.as_dict(),
            "images": len(dataset),
            "preset": args.preset,
            "classes": [",".join(c) for c in vocabulary.classes],
            "settings": scoring.as_dict(),
            "label_notes": asdict(notes),
            "model": segmenter.describe(),
        }
        with atomic_write(args.report) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
        logger.info("wrote %s", args.report)
    return 0


def _segmenter(args):
    """The one segmenter a run uses: onnxruntime over ``--onnx DIR``, else torch."""
    if args.onnx:
        from .runtime import OnnxSegmenter, providers_for_device

        for flag in ("upsampler", "model", "pretrained", "attention"):
            if getattr(args, flag):
                raise UsageError(
                    f"--{flag} does not apply with --onnx: the model folder fixes it (re-export to change it)"
                )
        if args.dtype != "auto":
            raise UsageError(
                "--dtype does not apply with --onnx: the precision was fixed at export (export/to_onnx.py --dtype)"
            )
        return OnnxSegmenter(args.onnx, providers=providers_for_device(args.device))

    import torch

    from .segmenter import build_segmenter

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    segmenter = build_segmenter(
        args.upsampler,
        model=args.model,
        pretrained=args.pretrained,
        attention=args.attention,
        device=device,
        dtype=dtype,
    )
    if segmenter.upsampler is None:
        logger.info("no SimFeatUp weights given (--upsampler): using the bilinear baseline")
    return segmenter


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

    for key in presets.available():
        preset = presets.load(key)
        sys.stdout.write(
            f"{key:14s} {len(preset.classes):2d} classes  prob_thd {preset.prob_thd:<4}  "
            f"bg_idx {preset.bg_idx}  lam {preset.lam}\n"
        )
    return 0


def _what_needs_it(args) -> str:
    if args.command == "segment":
        return "segment --onnx" if args.onnx else "segmenting with PyTorch (without --onnx)"
    return args.command


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(
        f"simfeatup {args.command}", lambda: args.func(args), needs=_what_needs_it(args), verbose=args.verbose
    )


if __name__ == "__main__":
    sys.exit(main())
