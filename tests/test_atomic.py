"""simfeatup.atomic: files and folders replaced whole or not at all, and stale temporaries swept."""
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simfeatup import atomic
from simfeatup.atomic import AtomicFile, atomic_dir, atomic_write, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]

# A writer that stops in the middle of an atomic file write and an atomic folder write.
WRITER = """
import sys, time
from simfeatup.atomic import atomic_dir, atomic_write
with atomic_write(sys.argv[1]) as tmp, atomic_dir(sys.argv[2]) as staging:
    tmp.write_bytes(b"half")
    (staging / "part.bin").write_bytes(b"half")
    print(tmp, staging, flush=True)
    time.sleep(600)
"""


class Writer:
    """A separate process caught mid-write: ``.tmp`` and ``.staging`` are its temporaries."""

    def __init__(self, file: Path, folder: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(file), str(folder)], stdout=subprocess.PIPE, text=True, env=env
        )
        tmp, staging = self.proc.stdout.readline().split()
        self.tmp, self.staging = Path(tmp), Path(staging)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdout.close()


@pytest.fixture
def writer(tmp_path):
    w = Writer(tmp_path / "out" / "last.ckpt", tmp_path / "out" / "model_onnx")
    yield w
    if w.proc.poll() is None:
        w.kill()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------ files
def test_a_file_is_replaced_whole_with_umask_permissions(tmp_path, umask_027):
    target = tmp_path / "new" / "report.json"  # the folder is created
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".report.json.") and tmp.name.endswith(".partial")
        assert not target.exists()
        tmp.write_text("one")
    assert target.read_text() == "one"
    assert _mode(target) == 0o640
    assert _names(target.parent) == ["report.json"]


def test_a_writer_that_replaces_the_temporary_keeps_umask_permissions(tmp_path, umask_027):
    import torch
    from safetensors.torch import save_file

    target = tmp_path / "upsampler.safetensors"
    with atomic_write(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))  # writes a file of its own over tmp, mode 0600
    assert _mode(target) == 0o640  # as every other output: group members can read the artefact


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "upsampler.safetensors"
    target.write_text("old")
    for error in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_write(target) as tmp, open(tmp, "w") as f:
                f.write("half of the new")
                raise error
        assert target.read_text() == "old"
        assert _names(tmp_path) == ["upsampler.safetensors"]


def test_a_streaming_writer_commits_or_aborts_itself(tmp_path):
    first = AtomicFile(tmp_path / "train-000000.tar")
    with open(first.tmp, "wb") as f:
        f.write(b"members")
    assert first.commit() == tmp_path / "train-000000.tar"
    second = AtomicFile(tmp_path / "train-000001.tar")
    second.tmp.write_bytes(b"interrupted")
    second.abort()
    assert _names(tmp_path) == ["train-000000.tar"]
    assert (tmp_path / "train-000000.tar").read_bytes() == b"members"


# ------------------------------------------------------------------------------ folders
def test_a_folder_appears_whole_with_umask_permissions(tmp_path, umask_027):
    target = tmp_path / "model_onnx"
    with atomic_dir(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".model_onnx.") and staging.is_dir()
        assert not target.exists()
        (staging / "image.onnx").write_bytes(b"graph")
    assert _names(target) == ["image.onnx"]
    assert _mode(target) == 0o750 and _mode(target / "image.onnx") == 0o640
    assert _names(tmp_path) == ["model_onnx"]


def test_a_failed_folder_keeps_the_old_one_and_leaves_nothing(tmp_path):
    target = tmp_path / "model_onnx"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    with pytest.raises(ValueError, match="verification failed"):
        with atomic_dir(target, overwrite=True) as staging:
            (staging / "manifest.json").write_text("new")
            raise ValueError("verification failed")
    assert (target / "manifest.json").read_text() == "old"
    assert _names(tmp_path) == ["model_onnx"]


