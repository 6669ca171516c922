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

from .atomic import AtomicFile, remove_stale_temporaries
from .imaging import IMAGE_SUFFIXES, decode_image, sniff_image

logger = logging.getLogger(__name__)

_PATTERN_HELP = "use one printf field for the shard number, e.g. 'shards/train-%06d.tar'"


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
        lines = [
            f"wrote {self.written} images into {len(self.shards)} shards ({self.nbytes / 1e6:.1f} MB): {self.urls}"
        ]
        if self.skipped:
            reasons: dict[str, int] = {}
            for _, why in self.skipped:
                kind = why.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            lines.append(
                f"skipped {len(self.skipped)} files: " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items()))
            )
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
    """One tar streamed into an `AtomicFile`: renamed into place when closed, never half-written under its name."""

    def __init__(self, path: Path):
        self.path = path
        self.file = AtomicFile(path)
        try:
            self.tar = tarfile.open(self.file.tmp, "w", format=tarfile.USTAR_FORMAT)
        except BaseException:
            self.file.abort()
            raise
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
        size = self.file.tmp.stat().st_size
        self.file.commit()
        return size

    def abort(self) -> None:
        self.tar.close()
        self.file.abort()


def make_shards(
    sources,
    pattern: str,
    *,
    maxcount: int = 1000,
    maxsize: int = 1_000_000_000,
    progress: bool = True,
    verify: bool = True,
) -> ShardSummary:
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
    remove_stale_temporaries(Path(pattern % 0).parent)  # half-written shards of a killed run
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
        logger.warning("%s is left over from an earlier run and is not part of this set; read %s", stale, summary.urls)
    for path, why in summary.skipped:
        logger.info("skipped %s: %s", path, why)
    return summary
