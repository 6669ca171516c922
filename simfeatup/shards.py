"""Image files <-> WebDataset shards: `make_shards` packs folders, `decode_image` reads members back.

Both sides share one decoder, so a file that `make_shards` accepts is a file the training
pipeline (`simfeatup.training.data`) can decode. No torch here: this module is used by the CLI.

Shard layout: one sample per image, one tar member ``<key>.<ext>`` holding the original file
bytes unchanged (ext is ``jpg``, ``png`` or ``tif``, from the file's content, not its name).
"""
from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")  # matched case-insensitively
IMAGE_EXTS = ("jpg", "png", "tif")  # tar member extensions the pipeline decodes
STRETCHES = ("percentile", "minmax")  # or a number: the value that maps to 255
PERCENTILES = (2.0, 98.0)  # the "percentile" stretch clips at these (per band)

_PATTERN_HELP = "use one printf field for the shard number, e.g. 'shards/train-%06d.tar'"
_STATS_MAX_PIXELS = 1 << 20  # percentiles on a strided subsample above this: same result, 10x faster


# ----------------------------------------------------------------------------------- decoding
def sniff_image(data: bytes) -> str | None:
    """The image kind of ``data`` from its magic bytes: "jpg", "png", "tif" or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF and BigTIFF
        return "tif"
    return None


def decode_image(data: bytes, ext: str | None = None, *, bands=(0, 1, 2), stretch="percentile") -> np.ndarray:
    """Decode an encoded image to RGB uint8 of shape (H, W, 3).

    ext: "jpg", "png" or "tif" (sniffed from the bytes when None). JPEG/PNG decode as RGB;
    grayscale is repeated to 3 channels and alpha is dropped. ``bands`` picks the TIFF bands
    (0-based) that become R, G, B, e.g. (2, 1, 0) for a Blue-Green-Red-NIR raster; a 1- or
    2-band TIFF is grayscale. Values that are not uint8 (16-bit, float) are mapped to 0..255 by
    ``stretch``: "percentile" (2-98 % per band), "minmax" (per band) or a number (the value
    that becomes 255, e.g. 2047 for 11-bit data). Raises ValueError/OSError on corrupt data.
    """
    kind = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext) if ext else sniff_image(data)
    if kind == "tif":
        arr = _read_tiff(data)
        arr = _select_bands(arr, bands)
    elif kind in ("jpg", "png"):
        arr = _read_pil(data)
    else:
        raise ValueError(f"not an image: unknown format {kind!r} (expected one of {IMAGE_EXTS})")
    return _to_uint8(arr, stretch)


def _read_pil(data: bytes) -> np.ndarray:
    # PIL (not cv2) because PIL raises on a truncated JPEG where cv2 returns a half-grey image.
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGB", "L", "I;16", "I;16B", "I", "F"):
            arr = np.asarray(im)
        elif im.mode in ("LA", "La"):
            arr = np.asarray(im.getchannel(0))
        else:  # P, RGBA, CMYK, YCbCr, ...: alpha is dropped
            arr = np.asarray(im.convert("RGB"))
    return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=-1)


def _read_tiff(data: bytes) -> np.ndarray:
    """(H, W, C) array of any dtype; C is the band count."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except ValueError as err:
        if "imagecodecs" not in str(err):
            raise
        return _read_tiff_cv2(data, err)  # compressed (LZW, Deflate) without imagecodecs
    axes = "".join(a for a, n in zip(axes, arr.shape) if n > 1) or "YX"
    arr = arr.squeeze() if arr.size > 1 else arr.reshape(1, 1)
    if arr.ndim == 2:
        return arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"unsupported TIFF layout: axes {series.axes!r}, shape {series.shape}")
    band_axis = next((i for i, a in enumerate(axes) if a in "SCIQ"), 2)  # samples/channels/pages
    return np.moveaxis(arr, band_axis, -1)


def _read_tiff_cv2(data: bytes, err: Exception) -> np.ndarray:
    import cv2

    level = cv2.getLogLevel()
    cv2.setLogLevel(2)  # ERROR: GeoTIFF tags make libtiff warn on every read
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    finally:
        cv2.setLogLevel(level)
    if arr is None:
        raise ValueError(f"{err}; OpenCV could not read it either (`pip install imagecodecs`)")
    if arr.ndim == 2:
        return arr[..., None]
    return arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # OpenCV gives BGR(A)