def test_overwrite_swaps_the_old_folder_out(tmp_path):
    target = tmp_path / "model_onnx"
    target.mkdir()
    (target / "stale.onnx").write_text("old")
    with atomic_dir(target, overwrite=True) as staging:
        (staging / "image.onnx").write_text("new")
    assert _names(target) == ["image.onnx"] and (target / "image.onnx").read_text() == "new"
    assert _names(tmp_path) == ["model_onnx"]  # the swapped-out folder is gone


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "model_onnx"
    target.mkdir()
    with atomic_dir(target) as staging:  # an empty folder is no data: replaced without overwrite
        (staging / "a").write_text("1")
    ran = []
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with atomic_dir(target):
            ran.append(True)  # refused before any work is done
    assert not ran and _names(target) == ["a"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass
    assert _names(tmp_path) == ["file", "model_onnx"]


def test_a_folder_written_by_someone_else_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with atomic_dir(target) as staging:
            (staging / "mine").write_text("1")
            target.mkdir()
            (target / "theirs").write_text("2")
    assert _names(target) == ["theirs"] and _names(tmp_path) == ["out"]


# ------------------------------------------------------------------------------ stale temporaries
def test_a_killed_writers_temporaries_are_removed_a_live_writers_kept(tmp_path, writer):
    out = tmp_path / "out"
    (out / "last.ckpt").write_text("previous run")
    assert writer.tmp.is_file() and (writer.staging / "part.bin").is_file()
    assert remove_stale_temporaries(out) == []  # the writer is alive: a concurrent run, hands off
    assert writer.tmp.is_file() and writer.staging.is_dir()
    writer.kill()
    assert sorted(remove_stale_temporaries(out)) == sorted([writer.tmp, writer.staging])
    assert _names(out) == ["last.ckpt"] and (out / "last.ckpt").read_text() == "previous run"


def test_only_our_names_are_swept(tmp_path):
    host, finished = (
        atomic._HOST,
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        ),
    )
    dead = int(finished.stdout)  # a process that has exited
    keep = [
        "x.tar",
        ".hidden",
        "notes.partial",
        ".x.tar.partial",
        f".x.tar.{host}.{dead}.partial",  # not our form
        f".x.tar.{host}.{os.getpid()}.0badc0de.partial",  # this very process: alive
        ".x.tar.elsewhere.1.00000000.partial",  # another host, recent: maybe still being written
        f".gone.{host}.{dead}.12345678.old",  # moved aside, but gone/ is missing: the only copy
        f".x.gpkg.{host}.{os.getpid()}.44444444.partial-journal",  # a live writer's SQLite journal
        f".x.gpkg.{host}.{dead}.55555555.partial-backup",  # not a side file of ours
    ]
    sweep = [
        f".x.tar.{host}.{dead}.abcdef01.partial",
        ".x.tar.elsewhere.1.11111111.partial",  # another host, untouched for two days
        f".model.{host}.{dead}.22222222.old",  # swapped-out folder whose replacement is in place
        f".x.gpkg.{host}.{dead}.33333333.partial",  # a GeoPackage whose run was killed (SIGKILL) ...
        f".x.gpkg.{host}.{dead}.33333333.partial-journal",  # ... and SQLite's journal beside it
        f".x.gpkg.{host}.{dead}.33333333.partial-wal",
    ]
    for name in keep + sweep:
        (tmp_path / name).write_text("x")
    (tmp_path / "model").mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / sweep[1], (two_days_ago, two_days_ago))
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(sweep)
    assert _names(tmp_path) == sorted([*keep, "model"])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_shards_and_checkpoints_sweep_their_folder(tmp_path, writer):
    import torch
    from PIL import Image

    from simfeatup.shards import make_shards
    from simfeatup.training.checkpoint import AtomicCheckpointIO

    out = tmp_path / "out"
    writer.kill()
    (tmp_path / "src").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "a.png")
    make_shards([tmp_path / "src"], str(out / "train-%06d.tar"), progress=False)
    assert _names(out) == ["train-000000.tar"]

    (out / "checkpoints").mkdir()
    stale = Writer(out / "checkpoints" / "last.ckpt", out / "checkpoints" / "x")
    stale.kill()
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, out / "checkpoints" / "last.ckpt")
    assert _names(out / "checkpoints") == ["last.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True) == {"global_step": 3}
