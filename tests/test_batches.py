"""`simfeatup segment` over batches: resuming, shards across array tasks, the shared legend, bad scenes."""
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.control import GroundControlPoint

from simfeatup import batches, scene_outputs
from simfeatup.batches import Shard, resolve_shard, take_shard
from simfeatup.cli import _parser, main
from simfeatup.entry import UsageError
from test_scene_cli import CLASSES, SAMPLE, _args, _crop, _one_line_error


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _segment(tiny_weights, inputs, out, *extra):
    return main(["segment", *map(str, inputs), *CLASSES, "--out", str(out), *extra, *_args(tiny_weights)])


def _no_model(*extra):
    """Model flags that fail as soon as the model loads: a run that succeeds with them never loaded it."""
    return ["--model", "ViT-B-16", "--pretrained", "/nonexistent/weights.bin", *extra]


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_skip_existing_redoes_only_inputs_with_missing_outputs(tiny_weights, pictures, tmp_path, caplog):
    out = tmp_path / "out"
    assert _segment(tiny_weights, [pictures], out, "--overlay") == 0
    a_labels = (out / "a.png").stat().st_mtime_ns
    (out / "b_overlay.jpg").unlink()  # b was killed between its files; the overlay is one of its outputs
    with caplog.at_level(logging.INFO, logger="simfeatup"):
        assert _segment(tiny_weights, [pictures], out, "--overlay", "--skip-existing") == 0
    assert "--skip-existing: 3 of 4 input(s) already have all their outputs" in caplog.text
    assert (out / "b_overlay.jpg").is_file() and (out / "a.png").stat().st_mtime_ns == a_labels
    # asking for another output makes every input unfinished again
    assert _segment(tiny_weights, [pictures], out, "--save-probs", "--skip-existing") == 0
    assert all((out / f"{n}_probs.npy").is_file() for n in "abcd")


def test_a_finished_batch_is_not_started_again(tiny_weights, tmp_path, caplog):
    piece = _crop(tmp_path, "piece.tif", 150, 240)
    out = tmp_path / "out"
    assert _segment(tiny_weights, [piece], out, "--scene") == 0
    # what a scene writes is exactly what --skip-existing looks for
    args = _parser().parse_args(["segment", "x", *CLASSES, "--out", str(out)])
    planned = scene_outputs.scene_output_paths(args, "piece")
    assert sorted(p.name for p in out.iterdir()) == sorted([batches.LEGEND, *(p.name for p in planned)])
    caplog.clear()
    argv = ["segment", str(piece), *CLASSES, "--out", str(out), "--scene", "--skip-existing", *_no_model()]
    with caplog.at_level(logging.INFO, logger="simfeatup"):
        assert main(argv) == 0
    assert "1 of 1 input(s) already have all their outputs" in caplog.text and "nothing left to segment" in caplog.text


@pytest.mark.parametrize(
    "environ, shard",
    [
        ({}, (0, 1)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "0"}, (3, 16)),
        # --array=1-16: the first task is shard 0
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "1",
          "SLURM_ARRAY_TASK_MAX": "16"}, (0, 16)),
        # --array=10-40:10
        ({"SLURM_ARRAY_TASK_ID": "30", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
          "SLURM_ARRAY_TASK_MAX": "40", "SLURM_ARRAY_TASK_STEP": "10"}, (2, 4)),
    ],
)
def test_a_slurm_array_task_is_its_place_in_the_array(environ, shard):
    found = resolve_shard(None, None, environ)
    assert (found.index, found.count) == tuple(shard)
    assert (found.source is None) == (not environ)


def test_shard_flags_override_slurm_and_are_checked():
    environ = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16"}
    assert resolve_shard(1, 2, environ) == Shard(1, 2)
    with pytest.raises(UsageError, match="not below --num-shards 2"):
        resolve_shard(2, 2)
    with pytest.raises(UsageError, match="both --shard-index and --num-shards, or neither"):
        resolve_shard(None, 4)
    irregular = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                 "SLURM_ARRAY_TASK_MAX": "9"}  # --array=1,4,9
    with pytest.raises(UsageError, match="not one evenly stepped range"):
        resolve_shard(None, None, irregular)
    with pytest.raises(UsageError, match="do not say its place"):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_ID": "3"})


def test_shards_split_the_sorted_inputs_whatever_their_order():
    paths = [Path(f"in/{n}.tif") for n in "edcba"]
    shards = [take_shard(paths, Shard(i, 2)) for i in range(2)]
    assert [[p.stem for p in s] for s in shards] == [["e", "c", "a"], ["d", "b"]]  # a, c, e | b, d; given order
    assert take_shard(list(reversed(paths)), Shard(1, 2)) == sorted(shards[1])
    assert take_shard(paths, Shard(0, 7)) == [Path("in/a.tif")] and take_shard(paths, Shard(6, 7)) == []


def test_array_tasks_share_one_output_folder(tiny_weights, pictures, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    written = []
    for task in range(3):  # --array=1-3: three tasks, each its own process in real life
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task + 1))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        before = set(out.iterdir()) if out.exists() else set()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="simfeatup"):
            assert _segment(tiny_weights, [pictures], out) == 0
        assert f"shard {task} of 3 (0-based, from SLURM_ARRAY_TASK_ID={task + 1}" in caplog.text
        written.append({p.name for p in set(out.iterdir()) - before} - {batches.LEGEND})
    assert written == [{"a.png", "d.png"}, {"b.png"}, {"c.png"}]
    legend = json.loads((out / batches.LEGEND).read_text())
    assert [c["class"] for c in legend] == ["building,roof", "road", "tree"]
    # a task whose shard is empty ends without loading the model
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert main(["segment", str(pictures), *CLASSES, "--out", str(out), *_no_model()]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard-index", "1"], "give both --shard-index and --num-shards, or neither"),
        (["--shard-index", "3", "--num-shards", "3"], "--shard-index 3 is not below --num-shards 3"),
    ],
)
def test_bad_shard_flags_are_one_line_before_the_model_loads(pictures, tmp_path, capsys, extra, message):
    assert main(["segment", str(pictures), *CLASSES, "--out", str(tmp_path / "o"), *extra, *_no_model()]) == 2
    assert message in _one_line_error(capsys)


