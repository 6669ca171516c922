"""`simfeatup segment` for scenes (SPEC 9): its flags, which inputs are scenes, their label rasters.

Scene mode is chosen with ``--scene``, and by default for georeferenced GeoTIFFs larger than
the working size; ``--image-mode`` keeps the paper's mode for everything. Each scene becomes
``NAME.tif`` in ``--out``: a Cloud-Optimised GeoTIFF of labels (:class:`simfeatup.geo.LabelRaster`);
``--save-probs`` adds ``NAME_probs.tif`` (:class:`simfeatup.geo.ProbRaster`), ``--overlay``
``NAME_overlay.jpg`` (:class:`simfeatup.visualize.SceneOverlay`).
Light at import (the parser adds the flags): numpy, rasterio and the model come in later.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .constants import DEFAULT_BLOCK, LONG_SIDE, STRIDE

logger = logging.getLogger("simfeatup")

# TIFF tags that make a TIFF a GeoTIFF: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)


def add_flags(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--scene",
        action="store_true",
        help="segment every input as a scene: native resolution, block by block, labels as a georeferenced "
        f"<image>.tif (the default for GeoTIFFs larger than {LONG_SIDE} px)",
    )
    mode.add_argument(
        "--image-mode",
        action="store_true",
        help=f"segment every input as the paper does (long side resized to {LONG_SIDE}), GeoTIFFs too",
    )
    p.add_argument(
        "--block",
        type=_block,
        default=DEFAULT_BLOCK,
        help=f"scene mode: side of the blocks read and segmented at a time, a multiple of {STRIDE} (default "
        f"{DEFAULT_BLOCK}); memory grows with it, the labels do not change",
    )


def _block(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < STRIDE or value % STRIDE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive multiple of the window stride {STRIDE}, e.g. {DEFAULT_BLOCK}"
        )
    return value


def is_geotiff(path: Path) -> bool:
    """Whether ``path`` is a TIFF with GeoTIFF georeferencing tags (read from its header, no rasterio)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            return any(code in tags for code in GEOTIFF_TAGS)
    except Exception:  # an unreadable file is image mode's to report, with the other bad images
        return False


def pick_scenes(args, images: list[Path], bands) -> list[Path]:
    """The inputs to segment in scene mode, each opened and its bands checked before the model loads.

    A band choice that does not fit stops the run here; an unreadable scene is reported when
    its turn comes, and the others are still segmented.

    ``bands``: 0-based (R, G, B) from ``--bands``, or None for the rasters' own colour tags.
    """
    from . import imaging

    if args.image_mode:
        return []
    scenes = []
    for path in images:
        if args.scene:
            scenes.append(path)
            continue
        if not is_geotiff(path):
            continue
        height, width = imaging.image_size(path)
        if max(height, width) > LONG_SIDE:
            logger.info(
                "%s: a georeferenced %dx%d raster, larger than the working size %d: scene mode at native "
                "resolution (--image-mode for the paper's mode)",
                path.name,
                width,
                height,
                LONG_SIDE,
            )
            scenes.append(path)
    for path in scenes:
        _check(path, bands, args.out)
    return scenes


def _check(path: Path, bands, out: Path) -> None:
    from .extras import missing_extra

    target = out / f"{path.stem}.tif"
    if target.resolve() == path.resolve():
        raise ValueError(f"{path}'s labels would overwrite it: choose another --out folder")
    try:
        from . import geo

        geo.RasterScene(path, bands=bands).close()
    except geo.BandsError:
        raise
    except geo.SceneError:
        return  # unreadable: segment_scenes reports it with the other failures
    except ModuleNotFoundError as err:
        message = missing_extra(err, f"scene mode ({path.name})")
        if message is None:
            raise
        raise ValueError(f"{message}; or --image-mode to segment it as a picture") from None


class _LabelOutput:
    """The label COG of a scene as a scene output: ``write(block)``, ``commit()``, ``abort()``."""

    needs_probs = False

    def __init__(self, target: Path, reader, classes: list[str], block: int):
        from . import geo

        self.path = target
        self._raster = geo.LabelRaster(
            target,
            height=reader.height,
            width=reader.width,
            crs=reader.crs,
            transform=reader.transform,
            classes=classes,
            block=block,
        )

    def write(self, b) -> None:
        self._raster.write(b.y0, b.y1, b.x0, b.x1, b.labels)

    def commit(self) -> None:
        self._raster.commit()

    def abort(self) -> None:
        self._raster.abort()


