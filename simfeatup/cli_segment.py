"""`simfeatup segment` and `simfeatup evaluate`: inputs, vocabulary and scoring from the flags,
one segmenter (torch or onnxruntime), images in batches, outputs written atomically."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from . import batches, flags, scene_cli, scene_outputs
from .entry import UsageError

logger = logging.getLogger("simfeatup")


def _vocabulary_and_scoring(args):
    from . import presets
    from .scores import Scoring
    from .vocabulary import Vocabulary

    baked = _baked_vocabulary(args)
    if baked is not None:
        vocabulary, scoring = baked
    else:
        preset = presets.load(args.preset) if args.preset else None
        if preset is not None:
            vocabulary = Vocabulary.from_lines(preset.classes)
        elif args.classes is not None:
            vocabulary = Vocabulary.from_spec(args.classes)
        elif args.classes_file is not None:
            vocabulary = Vocabulary.from_file(args.classes_file)
        else:
            raise UsageError("no classes: give --preset, --classes or --classes-file (or --onnx with a "
                             "fixed-vocabulary folder from export/to_onnx.py --classes/--preset)")
        scoring = Scoring.resolve(
            preset, lam=args.lam, prob_thd=args.prob_thd, bg_idx=args.bg_idx
        )  # flags checked by argparse
        for note in vocabulary.advice():
            logger.warning("%s", note)
    if scoring.bg_idx >= len(vocabulary):
        raise UsageError(
            f"--bg-idx {scoring.bg_idx} is not a class index: "
            f"there are {len(vocabulary)} classes (0..{len(vocabulary) - 1})"
        )
    return vocabulary, scoring


def _baked_vocabulary(args):
    """A fixed-vocabulary --onnx folder: its classes and scoring (flags may restate them, not change them)."""
    if not getattr(args, "onnx", None):
        return None
    from .model_folder import ModelFolderError, is_fixed, read_manifest
    from .scores import Scoring
    from .vocabulary import Vocabulary

    try:
        manifest = read_manifest(args.onnx, check_files=False)
    except ModelFolderError:
        return None  # the segmenter reports it
    if not is_fixed(manifest):
        return None
    from .runtime_fixed import fixed_vocabulary

    vocabulary, scoring = fixed_vocabulary(manifest)
    given = None
    if args.preset:
        from . import presets

        given = Vocabulary.from_lines(presets.load(args.preset).classes)
    elif args.classes is not None:
        given = Vocabulary.from_spec(args.classes)
    elif args.classes_file is not None:
        given = Vocabulary.from_file(args.classes_file)
    if given is not None and given.classes != vocabulary.classes:
        baked = ";".join(",".join(c) for c in vocabulary.classes)
        raise UsageError(f"{args.onnx} has a fixed vocabulary ({baked!r}): leave out --classes/--preset/"
                         "--classes-file, or export another folder for these classes")
    if args.lam is not None and args.lam != scoring.lam:
        raise UsageError(f"--lam {args.lam}: {args.onnx} was exported with lam {scoring.lam} baked in; "
                         "export another folder (export/to_onnx.py --lam) to change it")
    return vocabulary, Scoring.resolve(None, lam=scoring.lam, prob_thd=args.prob_thd if args.prob_thd is not None
                                       else scoring.prob_thd, bg_idx=args.bg_idx if args.bg_idx is not None
                                       else scoring.bg_idx)


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

    check_model_flags(args)
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
            started = time.perf_counter()
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
            logger.debug("read %d image(s) in %.2f s", len(loaded), time.perf_counter() - started)
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
    flags.check_output_folder(args.out, "--out")  # before the model loads: a wrong path must not cost a model load
    batches.legend_to_write(args.out, classes, overwrite=args.overwrite)  # another run's legend: refused here
    scenes = scene_cli.pick_scenes(args, images)
    if args.skip_existing:
        images, scenes = _unfinished(args, images, scenes, names)
    if not images:  # an array task with no inputs left, or a finished batch
        if args.out.is_dir():
            batches.write_legend(args.out, classes, overwrite=args.overwrite)
        logger.info("nothing left to segment into %s", args.out)
        return 0
    # Every input is checked before the model loads (headers only): a bad file must not cost a model load.
    unusable = scene_cli.check_scenes(args, scenes, names, bands if args.bands else None)
    scene_set = set(scenes)
    pictures = [path for path in images if path not in scene_set]
    unusable += _unusable_pictures(pictures, lambda: _patch_size(args))
    if len(unusable) == len(images) == 1:
        raise UsageError(str(unusable[0][1]))
    failed = []
    for path, err in unusable:
        logger.error("skipped: %s", err)
        failed.append(path)
    if len(failed) == len(images):
        raise UsageError(f"{len(failed)} of {len(images)} image(s) could not be segmented (see the messages above)")
    pictures = [path for path in pictures if path not in failed]
    scenes = [path for path in scenes if path not in failed]
    created = _make_folder(args.out)  # before the model loads too; removed again if it fails to load
    try:
        segmenter = _segmenter(args)
    except BaseException:
        _remove_empty(created)
        raise
    atomic.remove_stale_temporaries(args.out)  # what a killed earlier run left half-written
    batches.write_legend(args.out, classes, overwrite=args.overwrite)
    colours = visualize.palette(classes)

    def skip(path, err):
        logger.error("skipped: %s", err)
        failed.append(path)

    segmented = (
        _run_batches(args, segmenter, pictures, vocabulary, scoring, bands, desc="segment", on_error=skip,
                     return_probs=args.save_probs)
        if pictures else ()
    )
    for j, image, result in segmented:
        started = time.perf_counter()
        files = _image_outputs(args, names[pictures[j]])
        visualize.save_atomic(visualize.label_image(result.labels, colours), files["labels"])
        if "overlay" in files:
            visualize.save_atomic(visualize.overlay(image, result.labels, classes, colours), files["overlay"])
        if "probs" in files:
            import numpy as np

            with atomic.atomic_write(files["probs"]) as tmp, open(tmp, "wb") as f:
                np.save(f, result.probs.astype(np.float16))
        logger.debug("wrote %s in %.2f s", ", ".join(p.name for p in files.values()), time.perf_counter() - started)
    scene_bands = bands if args.bands else None  # scenes pick R, G, B from their own band tags otherwise
    failed += scene_cli.segment_scenes(args, segmenter, scenes, names, vocabulary, scoring, scene_bands)
    done = len(images) - len(failed)
    logger.info("wrote %d label map(s) to %s (legend: %s)", done, args.out, args.out / batches.LEGEND)
    if failed:
        raise UsageError(f"{len(failed)} of {len(images)} image(s) could not be segmented (see the messages above)")
    return 0


def _unusable_pictures(paths: list[Path], patch_size) -> list[tuple[Path, Exception]]:
    """(path, error) of each picture that is no readable image or is smaller than one patch, from its header.

    ``patch_size()`` is asked only when some picture is readable (it may import torch)."""
    from . import imaging

    bad, sizes = [], {}
    for path in paths:
        try:
            sizes[path] = imaging.check_file(path)
        except imaging.ImageError as err:
            bad.append((path, err))
    patch = patch_size() if sizes else None
    for path, (height, width) in sizes.items():
        try:
            imaging.check_sides(height, width, patch, path)
        except imaging.ImageError as err:
            bad.append((path, err))
    return sorted(bad, key=lambda item: paths.index(item[0]))


def _patch_size(args) -> int:
    """The patch size of the model this run will load, from its records alone: nothing is built or read in full."""
    if args.onnx:
        from .model_folder import read_manifest

        return int(read_manifest(args.onnx, check_files=False)["preprocessing"]["patch"])
    from .backbone import Backbone, is_config_file, read_config
    from .constants import DEFAULT_MODEL

    if args.model is not None:
        if is_config_file(args.model):
            return Backbone(config=read_config(args.model)).native_patch_size()
        return Backbone(model=str(args.model).replace("/", "-")).native_patch_size()
    if args.upsampler is not None and str(args.upsampler) != "bilinear":
        from .upsampler import read_info

        info = read_info(args.upsampler)
        if info["upsampler"].get("patch_size"):
            return int(info["upsampler"]["patch_size"])
        record = Backbone.from_dict(info.get("backbone"))
        if record.model is not None or record.config is not None:
            return record.native_patch_size()
    return Backbone(model=DEFAULT_MODEL).native_patch_size()


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` (and missing parents); returns what was created, deepest first."""
    created = []
    missing = folder
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a read-only file system, which the permission bits do not show
        raise UsageError(f"--out {folder} cannot be created ({err.strerror}): choose another folder") from None
    return created


