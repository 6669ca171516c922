"""`simfeatup segment` on georeferenced scenes (SPEC 9), as a user runs it, with the tiny registered model."""
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rio_cogeo.cogeo import cog_validate

from simfeatup.cli import main
from simfeatup.constants import NODATA_LABEL

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "geo" / "spacenet4_atlanta_pan.tif"
# real 4-band B, G, R, NIR float32 at 1 m, EPSG:32631, no colour tags (samples/README.md)
MULTISPECTRAL = SAMPLE.with_name("spacenet6_rotterdam_ms.tif")
CLASSES = ["--classes", "building,roof;road;tree"]


def _args(tiny_weights, *extra):
    name, weights = tiny_weights
    return ["--model", name, "--pretrained", str(weights), *extra]


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _crop(tmp_path, name, rows, cols, count=None):
    """A georeferenced piece of the sample (its CRS, the window's transform); ``count`` bands of it."""
    with rasterio.open(SAMPLE) as src:
        window = rasterio.windows.Window(0, 0, cols, rows)
        data = src.read(window=window)
        profile = {
            **src.profile,
            "height": rows,
            "width": cols,
            "tiled": False,
        }  # a window at (0, 0): the same transform
    if count:
        data = np.repeat(data, count, axis=0)
        profile["count"] = count
    path = tmp_path / name
    with rasterio.open(path, "w", **{k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize")}) as dst:
        dst.write(data)
    return path


def test_a_georeferenced_raster_larger_than_the_working_size_becomes_a_scene(tiny_weights, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="simfeatup"):
        assert main(["segment", str(SAMPLE), *CLASSES, "--out", str(out), *_args(tiny_weights)]) == 0
    assert (
        "a 512x512 GeoTIFF, larger than the working size 448: scene mode at native resolution"
        in caplog.text
    )
    labels = out / "spacenet4_atlanta_pan.tif"
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "spacenet4_atlanta_pan.tif"]
    assert cog_validate(str(labels))[0]
    with rasterio.open(SAMPLE) as src, rasterio.open(labels) as dst:
        assert dst.crs == src.crs and dst.transform == src.transform and dst.shape == src.shape
        assert set(np.unique(dst.read(1))) <= {0, 1, 2}


def test_block_size_does_not_change_what_the_command_writes(tiny_weights, tmp_path):
    written = []
    for block in ("224", "1792"):
        out = tmp_path / block
        assert main(["segment", str(SAMPLE), *CLASSES, "--out", str(out), "--block", block, *_args(tiny_weights)]) == 0
        with rasterio.open(out / "spacenet4_atlanta_pan.tif") as ds:
            written.append(ds.read(1))
    # the window logits agree to float rounding across batchings; labels only at exact ties could differ
    assert (written[0] == written[1]).mean() > 0.999


def test_image_mode_keeps_the_papers_mode_for_a_geotiff(tiny_weights, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(SAMPLE), *CLASSES, "--out", str(out), "--image-mode", *_args(tiny_weights)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "spacenet4_atlanta_pan.png"]
    assert Image.open(out / "spacenet4_atlanta_pan.png").size == (512, 512)


def test_small_geotiffs_stay_in_image_mode_unless_scene_is_asked_for(tiny_weights, tmp_path, caplog):
    small = _crop(tmp_path, "small.tif", 200, 300)
    border = _crop(tmp_path, "border.tif", 200, 300)
    with rasterio.open(border, "r+") as ds:
        data = ds.read()
        data[:, :, :50] = 0  # the sample's nodata value
        ds.write(data)
    plain = tmp_path / "plain.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)).save(plain)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="simfeatup"):
        assert main(["segment", str(small), *CLASSES, "--out", str(out), *_args(tiny_weights)]) == 0
    assert (out / "small.png").is_file() and not (out / "small.tif").exists()
    assert ("1 GeoTIFF(s) no larger than the working size 448 (e.g. small.tif) are segmented in image mode: their "
            "label maps carry no georeferencing (--scene") in caplog.text  # said, not dropped silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simfeatup"):
        assert (
            main(["segment", str(border), str(plain), *CLASSES, "--out", str(out), "--scene", *_args(tiny_weights)])
            == 0
        )
    assert "plain.png has no CRS: plain.tif is written without one" in caplog.text
    with rasterio.open(out / "border.tif") as ds:
        labels = ds.read(1)
        assert ds.crs == rasterio.open(border).crs
    assert (labels[:, :50] == NODATA_LABEL).all() and (labels[:, 50:] != NODATA_LABEL).all()
    with rasterio.open(out / "plain.tif") as ds:
        assert ds.crs is None and ds.shape == (120, 150)


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_the_torch_free_runtime_segments_scenes_too(onnx_dir, tmp_path, monkeypatch):
    import test_runtime
    from simfeatup.extras import TORCH_MODULES

    # torch made unimportable in this python: CI's runtime-only venv has no geo extra
    monkeypatch.setattr(test_runtime, "RUNTIME_PYTHON", sys.executable)
    scene = _crop(tmp_path, "piece.tif", 150, 240)  # 2 windows
    argv = ["segment", str(scene), *CLASSES, "--scene", "--onnx", str(onnx_dir)]
    done = test_runtime._run_without(TORCH_MODULES, [*argv, "--out", str(tmp_path / "free")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tried to import: []" in done.stdout
    assert main([*argv, "--out", str(tmp_path / "here")]) == 0
    with rasterio.open(tmp_path / "free" / "piece.tif") as free, rasterio.open(tmp_path / "here" / "piece.tif") as here:
        assert free.shape == (150, 240) and free.transform == rasterio.open(scene).transform and free.crs == here.crs
        np.testing.assert_array_equal(free.read(1), here.read(1))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bands", "0,1,5"], "--bands 0,1,5 does not fit"),
        ([], "has 4 bands and does not say which are red, green and blue: give --bands"),
    ],
)
def test_band_problems_end_in_one_line_before_the_model_loads(tiny_weights, tmp_path, capsys, extra, message):
    four = _crop(tmp_path, "four.tif", 460, 470, count=4)
    out = tmp_path / "out"
    assert main(["segment", str(four), *CLASSES, "--out", str(out), *extra, *_args(tiny_weights)]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()  # refused before anything was written (or the model loaded)


def test_a_real_four_band_scene_needs_bands_and_keeps_its_georeferencing(tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["segment", str(MULTISPECTRAL), *CLASSES, "--out", str(out), "--scene", *_args(tiny_weights)]
    assert main(argv) == 2  # B, G, R, NIR without colour tags: which bands are R, G, B is asked for
    assert "does not say which are red, green and blue: give --bands" in _one_line_error(capsys)
    assert not out.exists()
    assert main([*argv, "--bands", "2,1,0"]) == 0
    with rasterio.open(MULTISPECTRAL) as src, rasterio.open(out / "spacenet6_rotterdam_ms.tif") as labels:
        assert (labels.crs, labels.transform, labels.shape) == (src.crs, src.transform, src.shape)
        assert labels.crs.to_epsg() == 32631
        assert (labels.read(1) < 3).all()  # no nodata in this file: every pixel is one of the 3 classes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block", "200"], "not a positive multiple of the window stride 112"),
        (["--block", "x"], "not a positive multiple"),
        (["--scene", "--image-mode"], "not allowed with argument"),
    ],
)
def test_bad_scene_flags_are_refused_by_the_parser(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(SAMPLE), *CLASSES, "--out", str(tmp_path / "o"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_labels_never_overwrite_the_scene(tiny_weights, tmp_path, capsys):
    scene = tmp_path / "scene.tif"
    shutil.copy(SAMPLE, scene)
    assert main(["segment", str(scene), *CLASSES, "--out", str(tmp_path), *_args(tiny_weights)]) == 2
    assert "labels would overwrite it: choose another --out folder" in _one_line_error(capsys)
    assert scene.read_bytes() == SAMPLE.read_bytes()


def test_a_missing_geo_extra_is_one_line(tiny_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rasterio", None)  # as if the geo extra were not installed
    assert main(["segment", str(SAMPLE), *CLASSES, "--out", str(tmp_path / "o"), *_args(tiny_weights)]) == 2
    line = _one_line_error(capsys)
    assert 'needs rasterio, which is not installed: pip install "simfeatup[geo]"' in line and "--image-mode" in line


def test_unreadable_scenes_are_reported_and_the_others_are_written(tiny_weights, tmp_path, capsys, caplog):
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(SAMPLE.read_bytes()[:150_000])  # the header reads, the pixels do not
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 100)  # not even a header
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(truncated),
                str(broken),
                str(_crop(tmp_path, "piece.tif", 150, 240)),
                *CLASSES,
                "--out",
                str(out),
                "--scene",
                *_args(tiny_weights),
            ]
        )
        == 2
    )
    assert "2 of 3 image(s) could not be segmented" in _one_line_error(capsys)
    assert "truncated.tif" in caplog.text and "cannot read" in caplog.text and "broken.tif" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "piece.tif"]  # nothing half-written


