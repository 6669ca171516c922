"""`simfeatup segment` and `simfeatup evaluate`: inputs, vocabulary and scoring from the flags,
one segmenter (torch or onnxruntime), images in batches, outputs written atomically."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from . import batches, scene_cli, scene_outputs
from .entry import UsageError

logger = logging.getLogger("simfeatup")


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


def _image_outputs(args, name: str) -> dict[str, Path]:
    """The files an input segmented as a picture is written to: its label map, and what the flags ask for."""
    files = {"labels": args.out / f"{name}.png"}
    if args.overlay:
        files["overlay"] = args.out / f"{name}_overlay.jpg"
    if args.save_probs:
        files["probs"] = args.out / f"{name}_probs.npy"
    return files


def _unfinished(args, images: list[Path], scenes: list[Path], names: dict[Path, str]):
    """``--skip-existing``: the inputs, and the scenes among them, some of whose outputs are missing."""
    scene_set = set(scenes)

    def planned(path: Path) -> list[Path]:
        if path in scene_set:
            return scene_outputs.scene_output_paths(args, names[path])
        return list(_image_outputs(args, names[path]).values())

    images = batches.unfinished(images, planned, args.out)
    left = set(images)
    return images, [path for path in scenes if path in left]


def segment(args) -> int:
    from . import atomic, visualize

    images, vocabulary, scoring, bands = _inputs(args)
    names = dict(zip(images, _output_names(images)))  # over all inputs: no two shards write one name
    images = batches.take_shard(images, batches.resolve_shard(args.shard_index, args.num_shards))
    classes = [",".join(c) for c in vocabulary.classes]
    _output_folder(args.out, "--out")  # before the model loads: a wrong path must not cost a model load
    batches.legend_to_write(args.out, classes, overwrite=args.overwrite)  # another run's legend: refused here
    scenes = scene_cli.pick_scenes(args, images)
    if args.skip_existing:
        images, scenes = _unfinished(args, images, scenes, names)
    if not images:  # an array task with no inputs left, or a finished batch
        if args.out.is_dir():
            batches.write_legend(args.out, classes, overwrite=args.overwrite)
        logger.info("nothing left to segment into %s", args.out)
        return 0
    scene_cli.check_scenes(args, scenes, names, bands if args.bands else None)
    segmenter = _segmenter(args)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a read-only file system, which the permission bits do not show
        raise UsageError(f"--out {args.out} cannot be created ({err.strerror}): choose another folder") from None
    atomic.remove_stale_temporaries(args.out)  # what a killed earlier run left half-written
    batches.write_legend(args.out, classes, overwrite=args.overwrite)
    colours = visualize.palette(classes)

    failed = []

    def skip(path, err):
        logger.error("skipped: %s", err)
        failed.append(path)

    scene_set = set(scenes)
    pictures = [path for path in images if path not in scene_set]
    segmented = (
        _run_batches(args, segmenter, pictures, vocabulary, scoring, bands, desc="segment", on_error=skip,
                     return_probs=args.save_probs)
        if pictures else ()
    )
    for j, image, result in segmented:
        files = _image_outputs(args, names[pictures[j]])
        visualize.save_atomic(visualize.label_image(result.labels, colours), files["labels"])
        if "overlay" in files:
            visualize.save_atomic(visualize.overlay(image, result.labels, classes, colours), files["overlay"])
        if "probs" in files:
            import numpy as np

            with atomic.atomic_write(files["probs"]) as tmp, open(tmp, "wb") as f:
                np.save(f, result.probs.astype(np.float16))
    scene_bands = bands if args.bands else None  # scenes pick R, G, B from their own band tags otherwise
    failed += scene_cli.segment_scenes(args, segmenter, scenes, names, vocabulary, scoring, scene_bands)
    done = len(images) - len(failed)
    logger.info("wrote %d label map(s) to %s (legend: %s)", done, args.out, args.out / batches.LEGEND)
    if failed:
        raise UsageError(f"{len(failed)} of {len(images)} image(s) could not be segmented (see the messages above)")
    return 0


def _output_folder(folder: Path, flag: str) -> None:
    """Say in one line why ``folder`` cannot hold outputs, before any slow work; creates nothing."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder: give a folder (it is created if missing)")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder} cannot be created in {existing} (not writable): choose another folder")


def evaluate(args) -> int:
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
    if args.report is not None:
        _output_folder(args.report.parent, "--report's folder")
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
    """The one segmenter a run uses: onnxruntime or OpenVINO over ``--onnx DIR``, else torch."""
    if not args.onnx and (args.runtime != "onnxruntime" or args.precision):
        raise UsageError("--runtime and --precision apply to a model folder: give --onnx DIR")
    if args.onnx and args.precision and args.runtime != "openvino":
        raise UsageError("--precision applies to --runtime openvino (onnxruntime runs the folder's own --dtype)")
    if args.onnx:
        for flag in ("upsampler", "model", "pretrained", "attention"):
            if getattr(args, flag):
                raise UsageError(
                    f"--{flag} does not apply with --onnx: the model folder fixes it (re-export to change it)"
                )
        if args.dtype != "auto":
            raise UsageError(
                "--dtype does not apply with --onnx: the precision was fixed at export (export/to_onnx.py --dtype)"
            )
        if args.runtime == "openvino":
            from .openvino_runtime import OpenVinoSegmenter, openvino_device

            try:
                device = openvino_device(args.device)
            except ValueError as err:
                raise UsageError(str(err)) from None
            return OpenVinoSegmenter(args.onnx, precision=args.precision or "f32", device=device)
        from .runtime import OnnxSegmenter, providers_for_device

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