def _select_bands(arr: np.ndarray, bands) -> np.ndarray:
    n = arr.shape[-1]
    if n <= 2:  # gray or gray + alpha
        return np.repeat(arr[..., :1], 3, axis=-1)
    bands = tuple(int(b) for b in bands)
    if len(bands) != 3 or not all(0 <= b < n for b in bands):
        raise ValueError(f"bands={bands} does not fit a {n}-band image: give 3 indices in 0..{n - 1}")
    return arr[..., bands]


def _to_uint8(arr: np.ndarray, stretch) -> np.ndarray:
    """(H, W, 3) any dtype -> (H, W, 3) uint8."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    x = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if isinstance(stretch, str) and stretch in STRETCHES:
        sample = x.reshape(-1, 3)
        if sample.shape[0] > _STATS_MAX_PIXELS:
            sample = sample[:: sample.shape[0] // _STATS_MAX_PIXELS]
        valid = sample[(sample != 0).any(axis=1)]  # all-zero pixels are nodata in most rasters
        sample = valid if len(valid) else sample
        if stretch == "percentile":
            lo, hi = np.percentile(sample, PERCENTILES, axis=0)
        else:
            lo, hi = sample.min(axis=0), sample.max(axis=0)
    else:
        try:
            top = float(stretch)
        except (TypeError, ValueError):
            raise ValueError(f"stretch={stretch!r}: use one of {STRETCHES} or a number (the value that maps to 255)") from None
        if top <= 0:
            raise ValueError(f"stretch={stretch!r}: a fixed stretch must be > 0")
        lo, hi = np.zeros(3, np.float32), np.full(3, top, np.float32)
    scale = 255.0 / np.maximum(hi - lo, 1e-6)
    return np.clip((x - lo) * scale + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- writing
@dataclass
class ShardSummary:
    """What `make_shards` wrote and what it skipped (``describe()`` prints it)."""

    pattern: str
    shards: list[Path] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # images per shard
    nbytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def written(self) -> int:
        return sum(self.counts)

    @property
    def urls(self) -> str:
        """Brace pattern of the written shards, as the training config takes it."""
        if not self.shards:
            return ""
        first, last = _shard_index_text(self.pattern, 0), _shard_index_text(self.pattern, len(self.shards) - 1)
        if len(self.shards) == 1:
            return str(self.shards[0])
        head, tail = (part.replace("%%", "%") for part in re.split(r"%0?\d*d", self.pattern, maxsplit=1))
        return f"{head}{{{first}..{last}}}{tail}"

    def describe(self, max_listed: int = 20) -> str:
        lines = [f"wrote {self.written} images into {len(self.shards)} shards ({self.nbytes / 1e6:.1f} MB): {self.urls}"]
        if self.skipped:
            reasons: dict[str, int] = {}
            for _, why in self.skipped:
                kind = why.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            lines.append(f"skipped {len(self.skipped)} files: " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())))
            lines += [f"  {path}: {why}" for path, why in self.skipped[:max_listed]]
            if len(self.skipped) > max_listed:
                lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        return "\n".join(lines)


def _shard_index_text(pattern: str, index: int) -> str:
    return re.search(r"%0?\d*d", pattern).group(0) % index


def validate_pattern(pattern: str) -> str:
    """Check an output shard pattern like 'out/train-%06d.tar'; returns it or raises ValueError."""
    fields = re.findall(r"%.", pattern.replace("%%", ""))
    if "{" in pattern or "}" in pattern:
        raise ValueError(f"shard pattern {pattern!r} uses braces, which name shards to read; to write, {_PATTERN_HELP}")
    if len(re.findall(r"%0?\d*d", pattern)) != 1 or len(fields) != 1:
        raise ValueError(f"shard pattern {pattern!r} must contain exactly one %d field; {_PATTERN_HELP}")
    if not pattern.endswith(".tar"):
        raise ValueError(f"shard pattern {pattern!r} must end with '.tar'; {_PATTERN_HELP}")
    return pattern


def _list_files(sources) -> list[tuple[Path, str]]:
    """(path, key stem) for every file under the sources, sources in order, each sorted."""
    out = []
    for src in sources:
        src = Path(src).expanduser()
        if src.is_file():
            out.append((src, src.name))
        elif src.is_dir():
            found = []
            for root, dirs, files in os.walk(src):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root, f) for f in files]
            out += sorted(((p, p.relative_to(src).as_posix()) for p in found), key=lambda t: t[1])
        else:
            raise FileNotFoundError(f"source {str(src)!r} is neither a file nor a folder")
    return out


def _make_key(rel: str, taken: set[str]) -> str:
    # webdataset splits member names at the first dot of the basename, so keys carry no dots.
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", stem).strip("/") or "_"
    unique, n = key, 1
    while unique in taken:  # e.g. a.jpg and a.png in one folder, or the same name in two sources
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def _read_file(path: Path, verify: bool) -> tuple[bytes | None, str]:
    """(bytes, ext) for an image file, else (None, reason); verify=True also decodes it."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image: extension {path.suffix or '(none)'!r} is not one of {IMAGE_SUFFIXES}"
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"unreadable: {err}"
    if not data:
        return None, "empty: 0 bytes"
    kind = sniff_image(data)
    if kind is None:
        return None, "not an image: contents are not JPEG, PNG or TIFF"
    if verify:
        try:
            decode_image(data, kind, stretch="minmax")
        except Exception as err:  # any decoder failure means a broken file: report it, don't crash
            return None, f"unreadable: {type(err).__name__}: {err}"
    return data, kind


