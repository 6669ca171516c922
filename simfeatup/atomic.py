"""Files and folders that are never half-written under their final name; the one home for it.

Everything simfeatup writes for keeps (checkpoints, the upsampler artefact, caches, shards,
label maps, reports, the exported model folder) is first written under a hidden temporary
name beside its target, then renamed into place: a rename within one directory cannot be
torn, so a killed run leaves the old version or the new one, never a truncated one.

Temporary names are ``.NAME.HOST.PID.TOKEN.partial`` (``.NAME.HOST.PID.TOKEN.old`` for a
folder moved aside while ``atomic_dir`` swaps it): hidden, so ``ls`` and shell globs skip
them, and ending in ``.partial``, so nothing looking for ``*.tar`` or ``*.ckpt`` picks one
up (nor a side file SQLite keeps beside one, ``.partial-journal``). The writer's host and
process id in the name let :func:`remove_stale_temporaries` tell a leftover of a killed run
from a file another run is writing right now; every writer here runs it (:func:`sweep_once`)
on the first write into a folder, so a rerun clears what a kill left.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

# Temporaries of another host (a shared filesystem) cannot be checked for a live writer; they
# count as stale once nothing has touched them for this long. Far longer than any one write.
STALE_AFTER_S = 24 * 3600

_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32].strip("-") or "host"
# Files a library keeps beside a temporary while writing it (SQLite's, for a GeoPackage): removed
# with it, by its writer on abort and by the sweep when its writer died.
SIDE_FILES = ("-journal", "-wal", "-shm")
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\."
    rf"(?P<kind>partial(?:{'|'.join(SIDE_FILES)})?|old)$"
)


def _temporary_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _claim(target: Path, create: Callable[[Path], None]) -> Path:
    """A fresh staging name beside ``target``, created by ``create`` (which must fail if it exists)."""
    for _ in range(100):
        candidate = _temporary_name(target, "partial")
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


_SWEPT: set[str] = set()  # folders this process has cleared of stale temporaries


def sweep_once(folder: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temporaries` of ``folder`` the first time this process writes there.

    Every ``atomic_write``/``atomic_dir`` calls it for its target's folder, so whatever a killed
    run left half-written is removed by the next run that writes beside it.
    """
    key = os.path.abspath(folder)
    if key in _SWEPT:
        return []
    _SWEPT.add(key)
    return remove_stale_temporaries(folder)


def _create_file(path: Path) -> None:
    # 0o666 through the umask: the permissions a plain open() gives (mkstemp's would be 0600).
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


class AtomicFile:
    """A hidden temporary file ``tmp`` beside ``path`` that becomes ``path`` on :meth:`commit`.

    As a context manager it yields ``tmp``, commits when the block ends normally and aborts
    (removes ``tmp``, leaves ``path`` as it was) when it raises. Streaming writers that
    outlive one block (a tar being filled) call :meth:`commit` or :meth:`abort` themselves.
    Whatever writes ``tmp`` may open it by name or replace it; the parent folder is created.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sweep_once(self.path.parent)
        self.tmp = _claim(self.path, _create_file)
        created = os.stat(self.tmp)
        self._created = created.st_ino, created.st_mode & 0o7777

    def commit(self) -> Path:
        """fsync ``tmp``, rename it to ``path``, fsync the folder; on any error ``tmp`` is removed.

        A writer that replaced ``tmp`` with a file of its own (safetensors' ``save_file`` does,
        mode 0600) gets the permissions ``tmp`` was created with: others on a shared cluster can
        read the result as they can every other output.
        """
        try:
            inode, mode = self._created
            now = os.stat(self.tmp)
            if now.st_ino != inode and now.st_mode & 0o7777 != mode:
                try:
                    os.chmod(self.tmp, mode)
                except OSError as err:  # a file system without POSIX modes: the file matters more than its mode
                    logger.debug("kept the mode of %s: %s", self.tmp, err)
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path: str | os.PathLike) -> AtomicFile:
    """``with atomic_write(path) as tmp:`` write ``tmp``; on success it replaces ``path``.

    On error ``tmp`` is removed and ``path`` keeps its old content. The result gets the
    permissions a plain ``open()`` would give.
    """
    return AtomicFile(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_dir(path) as tmp:`` fill the new folder ``tmp``; on success it becomes ``path``.

    ``tmp`` is a hidden staging folder beside ``path`` with the umask's permissions. ``path``
    may already exist as an empty folder, or as any folder with ``overwrite=True``: then the
    old folder is moved aside, the new one renamed into place and only then the old one
    removed. Raises FileExistsError before the block when ``path`` cannot be replaced, and at
    the end if another writer filled it meanwhile. On any failure or interrupt the staging
    folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    _check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_once(path.parent)
    staging = _claim(path, lambda p: os.mkdir(p, 0o777))
    try:
        yield staging
        _fsync_tree(staging)
        _move_into_place(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; remove it or choose another name")
    if not overwrite and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; choose another name or allow overwriting")


def _move_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    _check_replaceable(path, overwrite)
    old = None
    if path.is_dir() and any(path.iterdir()):  # overwrite=True here; an empty folder is replaced by the rename
        old = _temporary_name(path, "old")
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except OSError as err:
        if old is not None:
            os.replace(old, path)  # put the previous folder back
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"{path} was written by someone else meanwhile; nothing was replaced") from err
        raise
    if old is not None:
        _remove(old)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what ``atomic_write``/``atomic_dir`` left in ``folder`` when their writer died; returns it.

    Only names of our form count (see the module docstring), and only when stale: written on
    this host by a process id that is no longer running, or written on another host (a shared
    filesystem, whose processes cannot be seen from here) and untouched for ``STALE_AFTER_S``.
    A live writer's temporaries are never touched, so two runs may share an output folder. A
    folder moved aside by an interrupted ``atomic_dir`` swap is removed only when the new
    folder is in place; otherwise it may be the only copy left, and is reported instead.
    Never raises: what cannot be inspected or removed is left alone.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None:
            continue
        try:
            if not _stale(match, entry, now):
                continue
            if match["kind"] == "old" and not (folder / match["target"]).exists():
                logger.warning("%s is missing but %s holds its previous version (a run was killed while replacing it): "
                            "rename it back, or delete it", folder / match["target"], entry.path)
                continue
            _remove(Path(entry.path))
        except OSError as err:
            logger.debug("left %s alone: %s", entry.path, err)
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d temporary file(s) left in %s by a stopped run", len(removed), folder)
    return removed


def _stale(match: re.Match, entry: os.DirEntry, now: float) -> bool:
    if match["host"] == _HOST:
        return not _alive(int(match["pid"]))
    return now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (in this PID namespace); True when it cannot be told."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would not probe there; never guess a writer is dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or not a valid pid
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, so the rename publishes complete contents."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(directory: Path) -> None:
    """Make a rename itself durable (POSIX; skipped where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
