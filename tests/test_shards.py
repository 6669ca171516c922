"""make_shards: deterministic packing, skip reporting, pattern checks, no half-written shards."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from simfeatup import shards
from simfeatup.imaging import decode_image
from simfeatup.shards import make_shards

REPO = Path(__file__).resolve().parents[1]


def _jpg(value=100, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(value=50) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((9, 11, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tif16() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.arange(64 * 48, dtype=np.uint16).reshape(48, 64))
    return buf.getvalue()


def _members(paths):
    names = []
    for p in paths:
        with tarfile.open(p) as tar:
            names += [m.name for m in tar.getmembers()]
    return names


@pytest.fixture
def image_tree(tmp_path):
    src = tmp_path / "src"
    files = {
        "b/2.png": _png(),
        "a/1.jpg": _jpg(),
        "a/sub/3.tif": _tif16(),
        "a/1.png": _png(7),  # same stem as a/1.jpg: must get its own key
        "c.d/e.f.JPEG": _jpg(200),  # dots in folder and file names, upper-case suffix
        "notes.txt": b"hello",
        "empty.jpg": b"",
        "truncated.jpg": _jpg(size=(64, 64))[:300],
        "fake.png": b"this is not a png",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src, files


def test_round_trip_order_keys_and_skips(image_tree, tmp_path):
    src, files = image_tree
    summary = make_shards([src], str(tmp_path / "out" / "train-%06d.tar"), maxcount=2, progress=False)

    assert summary.written == 5 and summary.counts == [2, 2, 1]
    assert [p.name for p in summary.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert summary.urls == str(tmp_path / "out" / "train-{000000..000002}.tar")
    # sorted relative paths; keys without dots; extension from the contents
    assert _members(summary.shards) == ["a/1.jpg", "a/1_1.png", "a/sub/3.tif", "b/2.png", "c_d/e_f.jpg"]
    with tarfile.open(summary.shards[0]) as tar:
        assert tar.extractfile("a/1.jpg").read() == files["a/1.jpg"]  # bytes unchanged

    reasons = {Path(p).name: why.split(":")[0] for p, why in summary.skipped}
    assert reasons == {"notes.txt": "not an image", "empty.jpg": "empty", "truncated.jpg": "unreadable",
                       "fake.png": "not an image"}
    text = summary.describe()
    assert "wrote 5 images into 3 shards" in text and "skipped 4 files" in text and "truncated.jpg" in text
    assert not list((tmp_path / "out").glob(".*partial"))


def test_output_is_deterministic(image_tree, tmp_path):
    src, _ = image_tree
    a = make_shards([src], str(tmp_path / "a" / "s-%04d.tar"), maxcount=3, progress=False)
    b = make_shards([src], str(tmp_path / "b" / "s-%04d.tar"), maxcount=3, progress=False)
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in b.shards]


def test_maxsize_rotates_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(_jpg(i * 40, size=(64, 64)))
    summary = make_shards([src], str(tmp_path / "s-%06d.tar"), maxsize=3000, progress=False)
    assert summary.written == 4 and len(summary.shards) == 4
    assert all(len(_members([p])) == 1 for p in summary.shards)


def test_two_sources_with_the_same_names_get_distinct_keys(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "img.png").write_bytes(_png())
    summary = make_shards([tmp_path / "x", tmp_path / "y"], str(tmp_path / "s-%06d.tar"), progress=False)
    assert _members(summary.shards) == ["img.png", "img_1.png"]


@pytest.mark.parametrize("pattern, hint", [
    ("out/train-{000000..000009}.tar", "braces"),
    ("out/train.tar", "exactly one %d"),
    ("out/train-%06d-%06d.tar", "exactly one %d"),
    ("out/train-%s.tar", "exactly one %d"),
    ("out/train-%06d.zip", "must end with '.tar'"),
])
def test_bad_patterns_are_explained(pattern, hint, tmp_path):
    with pytest.raises(ValueError, match="%06d") as err:
        make_shards([tmp_path], pattern, progress=False)
    assert hint in str(err.value)


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        make_shards([tmp_path / "nope"], str(tmp_path / "s-%06d.tar"), progress=False)


def test_interrupted_run_leaves_no_half_written_shard(image_tree, tmp_path, monkeypatch):
    src, _ = image_tree
    real, calls = shards._read_file, []

    def flaky(path, verify):
        calls.append(path)
        if len(calls) == 5:  # after shard 0 (2 images) closed and shard 1 got 1 image
            raise KeyboardInterrupt
        return real(path, verify)

    monkeypatch.setattr(shards, "_read_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_shards([src], str(tmp_path / "out" / "t-%06d.tar"), maxcount=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t-000000.tar"]
    assert len(_members([tmp_path / "out" / "t-000000.tar"])) == 2


def test_bundled_sample_shards_are_real_held_out_images():
    train = sorted((REPO / "samples" / "shards").glob("train-*.tar"))
    val = sorted((REPO / "samples" / "shards").glob("val-*.tar"))
    assert len(train) >= 2 and len(val) >= 1
    contents = {}
    for split, paths in (("train", train), ("val", val)):
        contents[split] = set()
        for p in paths:
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    data = tar.extractfile(m).read()
                    img = decode_image(data, m.name.rsplit(".", 1)[1])
                    assert img.dtype == np.uint8 and img.shape[2] == 3 and min(img.shape[:2]) >= 224
                    contents[split].add(data)
    assert len(contents["train"]) >= 60 and len(contents["val"]) >= 10
    assert not contents["train"] & contents["val"]
