"""The files a scene is written to (SPEC 9), one kind per flag, fed block by block.

Each kind says whether the flags ask for it and where it goes without opening anything (what
``--skip-existing`` checks), and opens an output with ``path``, ``needs_probs``, ``write(block)``,
``commit()`` and ``abort()``: nothing appears under a final name before ``commit()``.
Light at import: rasterio, shapely and the writers come in when an output is opened.
"""
from __future__ import annotations

from pathlib import Path


def _grid(reader, classes: list[str]) -> dict:
    """What every writer of a scene needs: its pixel grid, CRS, geotransform and the class lines."""
    return {"height": reader.height, "width": reader.width, "crs": reader.crs, "transform": reader.transform,
            "classes": classes}


class _Kind:
    """A kind of scene output: written when the flag ``flag`` is set (always when None), to NAME + ``suffix``."""

    flag: str | None = None
    suffix = ".tif"
    needs_probs = False

    @classmethod
    def wanted(cls, args) -> bool:
        return cls.flag is None or bool(getattr(args, cls.flag))

    @classmethod
    def target(cls, args, name: str) -> Path:
        return args.out / f"{name}{cls.suffix}"

    @classmethod
    def open(cls, args, name: str, reader, classes: list[str]):
        return cls(args, name, reader, classes)


class _LabelOutput(_Kind):
    """The label COG of a scene as a scene output: ``write(block)``, ``commit()``, ``abort()``."""

    raster = "LabelRaster"  # the simfeatup.geo class that writes it

    def __init__(self, args, name: str, reader, classes: list[str]):
        from . import geo

        self.path = self.target(args, name)
        self._raster = getattr(geo, self.raster)(self.path, **_grid(reader, classes), block=args.block)

    def write(self, b) -> None:
        self._raster.write(b.y0, b.y1, b.x0, b.x1, b.labels)

    def commit(self) -> None:
        self._raster.commit()

    def abort(self) -> None:
        self._raster.abort()


class _VectorOutput(_Kind):
    """``--vector``: the scene's polygons (:class:`simfeatup.vector.VectorOutput`) as a scene output kind."""

    flag = "vector"

    @classmethod
    def target(cls, args, name: str) -> Path:
        from .vector import FORMATS

        return args.out / f"{name}{FORMATS[args.vector][1]}"

    @classmethod
    def open(cls, args, name: str, reader, classes: list[str]):
        from .vector import VectorOutput

        shape = {"min_area": args.min_area, "simplify": args.simplify}
        return VectorOutput(cls.target(args, name), args.vector, **_grid(reader, classes), **shape)


class _ProbsOutput(_LabelOutput):
    """``--save-probs``: a scene's class probabilities, a K-band uint8 COG (:class:`simfeatup.geo.ProbRaster`)."""

    flag, suffix = "save_probs", "_probs.tif"
    needs_probs = True
    raster = "ProbRaster"

    def write(self, b) -> None:
        self._raster.write_probs(b.y0, b.y1, b.x0, b.x1, b.probs, b.valid)


class _OverlayOutput(_Kind):
    """``--overlay``: the scene decimated to a viewable size, labels blended, a legend below
    (:class:`simfeatup.visualize.SceneOverlay`); each block's RGB is read again from ``reader``."""

    flag, suffix = "overlay", "_overlay.jpg"

    def __init__(self, args, name: str, reader, classes: list[str]):
        from . import visualize

        self.path, self._reader = self.target(args, name), reader
        self._overlay = visualize.SceneOverlay(reader.height, reader.width, classes)

    def write(self, b) -> None:
        rgb, valid = self._reader.read(b.y0, b.y1, b.x0, b.x1)
        self._overlay.add(b.y0, b.x0, rgb, valid & b.valid, b.labels)

    def commit(self) -> None:
        from . import visualize

        visualize.save_atomic(self._overlay.image(), self.path)

    def abort(self) -> None:
        pass  # nothing is written before commit()


# Every kind of file a scene can be written to, the label raster first. A kind says whether the flags
# ask for it (``wanted(args)``) and where it goes (``target(args, name)``) without opening anything;
# ``kind.open(args, name, reader, classes)`` gives the output: ``path``, ``needs_probs``, ``write``,
# ``commit``, ``abort``.
SCENE_OUTPUTS: list[type] = [_LabelOutput, _ProbsOutput, _VectorOutput, _OverlayOutput]


def scene_output_paths(args, name: str) -> list[Path]:
    """The final files :func:`scene_outputs` writes for scene ``name`` (what ``--skip-existing`` looks for)."""
    return [kind.target(args, name) for kind in SCENE_OUTPUTS if kind.wanted(args)]


def scene_outputs(args, name: str, reader, classes: list[str]) -> list:
    """Every file a scene is written to, each an object with ``path``, ``needs_probs``, ``write(block)``,
    ``commit()`` and ``abort()``; the label raster first. Nothing appears under a final name
    before ``commit()``."""
    outputs = []
    try:
        for kind in SCENE_OUTPUTS:
            if kind.wanted(args):
                outputs.append(kind.open(args, name, reader, classes))
    except BaseException:  # the outputs already made hold staging files
        for output in outputs:
            output.abort()
        raise
    return outputs


def write_scene(outputs: list, blocks, bar, path: Path) -> None:
    """Feed every block to every output, then commit them all; on any error abort them all.

    A scene without a single valid pixel is refused (SceneError) before anything is committed."""
    from .scene import SceneError

    try:
        has_data = False
        for b in blocks:
            has_data = has_data or bool(b.valid.any())
            for output in outputs:
                output.write(b)
            bar.update(1)
        if not has_data:
            raise SceneError(f"{path} has no valid pixel (all of it is nodata): nothing to segment; check its nodata "
                             "value or mask (gdalinfo)")
        for output in outputs:
            output.commit()
    except BaseException:
        for output in outputs:
            output.abort()
        raise
