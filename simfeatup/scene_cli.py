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

from . import flags
from .constants import DEFAULT_BLOCK, LONG_SIDE, STRIDE
from .scene_outputs import scene_output_paths, scene_outputs, write_scene

logger = logging.getLogger("simfeatup")

# TIFF tags that make a TIFF a GeoTIFF: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)


def add_flags(p: argparse.ArgumentParser) -> None:
    flags.either_switch(
        p,
        {
            "--scene": "segment every input as a scene: native resolution, block by block, labels as a "
            f"georeferenced <image>.tif (the default for GeoTIFFs larger than {LONG_SIDE} px)",
            "--image-mode": f"segment every input as the paper does (long side resized to {LONG_SIDE}), GeoTIFFs too",
        },
    )
    p.add_argument(
        "--block",
        type=_block,
        default=DEFAULT_BLOCK,
        help=f"scene mode: side of the blocks read and segmented at a time, a multiple of {STRIDE} (default "
        f"{DEFAULT_BLOCK}); memory grows with it, the labels do not change",
    )
    p.add_argument(
        "--require-crs",
        action="store_true",
        help="refuse scenes without a coordinate reference system (default: warn and write their labels without one)",
    )
    p.add_argument(
        "--vector",
        choices=("gpkg", "geojson"),
        help="scene mode: also write one polygon per connected region of a class, as <image>.gpkg (the scene's "
        "CRS) or <image>.geojson (RFC 7946, longitude/latitude)",
    )
    p.add_argument(
        "--min-area",
        type=flags.not_negative,
        default=0.0,
        help="with --vector: drop regions smaller than this, in m2 (projected CRS), square degrees (geographic) "
        "or pixels (no CRS); default 0",
    )
    p.add_argument(
        "--simplify",
        type=flags.not_negative,
        default=0.0,
        metavar="TOLERANCE",
        help="with --vector: simplify the polygons by this tolerance in CRS units, neighbours keeping their shared "
        "borders (default 0: pixel edges)",
    )
    resolution = p.add_mutually_exclusive_group()
    resolution.add_argument(
        "--gsd",
        type=flags.positive,
        metavar="METRES",
        help="scene mode: resample every scene to this ground sample distance (pixel size in metres; needs a "
        "projected CRS) before segmenting; labels come out at it",
    )
    resolution.add_argument(
        "--scale",
        type=flags.positive,
        metavar="S",
        help="scene mode: resample every scene by S (0.5: half the pixels per side) before segmenting",
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


def scene_scale(args, reader) -> tuple[float, float] | None:
    """(y, x) factors by which ``--gsd`` / ``--scale`` resample ``reader`` (SPEC 9), None for native resolution.

    ``--gsd`` needs the raster's pixel size in metres: without it, one line says to use ``--scale``.
    """
    if args.scale is not None:
        return args.scale, args.scale
    if args.gsd is None:
        return None
    from . import geo

    try:
        size_y, size_x = geo.pixel_size_m(reader.crs, reader.transform)
    except ValueError as err:
        raise ValueError(
            f"--gsd {args.gsd:g}: {reader.path} {err}, so its pixel size in metres is unknown: use --scale S "
            "instead (S = its pixel size / the one wanted; 0.5 halves the pixels per side)"
        ) from None
    return size_y / args.gsd, size_x / args.gsd


def working_scene(args, raster):
    """``raster`` resampled by :func:`scene_scale` (a :class:`simfeatup.resample.ResampledScene`), or
    ``raster`` itself at native resolution; and the resolution in words, for the log."""
    from . import geo
    from .resample import ResampledScene, scaled_size

    try:
        size_y, size_x = geo.pixel_size_m(raster.crs, raster.transform)
    except ValueError:
        size_y = size_x = None
    scale = scene_scale(args, raster)
    height, width = (raster.height, raster.width) if scale is None else scaled_size(raster.height, raster.width, *scale)
    if (height, width) == (raster.height, raster.width):
        reader, words = raster, "native resolution"
    else:
        reader, words = ResampledScene(raster, height, width), f"scale {scale[1]:g}"
    if size_x is not None:  # the working GSD, per axis when the pixels are not square
        gsd_y, gsd_x = size_y * raster.height / height, size_x * raster.width / width
        gsd = f"{gsd_x:.3g}" if f"{gsd_x:.3g}" == f"{gsd_y:.3g}" else f"{gsd_x:.3g} x {gsd_y:.3g}"
        words += f", GSD {gsd} m"
    return reader, words


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


def pick_scenes(args, images: list[Path]) -> list[Path]:
    """The inputs to segment in scene mode (``--scene``, else large GeoTIFFs; none with ``--image-mode``).

    Reads TIFF headers only; :func:`check_scenes` opens them."""
    from . import imaging

    _check_vector_flags(args)
    if args.image_mode:
        _warn_no_polygons(args, images)
        return []
    scenes, small = [], []
    for path in images:
        if args.scene:
            scenes.append(path)
            continue
        if not is_geotiff(path):
            continue
        try:
            height, width = imaging.image_size(path)
        except imaging.ImageError:
            continue  # image mode reports it with the other unreadable inputs
        if max(height, width) <= LONG_SIDE:
            small.append(path)
            continue
        logger.info(
            "%s: a %dx%d GeoTIFF, larger than the working size %d: scene mode at %s "
            "(--image-mode for the paper's mode)",
            path.name,
            width,
            height,
            LONG_SIDE,
            "native resolution" if args.gsd is None and args.scale is None else "the --gsd / --scale resolution",
        )
        scenes.append(path)
    if small:  # the paper's image mode: resized to the working size and back, written as a plain picture
        logger.info("%d GeoTIFF(s) no larger than the working size %d (e.g. %s) are segmented in image mode: their "
                    "label maps carry no georeferencing (--scene segments them as scenes, at native resolution, "
                    "georeferencing kept)", len(small), LONG_SIDE, small[0].name)
    _warn_no_polygons(args, [p for p in images if p not in scenes])
    if (args.gsd is not None or args.scale is not None) and len(scenes) < len(images):
        logger.warning(
            "--gsd and --scale apply to scenes only: %d image(s) are segmented at the working size %d",
            len(images) - len(scenes),
            LONG_SIDE,
        )
    return scenes


def check_scenes(args, scenes: list[Path], names: dict[Path, str], bands) -> list[tuple[Path, Exception]]:
    """Open each scene and check its bands before the model loads; returns the unreadable ones.

    A band choice that does not fit stops the run here; the caller reports each unreadable
    scene (path, error) in one line and segments the others. Damage past the header is found
    when its blocks are read.

    ``bands``: 0-based (R, G, B) from ``--bands``, or None for the rasters' own colour tags.
    """
    unreadable = []
    for path in scenes:
        err = _check(path, bands, scene_output_paths(args, names[path]), args)
        if err is not None:
            unreadable.append((path, err))
    return unreadable


def _check_vector_flags(args) -> None:
    """--min-area and --simplify need --vector; --vector needs shapely and pyogrio (the geo extra)."""
    from .extras import missing_extra

    if not args.vector:
        if args.min_area or args.simplify:
            raise ValueError("--min-area and --simplify shape polygons: add --vector gpkg or --vector geojson")
        return
    try:
        import pyogrio  # noqa: F401
        import shapely  # noqa: F401
    except ModuleNotFoundError as err:
        message = missing_extra(err, "--vector")
        if message is None:
            raise
        raise ValueError(message) from None


def _warn_no_polygons(args, pictures: list[Path]) -> None:
    if args.vector and pictures:
        logger.warning("--vector writes polygons for scenes only: %d image(s) in image mode get none (--scene makes "
                       "them scenes)", len(pictures))


def _check(path: Path, bands, targets: list[Path], args) -> Exception | None:
    from .extras import missing_extra

    if any(target.resolve() == path.resolve() for target in targets):
        raise ValueError(f"{path}'s labels would overwrite it: choose another --out folder")
    try:
        from . import geo

        with geo.RasterScene(path, bands=bands) as reader:
            scene_scale(args, reader)  # a --gsd that cannot apply stops the run here, not after the model loads
            if args.vector == "geojson" and not reader.georeferenced:
                raise ValueError(f"{path} has no CRS and GeoJSON is longitude/latitude (RFC 7946): use --vector gpkg "
                                 "for polygons in the raster's own coordinates")
    except geo.BandsError:
        raise
    except geo.SceneError as err:
        return err  # unreadable: reported with the other unusable inputs
    except ModuleNotFoundError as err:
        message = missing_extra(err, f"scene mode ({path.name})")
        if message is None:
            raise
        raise ValueError(f"{message}; or --image-mode to segment it as a picture") from None
    return None


def _check_georeferencing(args, reader, target: Path) -> None:
    """Refuse what the label raster could not carry over; without a CRS: warn, or refuse with ``--require-crs``.

    The label raster reuses the scene's CRS and geotransform as they are (same pixel grid, scale 1),
    so rotated and skewed geotransforms are kept exactly; ground control points and RPCs are not."""
    from .scene import SceneError

    if reader.ground_control:
        raise SceneError(
            f"{reader.path} is located by {reader.ground_control}, not a geotransform, and its label raster could "
            "not carry them: warp it to a grid first (gdalwarp), or --image-mode"
        )
    if reader.georeferenced:
        return
    if args.require_crs:
        raise SceneError(f"{reader.path} has no CRS (--require-crs): georeference it, or leave out --require-crs")
    logger.warning("%s has no CRS: %s is written without one", reader.path, target.name)


def segment_scenes(
    args, segmenter, scenes: list[Path], names: dict[Path, str], vocabulary, scoring, bands
) -> list[Path]:
    """Write ``--out/NAME.tif`` (and the other outputs asked for) for each scene; returns the scenes
    that could not be segmented (unreadable, no data, no CRS with ``--require-crs``: each logged in
    one line, the others still segmented)."""
    if not scenes:
        return []
    from tqdm import tqdm

    from . import geo, scene

    text = segmenter.query_embeddings(vocabulary)
    classes = [",".join(synonyms) for synonyms in vocabulary.classes]
    failed = []
    for i, path in enumerate(scenes, 1):
        step = f"scene {i}/{len(scenes)}"
        target = scene_output_paths(args, names[path])[0]
        try:
            with geo.gdal_cache(), geo.RasterScene(path, bands=bands, stretch=args.stretch) as raster:
                _check_georeferencing(args, raster, target)
                reader, resolution = working_scene(args, raster)
                if reader is not raster:
                    logger.info("%s: resampled from %dx%d to %dx%d (%s)", path.name, raster.width, raster.height,
                                reader.width, reader.height, resolution)
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
                with tqdm(total=total, desc=f"{step} {path.name}", unit="block") as bar:
                    write_scene(outputs, blocks, bar, path)
        except geo.SceneError as err:
            logger.error("%s skipped: %s", step, err)
            failed.append(path)
            continue
        logger.info(
            "%s: %s: %dx%d labels at %s in %s", step, path.name, reader.width, reader.height, resolution, target
        )
    return failed
