"""Polygons of a scene's labels (``segment --scene --vector gpkg|geojson``), built block by block.

One feature per connected region of one class: its class line, class index and area. Regions
are 4-connected (pixels sharing a side): two pixels of a class that touch only at a corner are
two features, the rule of GDAL's polygonizer and of valid polygons (which touch at points
without merging). Nodata pixels (:data:`NODATA_LABEL`) give no polygon.

Each block is polygonized on its own, in scene pixel coordinates (integers, so the pieces of a
region cut by a block edge meet exactly). A piece touching an edge shared with another block
is matched with the pieces across that edge through the two rows (or columns) of pixels on
either side: same class there means one region, found with a union-find, and the pieces of a
region are merged (shapely ``unary_union``) once all blocks are in. Only those edge strips are
kept between blocks (with blocks in row order: one row of blocks' bottom strip, O(width)),
never the label map; the polygons are held, they are the output. Every polygon is written in
one canonical form (no collinear vertices, ``shapely.normalize``) and the features sorted by
position, so the file does not depend on the block size.

rasterio, shapely and pyogrio are the ``geo`` extra, imported inside the functions.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from . import atomic
from .constants import NODATA_LABEL

logger = logging.getLogger("simfeatup")

# --vector FORMAT -> (OGR driver, file suffix). GeoJSON is RFC 7946: lon/lat on EPSG:4326.
FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson")}


class RegionPolygons:
    """Labels in, block by block (:meth:`add`); the scene's region polygons out (:meth:`regions`).

    ``height`` x ``width``: the scene. Blocks must tile it without overlap (any order; memory is
    least in row order). Coordinates are scene pixels: x = column, y = row, y down.
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self._pieces: list = []  # shapely polygons, pixel coordinates
        self._classes: list[int] = []
        self._parent: dict[int, int] = {}  # union-find over the pieces on shared block edges
        self._strips: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # edge -> (piece ids, labels)

    def add(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """The labels (h, w) of rows y0..y0+h-1, columns x0..x0+w-1."""
        import cv2
        import shapely
        from rasterio.features import shapes
        from rasterio.transform import Affine

        labels = np.asarray(labels, np.uint8)
        h, w = labels.shape
        local = np.zeros((h, w), np.int32)  # piece of each pixel, 1-based within the block; 0 at nodata
        offset, count = len(self._pieces), 0
        classes = []
        for k in np.unique(labels):
            if k == NODATA_LABEL:
                continue
            n, components = cv2.connectedComponents((labels == k).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
            inside = components > 0
            local[inside] = components[inside] + count
            classes += [int(k)] * (n - 1)
            count += n - 1
        valid = local > 0
        rings, piece_of_ring, order = [], [], np.zeros(count, np.int64)
        found = shapes(local, mask=valid, connectivity=4, transform=Affine.translation(x0, y0))
        for n, (geometry, value) in enumerate(found):  # one polygon per piece: shell, then holes
            order[n] = int(value) - 1
            rings += geometry["coordinates"]
            piece_of_ring += [n] * len(geometry["coordinates"])
        if count:  # the rings built in two vectorised calls: shapely.geometry.shape() per piece is 5x slower
            lengths = [len(ring) for ring in rings]
            ring_of_point = np.repeat(np.arange(len(rings)), lengths)
            rings = shapely.linearrings(np.concatenate(rings), indices=ring_of_point)
            pieces = np.empty(count, object)
            pieces[order] = shapely.polygons(rings, indices=piece_of_ring)
            self._pieces += list(pieces)
        self._classes += classes
        y1, x1 = y0 + h, x0 + w
        edges = [
            (("row", y0, x0, x1), 0, y0 > 0),  # (edge, which row/column of the block, shared with a block?)
            (("row", y1, x0, x1), -1, y1 < self.height),
            (("col", x0, y0, y1), 0, x0 > 0),
            (("col", x1, y0, y1), -1, x1 < self.width),
        ]
        for edge, at, shared in edges:
            if not shared:
                continue
            pieces_at, labels_at = (local[at], labels[at]) if edge[0] == "row" else (local[:, at], labels[:, at])
            strip = (np.where(pieces_at > 0, pieces_at.astype(np.int64) - 1 + offset, -1), labels_at.copy())
            other = self._strips.pop(edge, None)
            if other is None:
                self._strips[edge] = strip
            else:
                self._join(strip, other)

    def _join(self, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
        """Pieces on either side of a block edge with the same class where they face each other are one region."""
        (ids_a, labels_a), (ids_b, labels_b) = a, b
        same = (labels_a == labels_b) & (labels_a != NODATA_LABEL)
        for i, j in np.unique(np.stack([ids_a[same], ids_b[same]], axis=1), axis=0):
            ri, rj = self._find(int(i)), self._find(int(j))
            if ri != rj:
                self._parent[min(ri, rj)] = min(ri, rj)  # every piece of a merged region is a key
                self._parent[max(ri, rj)] = min(ri, rj)

    def _find(self, i: int) -> int:
        root = i
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while i != root:  # path compression
            self._parent[i], i = root, self._parent[i]
        return root

    def regions(self) -> tuple[np.ndarray, np.ndarray]:
        """(polygons, class indices) of every region of the scene, merged across blocks, canonical and
        sorted by position (top, then left edge), so that they do not depend on the blocks."""
        import shapely

        if self._strips:
            logger.debug("%d block edge(s) never met their neighbour", len(self._strips))
        groups: dict[int, list[int]] = {}
        for i in self._parent:
            groups.setdefault(self._find(i), []).append(i)
        merged = set(self._parent)
        polygons, classes = [], []
        for i, piece in enumerate(self._pieces):
            if i not in merged:
                polygons.append(piece)
                classes.append(self._classes[i])
        for members in groups.values():
            union = shapely.unary_union([self._pieces[i] for i in members])
            union = shapely.simplify(union, 0)  # drops the vertices left where block edges crossed its outline
            for part in shapely.get_parts(union):  # one polygon: the pieces share sides
                polygons.append(part)
                classes.append(self._classes[members[0]])
        polygons = shapely.normalize(np.array(polygons, dtype=object))  # the polygonizer leaves no collinear vertex
        classes = np.array(classes, np.int64)
        if not len(polygons):
            return polygons, classes
        bounds, wkb = shapely.bounds(polygons), shapely.to_wkb(polygons)
        order = sorted(range(len(polygons)), key=lambda i: (bounds[i, 1], bounds[i, 0], classes[i], wkb[i]))
        return polygons[order], classes[order]


def area_unit(crs, transform) -> tuple[float, str]:
    """(area of one pixel in the unit, unit) of the ``area`` field and ``--min-area``.

    Square metres for a projected CRS (whatever its linear unit), square degrees for a
    geographic one, pixels without a CRS (or when its unit is unknown).
    """
    if crs is None:
        return 1.0, "px"
    pixel = abs(transform.a * transform.e - transform.b * transform.d)
    if crs.is_geographic:
        return pixel, "deg2"
    try:
        _, metres = crs.linear_units_factor
    except Exception:  # a CRS without a known linear unit
        return 1.0, "px"
    return pixel * metres**2, "m2"


class VectorOutput:
    """A scene's region polygons as a scene output (``write(block)``, ``commit()``, ``abort()``).

    ``fmt``: ``gpkg`` (the scene's CRS; without one, the coordinates of its geotransform, which are
    pixel coordinates when it has none either) or ``geojson`` (RFC 7946,
    reprojected to EPSG:4326 by GDAL: needs a CRS). Fields: ``class`` (the class line),
    ``class_index``, ``area`` (of the region's pixels, before simplification) and ``area_unit``
    (see :func:`area_unit`). ``min_area`` drops smaller regions (in that unit; a dropped region
    leaves a gap, it is not given to a neighbour). ``simplify``: tolerance in CRS units, 0 =
    none; neighbours keep their shared borders (GEOS coverage simplification). The file is
    written at :meth:`commit` under a temporary name, then renamed.
    """

    needs_probs = False

    def __init__(self, path: str | Path, fmt: str, *, height: int, width: int, crs, transform, classes: list[str],
                 min_area: float = 0.0, simplify: float = 0.0):
        if fmt not in FORMATS:
            raise ValueError(f"unknown vector format {fmt!r}: use one of {', '.join(FORMATS)}")
        if fmt == "geojson" and crs is None:
            raise ValueError(f"{Path(path).name}: GeoJSON is longitude/latitude (RFC 7946) and the scene has no CRS: "
                             "use --vector gpkg (the raster's own coordinates)")
        self.path, self.fmt = Path(path), fmt
        self.crs, self.transform, self.classes = crs, transform, list(classes)
        self.min_area, self.simplify = min_area, simplify
        self._regions = RegionPolygons(height, width)
        self._file: atomic.AtomicFile | None = None

    def write(self, b) -> None:
        self._regions.add(b.y0, b.x0, b.labels)

    def commit(self) -> Path:
        import shapely

        try:
            polygons, classes = self._regions.regions()
            scale, unit = area_unit(self.crs, self.transform)
            areas = shapely.area(polygons) * scale if len(polygons) else np.zeros(0)
            keep = areas >= self.min_area
            polygons, classes, areas = polygons[keep], classes[keep], areas[keep]
            t = self.transform
            matrix = np.array([[t.a, t.d], [t.b, t.e]])
            polygons = shapely.transform(polygons, lambda xy: xy @ matrix + (t.c, t.f))  # pixels -> CRS
            if self.simplify > 0 and len(polygons):
                polygons = shapely.coverage_simplify(polygons, self.simplify)
            self._file = atomic.AtomicFile(self.path)
            self._write(self._file.tmp, polygons, classes, areas, unit)
            path = self._file.commit()
        except BaseException:
            self.abort()
            raise
        logger.info("%s: %d polygon(s) (area in %s)", path.name, len(polygons), unit)
        return path

    def _write(self, tmp: Path, polygons, classes, areas, unit: str) -> None:
        import pyogrio.raw
        import shapely

        driver, _ = FORMATS[self.fmt]
        names = np.array([self.classes[k] for k in classes], dtype=object)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The filename extension should be", RuntimeWarning)  # the .partial
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)  # the caller says so
            pyogrio.raw.write(
                str(tmp),
                np.array(shapely.to_wkb(polygons), dtype=object) if len(polygons) else np.zeros(0, object),
                [names, classes.astype(np.int32), areas.astype(np.float64), np.full(len(classes), unit, object)],
                ["class", "class_index", "area", "area_unit"],
                layer=self.path.stem,
                driver=driver,
                geometry_type="Polygon",
                crs=self.crs.to_wkt() if self.crs is not None else None,
                layer_options={"RFC7946": "YES"} if self.fmt == "geojson" else None,
            )

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            for suffix in atomic.SIDE_FILES:  # SQLite's, beside the GeoPackage
                self._file.tmp.with_name(self._file.tmp.name + suffix).unlink(missing_ok=True)