class _ProbsOutput:
    """``--save-probs``: a scene's class probabilities, a K-band uint8 COG (:class:`simfeatup.geo.ProbRaster`)."""

    needs_probs = True

    def __init__(self, target: Path, reader, classes: list[str], block: int):
        from . import geo

        self.path = target
        self._raster = geo.ProbRaster(
            target,
            height=reader.height,
            width=reader.width,
            crs=reader.crs,
            transform=reader.transform,
            classes=classes,
            block=block,
        )

    def write(self, b) -> None:
        self._raster.write_probs(b.y0, b.y1, b.x0, b.x1, b.probs, b.valid)

    def commit(self) -> None:
        self._raster.commit()

    def abort(self) -> None:
        self._raster.abort()


class _OverlayOutput:
    """``--overlay``: the scene decimated to a viewable size, labels blended, a legend below
    (:class:`simfeatup.visualize.SceneOverlay`); each block's RGB is read again from ``reader``."""

    needs_probs = False

    def __init__(self, target: Path, reader, classes: list[str]):
        from . import visualize

        self.path, self._reader = target, reader
        self._overlay = visualize.SceneOverlay(reader.height, reader.width, classes)

    def write(self, b) -> None:
        rgb, valid = self._reader.read(b.y0, b.y1, b.x0, b.x1)
        self._overlay.add(b.y0, b.x0, rgb, valid & b.valid, b.labels)

    def commit(self) -> None:
        from . import visualize

        visualize.save_atomic(self._overlay.image(), self.path)

    def abort(self) -> None:
        pass  # nothing is written before commit()


def scene_outputs(args, name: str, reader, classes: list[str]) -> list:
    """Every file a scene is written to, each an object with ``needs_probs``, ``write(block)``,
    ``commit()`` and ``abort()``; the label raster first. Nothing appears under a final name
    before ``commit()``."""
    outputs = [_LabelOutput(args.out / f"{name}.tif", reader, classes, args.block)]
    try:
        if args.save_probs:
            outputs.append(_ProbsOutput(args.out / f"{name}_probs.tif", reader, classes, args.block))
        if args.overlay:
            outputs.append(_OverlayOutput(args.out / f"{name}_overlay.jpg", reader, classes))
    except BaseException:  # the outputs already made hold staging files
        for output in outputs:
            output.abort()
        raise
    return outputs


def _write_scene(outputs: list, blocks, bar) -> None:
    """Feed every block to every output, then commit them all; on any error abort them all."""
    try:
        for b in blocks:
            for output in outputs:
                output.write(b)
            bar.update(1)
        for output in outputs:
            output.commit()
    except BaseException:
        for output in outputs:
            output.abort()
        raise


def segment_scenes(
    args, segmenter, scenes: list[Path], names: dict[Path, str], vocabulary, scoring, bands
) -> list[Path]:
    """Write ``--out/NAME.tif`` (and the other outputs asked for) for each scene; returns the
    scenes that could not be read (each logged)."""
    from tqdm import tqdm

    from . import geo, scene

    text = segmenter.query_embeddings(vocabulary)
    classes = [",".join(synonyms) for synonyms in vocabulary.classes]
    failed = []
    for path in scenes:
        target = args.out / f"{names[path]}.tif"
        try:
            with geo.RasterScene(path, bands=bands, stretch=args.stretch) as reader:
                if not reader.georeferenced:
                    logger.warning("%s has no CRS: %s is written without one", path, target.name)
                outputs = scene_outputs(args, names[path], reader, classes)
                blocks = scene.segment_scene(
                    segmenter,
                    reader,
                    vocabulary,
                    scoring,
                    text=text,
                    block=args.block,
                    return_probs=any(o.needs_probs for o in outputs),
                )
                total = len(scene.block_boxes(reader.height, reader.width, args.block))
                with tqdm(total=total, desc=path.name, unit="block") as bar:
                    _write_scene(outputs, blocks, bar)
        except geo.SceneError as err:
            logger.error("skipped: %s", err)
            failed.append(path)
            continue
        logger.info("%s: %dx%d labels at native resolution in %s", path.name, reader.width, reader.height, target)
    return failed
