"""`simfeatup compare`: what the upsampler bought, per image, in one picture.

The same images, classes and scoring segmented twice, with bilinear upsampling (SPEC 2.4's
ablation) and with SimFeatUp; ``OUT/NAME_compare.jpg`` shows image | bilinear | SimFeatUp |
where they differ, captioned, above the legend (:func:`simfeatup.visualize.comparison`), and
the share of pixels whose label differs is printed per image. Torch: ``--upsampler`` and the
bilinear ablation of the same segmenter (one encoder, loaded once). ONNX: ``--onnx DIR`` (a
SimFeatUp export) and ``--onnx-bilinear DIR`` (an export of the same backbone with
``--upsampler bilinear``).
"""
from __future__ import annotations

import logging
import sys

from . import cli_segment, flags
from .entry import UsageError

logger = logging.getLogger("simfeatup")

SUFFIX = "_compare.jpg"  # JPEG like the overlays (visualize.JPEG_OPTIONS: full colour resolution)
RANDOM_NOTE = "random CLIP weights: these labels are meaningless (a check that the commands run)"
EXPORT_BILINEAR = "python export/to_onnx.py --upsampler bilinear --model M --pretrained W --out DIR"


def _check_flags(args) -> None:
    if args.onnx_bilinear is not None and args.onnx is None:
        raise UsageError("--onnx-bilinear needs --onnx DIR too: the SimFeatUp model folder to compare it with")
    if args.onnx is not None and args.onnx_bilinear is None:
        raise UsageError("--onnx DIR is compared with a bilinear export of the same backbone: "
                         f"give --onnx-bilinear DIR (made by `{EXPORT_BILINEAR}`)")
    if args.onnx is None and args.upsampler in (None, "bilinear"):
        raise UsageError("compare needs --upsampler ARTEFACT (the SimFeatUp weights to compare with bilinear), "
                         "or --onnx DIR --onnx-bilinear DIR")


def _segmenters(args):
    """(bilinear, SimFeatUp) segmenters that differ only in the upsampler."""
    upsampled = cli_segment._segmenter(args)
    if args.onnx is None:
        return upsampled.without_upsampler(), upsampled
    from .runtime import OnnxSegmenter, providers_for_device

    bilinear = OnnxSegmenter(args.onnx_bilinear, providers=providers_for_device(args.device), threads=args.threads)
    kinds = {flag: (seg.manifest.get("upsampler") or {}).get("kind")
             for flag, seg in (("--onnx", upsampled), ("--onnx-bilinear", bilinear))}
    if kinds["--onnx"] != "simfeatup":
        raise UsageError(f"--onnx {args.onnx} holds no SimFeatUp upsampler ({kinds['--onnx']}): give the folder "
                         "exported with --upsampler ARTEFACT")
    if kinds["--onnx-bilinear"] != "bilinear":
        raise UsageError(f"--onnx-bilinear {args.onnx_bilinear} is not a bilinear export ({kinds['--onnx-bilinear']}): "
                         f"make one with `{EXPORT_BILINEAR}`")
    differ = [key for key in ("model", "preprocessing", "dtype")
              if upsampled.manifest.get(key) != bilinear.manifest.get(key)]
    if differ:
        raise UsageError(f"--onnx {args.onnx} and --onnx-bilinear {args.onnx_bilinear} differ in {', '.join(differ)}: "
                         "export both from the same backbone and settings, so that only the upsampler differs")
    return bilinear, upsampled


def _random_backbone(segmenter) -> bool:
    """Whether the CLIP that runs has random weights (the offline demo): its labels mean nothing."""
    record = segmenter.describe()
    model = record["torch"] if "torch" in record else record.get("model") or {}
    return model.get("pretrained", "") is None


def compare(args) -> int:
    from . import atomic, visualize

    _check_flags(args)
    images, vocabulary, scoring, bands = cli_segment._inputs(args)
    names = dict(zip(images, cli_segment._output_names(images)))
    flags.check_output_folder(args.out, "--out")  # before the models load
    bilinear, upsampled = _segmenters(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(args.out)
    classes = [",".join(c) for c in vocabulary.classes]
    colours = visualize.palette(classes)
    note = RANDOM_NOTE if _random_backbone(upsampled) else None
    text = bilinear.encode_queries(vocabulary.queries) if args.onnx is None else None  # one encoder: one encoding

    failed, rows = [], []

    def skip(path, err):
        logger.error("skipped: %s", err)
        failed.append(path)

    for i, image, result in cli_segment._run_batches(args, upsampled, images, vocabulary, scoring, bands,
                                                     desc="compare", on_error=skip):
        [base] = bilinear.segment([image], vocabulary, scoring=scoring, text=text)
        share = visualize.differing(base.labels, result.labels)
        path = args.out / f"{names[images[i]]}{SUFFIX}"
        picture = visualize.comparison(image, base.labels, result.labels, classes, colours,
                                       note=f"{images[i].name}" + (f"  -  {note}" if note else ""))
        visualize.save_atomic(picture, path)
        logger.info("%s: %.1f %% of pixels labelled differently (%s)", images[i].name, 100 * share, path)
        rows.append((images[i].name, share, image.shape[0] * image.shape[1]))
    if rows:
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{'image':{width}s}  differ (bilinear vs SimFeatUp)"]
        lines += [f"{name:{width}s}  {100 * share:5.1f} %" for name, share, _ in rows]
        total = sum(n for _, _, n in rows)
        if len(rows) > 1:
            lines.append(f"{'all':{width}s}  {100 * sum(s * n for _, s, n in rows) / total:5.1f} %")
        sys.stdout.write("\n".join(lines) + "\n")
    logger.info("wrote %d comparison(s) to %s", len(rows), args.out)
    if failed:
        raise UsageError(f"{len(failed)} of {len(images)} image(s) could not be compared (see the messages above)")
    return 0
