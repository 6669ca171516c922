"""Rasters in scene mode (SPEC 9): a windowed scene reader, the label and probability Cloud-Optimised GeoTIFFs.

rasterio is the ``geo`` extra (``pip install "simfeatup[geo]"``) and is imported inside the
functions, so the rest of simfeatup works without it. The reader never holds the whole scene:
blocks are read through windows, and the stretch statistics of 16-bit and float rasters come
once from a decimated read of the whole scene.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from . import atomic, imaging, visualize
from .constants import NODATA_LABEL
from .scene import SceneError

# The label COG's internal tile; overviews are added until one tile holds the whole level.
COG_TILE = 512
# GeoTIFF tiles are multiples of this (TIFF 6.0); stride-aligned blocks (112 = 7 x 16) are.
TIFF_TILE_MULTIPLE = 16
# The probability raster stores round(p * PROB_SCALE): 0..254, one step below its nodata 255.
PROB_SCALE = NODATA_LABEL - 1
# GDAL's raster block cache while a scene is read and written, in bytes (issue 9). GDAL's default,
# 5% of RAM, kept every decoded scene and label tile, so memory grew with the scene. A read
# decodes each tile it spans once whatever the cache, and label and probability tiles are the
# blocks, written whole; the cache only spares re-decoding the tiles that neighbouring blocks'
# reads share (their 112-pixel rims; ~8 ms per RGB 512-pixel tile on 2 loaded cores). 16 MiB
# holds a row of tiles of a block's read (2016 pixels at the default block: 5 RGB tiles,
# 3.75 MiB) four times over, about what a 2048^2 scene's tiles take anyway. A 64 MiB cap still
# left 4096^2 and 8192^2 at 1.2x the 2048^2 peak RSS (bench/scene.py).
GDAL_CACHE_BYTES = 16 << 20


@contextmanager
def gdal_cache():
    """GDAL's block cache capped at :data:`GDAL_CACHE_BYTES` inside the block, restored after.

    A ``GDAL_CACHEMAX`` of the user's (environment variable, or an enclosing ``rasterio.Env``)
    is kept. rasterio.Env sets the cache itself (GDALSetCacheMax64, in bytes), so the cap holds
    even after GDAL has sized its cache from the default.
    """
    import rasterio.env

    own = "GDAL_CACHEMAX" in os.environ or (rasterio.env.hasenv() and "GDAL_CACHEMAX" in rasterio.env.getenv())
    with nullcontext() if own else rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        yield


class BandsError(SceneError):
    """The bands that are R, G, B cannot be chosen: a setting to fix (``--bands``), found before any work."""


@contextmanager
def _quiet():
    """Silence rasterio's NotGeoreferencedWarning: a missing CRS is reported once, by the caller."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def choose_bands(colorinterp: list[str], bands, name) -> tuple[int, int, int]:
    """The 1-based band indexes that become R, G, B.

    ``bands``: 0-based (R, G, B) from ``--bands``, checked against the band count; else the
    file's colour interpretation (``colorinterp``: names such as "red", "alpha", one per band)
    when it names red, green and blue; else 3 data bands are R, G, B and 1 is grey. Alpha bands
    are masks, not colours. Anything else needs ``--bands``.
    """
    count = len(colorinterp)
    if bands is not None:
        bands = tuple(int(b) for b in bands)
        if len(bands) != 3 or not all(0 <= b < count for b in bands):
            raise BandsError(f"--bands {','.join(map(str, bands))} does not fit {name}, which has {count} band(s): "
                             f"give 3 indices in 0..{count - 1}")
        return tuple(b + 1 for b in bands)
    if all(c in colorinterp for c in ("red", "green", "blue")):
        return tuple(colorinterp.index(c) + 1 for c in ("red", "green", "blue"))
    if "palette" in colorinterp:
        raise BandsError(f"{name} is a palette (colour-mapped) raster: expand it to RGB first, "
                         "e.g. gdal_translate -expand rgb")
    data = [i + 1 for i, c in enumerate(colorinterp) if c != "alpha"]
    if len(data) == 3:
        return tuple(data)
    if len(data) == 1:
        return (data[0],) * 3
    raise BandsError(f"{name} has {count} bands and does not say which are red, green and blue: give --bands R,G,B "
                     f"(0-based), e.g. --bands 2,1,0 for a blue, green, red, near-infrared raster")