def test_a_scene_gets_a_probability_raster_and_an_overlay_with_a_legend(tiny_weights, tmp_path):
    from simfeatup.visualize import NODATA_COLOUR, palette

    scene = tmp_path / "scene.tif"
    shutil.copy(SAMPLE, scene)
    with rasterio.open(scene, "r+") as ds:
        data = ds.read()
        data[:, :, :60] = 0  # the sample's nodata value
        ds.write(data)
    out = tmp_path / "out"
    argv = ["segment", str(scene), *CLASSES, "--out", str(out), "--overlay", "--save-probs", "--block", "448"]
    assert main([*argv, *_args(tiny_weights)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json", "scene.tif", "scene_overlay.jpg", "scene_probs.tif"
    ]
    with rasterio.open(scene) as src, rasterio.open(out / "scene_probs.tif") as pr:
        labels = rasterio.open(out / "scene.tif").read(1)
        assert pr.crs == src.crs and pr.transform == src.transform and pr.shape == src.shape
        assert pr.count == 3 and pr.descriptions == ("building,roof", "road", "tree") and pr.nodata == NODATA_LABEL
        probs = pr.read()
    nodata = labels == NODATA_LABEL
    assert nodata[:, :60].all() and not nodata[:, 60:].any()
    assert (probs[:, nodata] == NODATA_LABEL).all() and (probs[:, ~nodata] < NODATA_LABEL).all()
    top2 = np.sort(probs[:, ~nodata], axis=0)[-2:].astype(int)
    confident = top2[1] - top2[0] >= 2  # two rounding steps apart: the stored order is the true one
    assert confident.mean() > 0.5
    np.testing.assert_array_equal(probs[:, ~nodata].argmax(0)[confident], labels[~nodata][confident])

    picture = np.asarray(Image.open(out / "scene_overlay.jpg").convert("RGB")).astype(int)
    assert picture.shape[1] == 512 and 512 < picture.shape[0] < 600  # the scene (no decimation needed), a legend
    assert (np.abs(picture[:512, :50] - NODATA_COLOUR) <= 12).all()  # nodata neutral, not tinted (JPEG noise)
    strip = picture[512:].reshape(-1, 3)
    for colour in palette(["building,roof", "road", "tree"]):  # a swatch per class (JPEG: nearly exact)
        assert (np.abs(strip - colour).max(axis=1) <= 12).sum() >= 25


def _cache_seen_by_reads(tiny_weights, tmp_path, monkeypatch, name):
    """GDAL's block cache size (bytes, GDALGetCacheMax64) at each read of a scene by ``segment --scene``."""
    from rasterio._env import get_gdal_config

    from simfeatup import geo

    seen, read = [], geo.RasterScene.read

    def spying(self, *box):
        seen.append(get_gdal_config("GDAL_CACHEMAX"))
        return read(self, *box)

    monkeypatch.setattr(geo.RasterScene, "read", spying)
    argv = ["segment", str(SAMPLE), "--scene", *CLASSES, "--out", str(tmp_path / name), *_args(tiny_weights)]
    assert main(argv) == 0
    assert seen
    return seen


def test_scene_mode_caps_gdals_block_cache_and_keeps_a_users_own(tiny_weights, tmp_path, monkeypatch):
    from rasterio._env import get_gdal_config

    from simfeatup.geo import GDAL_CACHE_BYTES

    before = get_gdal_config("GDAL_CACHEMAX")  # GDAL's default, 5% of RAM: not the cap
    assert before != GDAL_CACHE_BYTES
    assert set(_cache_seen_by_reads(tiny_weights, tmp_path, monkeypatch, "capped")) == {GDAL_CACHE_BYTES}
    assert get_gdal_config("GDAL_CACHEMAX") == before  # restored after the scene
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES * 2):  # a library user's own setting
        assert set(_cache_seen_by_reads(tiny_weights, tmp_path, monkeypatch, "user")) == {GDAL_CACHE_BYTES * 2}
    monkeypatch.setenv("GDAL_CACHEMAX", "32")  # GDAL read its default already: what matters is it is left alone
    assert set(_cache_seen_by_reads(tiny_weights, tmp_path, monkeypatch, "env")) == {before}


@pytest.mark.slow
def test_a_scene_run_killed_mid_scene_leaves_no_file_and_the_rerun_completes(onnx_dir, tmp_path):
    import os
    import signal
    import subprocess
    import time

    argv = ["segment", str(SAMPLE), *CLASSES, "--scene", "--block", "112", "--onnx", str(onnx_dir), "--skip-existing"]
    code = "import sys; from simfeatup.cli import main; sys.exit(main(sys.argv[1:]))"
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--out", str(killed)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any(p.name.endswith(".partial") for p in killed.glob(".*")):  # blocks are being written
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "spacenet4_atlanta_pan.tif").exists()  # nothing under the final name
    assert main([*argv, "--out", str(killed)]) == 0  # the rerun redoes the unfinished scene
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".partial")]  # the kill's staging file swept
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    name = "spacenet4_atlanta_pan.tif"
    with rasterio.open(killed / name) as resumed, rasterio.open(tmp_path / "whole" / name) as whole:
        np.testing.assert_array_equal(resumed.read(1), whole.read(1))