def _remove_empty(created: list[Path]) -> None:
    """Undo :func:`_make_folder` for a run that ended before writing anything: a failed run leaves no empty folder."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty after all (another run wrote into it): keep it
            return


def evaluate(args) -> int:
    from tqdm import tqdm

    from . import evaluation, imaging

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
        flags.check_output_folder(args.report.parent, "--report's folder")
    dataset = evaluation.LabelledImages(
        images, args.labels, len(vocabulary), notes, suffix=args.label_suffix, image_suffix=args.image_suffix
    )
    # Every label is read, and every image header checked, before the model loads: a bad label
    # or image at image 900 must not cost 899 inferences.
    patch = _patch_size(args)
    for i in tqdm(range(len(dataset)), desc="check labels", unit="label", leave=False):
        imaging.check_sides(*imaging.check_file(dataset.images[i]), patch, dataset.images[i])
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
    started = time.perf_counter()
    segmenter = _build_segmenter(args)
    logger.debug("model loaded in %.1f s", time.perf_counter() - started)
    return segmenter


def check_model_flags(args) -> None:
    """Every model flag combination checked before any input is read or the model loads: a wrong
    flag must cost neither a pass over thousands of image headers nor a model load."""
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
        return
    device = _torch_device(args.device)  # an unusable --device fails here, before any image is read
    if args.dtype in ("bfloat16", "float16") and device == "cpu":
        from .hardware import cpu_dtype_advice

        advice = cpu_dtype_advice(args.dtype)
        # errors here; a warning comes from Segmenter.to_dtype once the model is on its device
        if advice and advice[0] == "error":
            raise UsageError(f"--dtype {args.dtype}: {advice[1]}")


def _torch_device(device: str) -> str:
    """--device for the torch path: auto is cuda when PyTorch sees one, else cpu; UsageError for a
    device this PyTorch cannot use (a deep RuntimeError at the model's first .to() otherwise)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device PyTorch knows: use auto, cpu, cuda or cuda:N") from None
    kind = parsed.type
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: PyTorch {torch.__version__} sees no CUDA GPU here (no GPU, no "
                             "driver, or a CPU-only build): use --device cpu, or auto")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: PyTorch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: this PyTorch has no usable Apple GPU (MPS): use --device cpu, or auto")
    elif kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: simfeatup runs on cpu, cuda or mps: use auto, cpu, cuda or cuda:N")
    return device


def _build_segmenter(args):
    if args.onnx:
        if args.runtime == "openvino":
            from .openvino_runtime import IMAGE_GRAPH_THREADS, OpenVinoSegmenter, openvino_device

            try:
                device = openvino_device(args.device)
            except ValueError as err:
                raise UsageError(str(err)) from None
            threads = args.threads or IMAGE_GRAPH_THREADS
            return OpenVinoSegmenter(args.onnx, precision=args.precision or "f32", device=device, threads=threads)
        from .runtime import providers_for_device
        from .runtime_fixed import open_model_folder

        return open_model_folder(args.onnx, providers=providers_for_device(args.device), threads=args.threads)

    import torch

    from .segmenter import build_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _torch_device(args.device)
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