class RasterScene:
    """A raster file as a :class:`simfeatup.scene.SceneReader`: windowed reads, RGB uint8 + valid mask.

    ``bands``: 0-based (R, G, B) or None (see :func:`choose_bands`). ``stretch`` maps 16-bit and
    float data to 8 bits as :func:`simfeatup.imaging.stretch_limits` does, with statistics of the
    whole scene from one decimated read. Nodata comes from the raster's masks: its nodata value,
    internal mask or alpha band; a pixel is valid when it is valid in all three bands.
    """

    def __init__(self, path: str | Path, *, bands=None, stretch="percentile"):
        import rasterio
        from rasterio.errors import RasterioIOError

        self.path = Path(path)
        try:
            with _quiet():
                self._ds = rasterio.open(self.path)
        except RasterioIOError as err:
            raise SceneError(f"cannot read {self.path} as a raster: {str(err).splitlines()[0]}") from None
        try:
            ds = self._ds
            self.height, self.width = ds.height, ds.width
            self.crs, self.transform = ds.crs, ds.transform
            self.indexes = choose_bands([c.name for c in ds.colorinterp], bands, self.path)
            self.ground_control = None  # what locates a raster without CRS and geotransform (label rasters cannot)
            if self.crs is None and self.transform.is_identity:
                self.ground_control = "ground control points" if ds.gcps[0] else "RPCs" if ds.rpcs else None
        except BaseException:
            self._ds.close()
            raise
        self._stretch = None if all(ds.dtypes[i - 1] == "uint8" for i in self.indexes) else stretch
        self._limits = None  # computed at the first read: opening a scene to check it stays cheap

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    def _stretch_limits(self, stretch):
        """(lo, hi) per band from ~STATS_MAX_PIXELS pixels of the whole scene (SPEC 9: never per block)."""
        if not isinstance(stretch, str):  # a fixed stretch needs no statistics
            return imaging.stretch_limits(np.zeros((0, 3), np.float32), stretch)
        step = max(1, math.ceil(math.sqrt(self.height * self.width / imaging.STATS_MAX_PIXELS)))
        shape = (3, math.ceil(self.height / step), math.ceil(self.width / step))
        data = self._read(lambda: self._ds.read(self.indexes, out_shape=shape), "for the stretch statistics")
        valid = self._read(lambda: self._ds.read_masks(self.indexes, out_shape=shape), "for the stretch statistics")
        pixels = np.moveaxis(data, 0, -1)  # (h, w, 3)
        valid = (valid > 0).all(axis=0)
        return imaging.stretch_limits(pixels[valid] if valid.any() else pixels.reshape(-1, 3), stretch)

    def _read(self, read, where: str):
        from rasterio.errors import RasterioError

        try:
            return read()
        except RasterioError as err:
            detail = err.__cause__ or err  # "Read failed. See previous exception" hides GDAL's message there
            raise SceneError(
                f"cannot read {self.path} {where}: {str(detail).splitlines()[0]} (a damaged or truncated file?)"
            ) from None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows y0..y1-1, columns x0..x1-1 as (RGB uint8 (h, w, 3), valid bool (h, w))."""
        from rasterio.windows import Window

        if self._stretch is not None and self._limits is None:
            self._limits = self._stretch_limits(self._stretch)
        window = Window(x0, y0, x1 - x0, y1 - y0)
        where = f"(rows {y0}-{y1}, columns {x0}-{x1})"
        data = self._read(lambda: self._ds.read(self.indexes, window=window), where)
        masks = self._read(lambda: self._ds.read_masks(self.indexes, window=window), where)
        rgb = np.moveaxis(data, 0, -1)
        rgb = np.ascontiguousarray(rgb) if self._limits is None else imaging.apply_stretch(rgb, *self._limits)
        return rgb, (masks > 0).all(axis=0)

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> "RasterScene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pixel_size_m(crs, transform) -> tuple[float, float]:
    """(y, x) ground size of a pixel in metres, from a projected CRS and the geotransform.

    ValueError (a reason, without the file's name) when there is none: no CRS, no geotransform,
    a geographic CRS (pixel sizes in degrees) or a CRS whose units are unknown.
    """
    if crs is None:
        raise ValueError("has no CRS")
    if transform is None or transform.is_identity:
        raise ValueError("has no geotransform")
    if crs.is_geographic:
        raise ValueError(f"has a geographic CRS ({crs.to_string()}): its pixel sizes are in degrees, not metres")
    try:
        _, to_metres = crs.linear_units_factor
    except Exception:  # pyproj/GDAL raise their own types for CRSs without linear units
        raise ValueError(f"has a CRS ({crs.to_string()}) whose units are not lengths") from None
    size_y, size_x = math.hypot(transform.b, transform.e), math.hypot(transform.a, transform.d)
    return size_y * to_metres, size_x * to_metres


def overview_factors(height: int, width: int, tile: int = COG_TILE) -> list[int]:
    """Decimation factors 2, 4, 8, ... until one ``tile`` holds the whole level (GDAL's COG default)."""
    factors, factor = [], 1
    while max(math.ceil(height / factor), math.ceil(width / factor)) > tile:
        factor *= 2
        factors.append(factor)
    return factors


class CogRaster:
    """A Cloud-Optimised GeoTIFF of ``count`` uint8 bands, written block by block (SPEC 9).

    ``crs``, ``transform`` and nodata :data:`NODATA_LABEL`; DEFLATE, 512-pixel tiles, overviews
    made with :attr:`overview_resampling`. Subclasses say what the bands are in :meth:`_describe`.

    Blocks go to a tiled intermediate whose tiles are the blocks (``block`` pixels: no tile is
    written twice) under a staging name. :meth:`commit` adds the overviews, copies it with GDAL's
    COG driver to a second staging name and renames that to ``path``; nothing exists under
    ``path`` before. As a context manager it commits when the block ends normally and removes
    both staging files when it raises.
    """

    overview_resampling = "nearest"

    def __init__(self, path: str | Path, *, height: int, width: int, count: int, crs, transform, block: int):
        import rasterio

        self.path = Path(path)
        self.height, self.width, self.count = height, width, count
        self._tiles = atomic.AtomicFile(self.path)
        self._final: atomic.AtomicFile | None = None
        tile = block if block % TIFF_TILE_MULTIPLE == 0 else COG_TILE
        profile = {
            "driver": "GTiff",
            "height": height,
            "width": width,
            "count": count,
            "dtype": "uint8",
            "crs": crs,
            "transform": transform,
            "nodata": NODATA_LABEL,
            "tiled": True,
            "blockxsize": tile,
            "blockysize": tile,
            "compress": "deflate",
            "zlevel": 1,
            "bigtiff": "if_safer",
        }
        try:
            with _quiet():
                self._ds = rasterio.open(self._tiles.tmp, "w", **profile)
            self._describe(self._ds)
        except BaseException:
            self._tiles.abort()
            raise

    def _describe(self, ds) -> None:
        """Colour tables, band descriptions, tags: called once on the open intermediate."""

    def write(self, y0: int, y1: int, x0: int, x1: int, data: np.ndarray) -> None:
        """Rows y0..y1-1, columns x0..x1-1 of every band: uint8 (count, h, w), or (h, w) for one band."""
        from rasterio.windows import Window

        data = np.asarray(data, np.uint8)
        self._ds.write(data[None] if data.ndim == 2 else data, window=Window(x0, y0, x1 - x0, y1 - y0))

    def commit(self) -> Path:
        import rasterio.shutil
        from rasterio.enums import Resampling

        try:
            factors = overview_factors(self.height, self.width)
            if factors:
                self._ds.build_overviews(factors, Resampling[self.overview_resampling])
            self._ds.close()
            self._final = atomic.AtomicFile(self.path)
            with _quiet():
                rasterio.shutil.copy(
                    self._tiles.tmp,
                    self._final.tmp,
                    driver="COG",
                    COMPRESS="DEFLATE",
                    BLOCKSIZE=COG_TILE,
                    OVERVIEWS="FORCE_USE_EXISTING" if factors else "NONE",
                    BIGTIFF="IF_SAFER",
                )
            self._tiles.abort()
            return self._final.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._ds.closed:
            self._ds.close()
        self._tiles.abort()
        if self._final is not None:
            self._final.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class LabelRaster(CogRaster):
    """A scene's labels as a :class:`CogRaster` (SPEC 9): one band of class indices.

    The palette of :func:`simfeatup.visualize.palette` is its colour table (nodata transparent),
    the class lines are JSON in its ``classes`` tag; overviews pick labels, never average them.
    """

    def __init__(self, path: str | Path, *, height: int, width: int, crs, transform, classes: list[str], block: int):
        self.classes = list(classes)
        super().__init__(path, height=height, width=width, count=1, crs=crs, transform=transform, block=block)

    def _describe(self, ds) -> None:
        colours = visualize.palette(self.classes)
        ds.write_colormap(1, {**{k: (*map(int, c), 255) for k, c in enumerate(colours)}, NODATA_LABEL: (0, 0, 0, 0)})
        ds.update_tags(classes=json.dumps(self.classes))
        ds.set_band_description(1, "class")


def quantise_probs(probs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(K, h, w) probabilities -> uint8: round(p * PROB_SCALE), :data:`NODATA_LABEL` where not ``valid``."""
    out = np.empty(probs.shape, np.uint8)
    for k, band in enumerate(probs):  # band by band: no (K, h, w) float temporary
        out[k] = np.rint(np.clip(band, 0, 1) * PROB_SCALE)
        out[k][~valid] = NODATA_LABEL
    return out


class ProbRaster(CogRaster):
    """A scene's class probabilities as a :class:`CogRaster`: one band per class line (its description).

    Values are p scaled to 0..PROB_SCALE and rounded, :data:`NODATA_LABEL` at nodata; GDAL's
    band scale (1 / PROB_SCALE) and the ``probability`` tag say so. Overviews average.
    """

    overview_resampling = "average"

    def __init__(self, path: str | Path, *, height: int, width: int, crs, transform, classes: list[str], block: int):
        self.classes = list(classes)
        super().__init__(
            path, height=height, width=width, count=len(self.classes), crs=crs, transform=transform, block=block
        )

    def _describe(self, ds) -> None:
        for k, line in enumerate(self.classes, 1):
            ds.set_band_description(k, line)
        ds.scales = [1 / PROB_SCALE] * len(self.classes)
        ds.offsets = [0.0] * len(self.classes)
        ds.update_tags(
            classes=json.dumps(self.classes),
            probability=f"value / {PROB_SCALE}, rounded to the nearest step; {NODATA_LABEL} = nodata",
        )

    def write_probs(self, y0: int, y1: int, x0: int, x1: int, probs: np.ndarray, valid: np.ndarray) -> None:
        """(K, h, w) float probabilities and the (h, w) valid mask of rows y0..y1-1, columns x0..x1-1."""
        self.write(y0, y1, x0, x1, quantise_probs(probs, valid))