def test_another_vocabulary_is_refused_in_an_earlier_runs_folder(tiny_weights, pictures, tmp_path, capsys):
    out = tmp_path / "out"
    assert _segment(tiny_weights, [pictures / "a.png"], out) == 0
    legend = (out / batches.LEGEND).read_text()
    other = ["--classes", "water;building"]
    argv = ["segment", str(pictures / "b.png"), *other, "--out", str(out)]
    assert main([*argv, *_no_model()]) == 2  # refused before the model loads
    line = _one_line_error(capsys)
    assert "'building,roof;road;tree'" in line and "'water;building'" in line and "--overwrite" in line
    assert (out / batches.LEGEND).read_text() == legend and not (out / "b.png").exists()
    assert main([*argv, "--overwrite", *_args(tiny_weights)]) == 0
    assert [c["class"] for c in json.loads((out / batches.LEGEND).read_text())] == ["water", "building"]
    # the same classes again: the legend is reused, not rewritten
    inode = (out / batches.LEGEND).stat().st_ino
    assert main([*argv, *_args(tiny_weights)]) == 0 and (out / batches.LEGEND).stat().st_ino == inode
    with pytest.raises(SystemExit):  # keeping earlier outputs and replacing them contradict each other
        main([*argv, "--overwrite", "--skip-existing", *_args(tiny_weights)])


def test_a_legend_that_cannot_be_read_is_refused(pictures, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / batches.LEGEND).write_text("{not json")
    assert main(["segment", str(pictures), *CLASSES, "--out", str(out), *_no_model()]) == 2
    assert "is not a legend simfeatup can read" in _one_line_error(capsys)


def _with(path, **changes):
    """Rewrite the raster ``path`` with its profile changed (transform, crs, gcps ...)."""
    with rasterio.open(path) as src:
        data, profile = src.read(), {**src.profile, **changes}
    gcps = profile.pop("gcps", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # no geotransform: the point
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if gcps:
                dst.gcps = gcps
    return path


def test_bad_scenes_are_one_line_each_and_the_batch_goes_on(tiny_weights, tmp_path, capfd, caplog):
    empty = _crop(tmp_path, "empty.tif", 150, 240)
    with rasterio.open(empty, "r+") as ds:
        ds.write(np.zeros((1, 150, 240), np.uint16))  # 0 is the sample's nodata value
    plain = tmp_path / "plain.png"
    Image.fromarray(np.full((150, 240, 3), 90, np.uint8)).save(plain)
    gcps = _with(_crop(tmp_path, "gcps.tif", 150, 240), crs=None, transform=Affine.identity(),
                 gcps=([GroundControlPoint(0, 0, 733601, 3725139), GroundControlPoint(150, 240, 733721, 3725064),
                        GroundControlPoint(0, 240, 733721, 3725139)], rasterio.crs.CRS.from_epsg(32616)))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(SAMPLE.read_bytes()[:200_000])  # a GeoTIFF header of 512x512: a scene, pixels cut off
    good = _crop(tmp_path, "good.tif", 150, 240)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="simfeatup"):
        code = _segment(tiny_weights, [empty, plain, gcps, good], out, "--scene", "--require-crs")
        code_truncated = _segment(tiny_weights, [truncated], out)
    assert code == 2 and code_truncated == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err.replace("ERROR simfeatup", "")  # no GDAL chatter
    assert "3 of 4 image(s) could not be segmented" in err and "1 of 1 image(s) could not be segmented" in err
    for name, reason in [
        ("empty.tif", "has no valid pixel (all of it is nodata)"),
        ("plain.png", "has no CRS (--require-crs)"),
        ("gcps.tif", "is located by ground control points, not a geotransform"),
        ("truncated.tif", "(a damaged or truncated file?)"),
    ]:
        [line] = [r.getMessage() for r in caplog.records if name in r.getMessage() and r.levelno == logging.ERROR]
        assert reason in line and "\n" not in line
    assert "scene 4/4: good.tif" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [batches.LEGEND, "good.tif"]  # nothing else, even hidden


def test_rotated_and_skewed_transforms_are_carried_over_exactly(tiny_weights, tmp_path):
    turned = Affine.translation(733601, 3725139) @ Affine.rotation(17.5) @ Affine.shear(3, 0) @ Affine.scale(0.5, -0.5)
    scene = _with(_crop(tmp_path, "turned.tif", 150, 240), transform=turned)
    out = tmp_path / "out"
    assert _segment(tiny_weights, [scene], out, "--scene", "--require-crs") == 0
    with rasterio.open(out / "turned.tif") as ds, rasterio.open(scene) as src:
        assert ds.transform == src.transform == turned and ds.crs == src.crs


def test_an_out_folder_that_cannot_be_created_is_one_line(tiny_weights, pictures, capsys):
    # /sys refuses new folders even to root, whom permission bits do not stop
    assert _segment(tiny_weights, [pictures / "a.png"], Path("/sys/simfeatup-test-out")) == 2
    line = _one_line_error(capsys)
    assert "--out /sys/simfeatup-test-out cannot be created" in line and "choose another folder" in line