class _ShardFile:
    """One tar written to a hidden temporary name and renamed when closed, never half-written under its final name."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: same files -> same bytes
        self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    @property
    def size(self) -> int:
        return self.tar.fileobj.tell()

    def close(self) -> int:
        self.tar.close()
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return size

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def make_shards(sources, pattern: str, *, maxcount: int = 1000, maxsize: int = 1_000_000_000,
                progress: bool = True, verify: bool = True) -> ShardSummary:
    """Pack image files from folders (recursively) into WebDataset shards.

    sources: folders and/or single files; within a folder files go in sorted relative-path order.
    pattern: output path with one printf field for the shard number, e.g. "out/train-%06d.tar"
    (read them back with the brace form in ``summary.urls``, e.g. "out/train-{000000..000003}.tar").
    A shard closes at ``maxcount`` images or before its members would pass ``maxsize`` bytes
    (tar rounds the file itself up to a multiple of 10 KiB).
    verify: decode every image first and skip (and report) the ones that fail.
    Files that are not images, empty, unreadable or undecodable are skipped and listed in the summary.
    """
    from tqdm.auto import tqdm

    validate_pattern(pattern)
    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"maxcount={maxcount} and maxsize={maxsize} must be >= 1")
    files = _list_files(sources)
    summary = ShardSummary(pattern=pattern)
    taken: set[str] = set()
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    shard: _ShardFile | None = None
    bar = tqdm(files, unit="img", desc="make-shards", disable=not progress)
    try:
        for path, rel in bar:
            data, kind = _read_file(path, verify)
            if data is None:
                summary.skipped.append((str(path), kind))
                continue
            entry = len(data) + 1024  # tar header + padding, upper bound
            if shard is not None and (shard.count >= maxcount or shard.size + entry > maxsize):
                summary.counts.append(shard.count)
                summary.nbytes += shard.close()
                shard = None
            if shard is None:
                shard = _ShardFile(Path(pattern % len(summary.shards)))
                summary.shards.append(shard.path)
                bar.set_postfix_str(shard.path.name)
            shard.add(f"{_make_key(rel, taken)}.{kind}", data)
        if shard is not None:
            summary.counts.append(shard.count)
            summary.nbytes += shard.close()
            shard = None
    finally:
        bar.close()
        if shard is not None:  # interrupted: drop the partial shard, keep the finished ones
            shard.abort()
            summary.shards.pop()
    stale = Path(pattern % len(summary.shards))
    if stale.exists():
        log.warning("%s is left over from an earlier run and is not part of this set; read %s", stale, summary.urls)
    for path, why in summary.skipped:
        log.info("skipped %s: %s", path, why)
    return summary
