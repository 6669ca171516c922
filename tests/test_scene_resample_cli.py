"""`simfeatup segment --gsd / --scale` (SPEC 9): scenes resampled before segmenting, as a user runs it."""
import logging

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from simfeatup.cli import main
from test_scene_cli import CLASSES, SAMPLE, _args, _one_line_error

NAME = "spacenet4_atlanta_pan.tif"


def test_scale_resamples_the_scene_and_keeps_its_crs_and_extent(tiny_weights, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="simfeatup"):
        assert main(["segment", str(SAMPLE), *CLASSES, "--out", str(out), "--scale", "0.5", *_args(tiny_weights)]) == 0
    assert "resampled from 512x512 to 256x256 (scale 0.5, GSD 1 m)" in caplog.text
    assert "256x256 labels at scale 0.5, GSD 1 m" in caplog.text
    assert cog_validate(str(out / NAME))[0]
    with rasterio.open(SAMPLE) as src, rasterio.open(out / NAME) as dst:
        assert dst.shape == (256, 256) and dst.crs == src.crs
        t, s = dst.transform, src.transform
        assert (t.a, t.b, t.c, t.d, t.e, t.f) == (2 * s.a, s.b, s.c, s.d, 2 * s.e, s.f)  # 1 m pixels, same extent
        assert dst.bounds == src.bounds
        labels = dst.read(1)
    assert set(np.unique(labels)) <= {0, 1, 2}
    # --gsd 1 on this 0.5 m raster is the same resampling
    assert main(["segment", str(SAMPLE), *CLASSES, "--out", str(tmp_path / "gsd"), "--gsd", "1",
                 *_args(tiny_weights)]) == 0
    with rasterio.open(tmp_path / "gsd" / NAME) as ds:
        assert ds.transform == t
        np.testing.assert_array_equal(ds.read(1), labels)


def test_block_size_does_not_change_a_resampled_scene(tiny_weights, tmp_path):
    written = []
    for block in ("224", "1792"):
        out = tmp_path / block
        argv = ["segment", str(SAMPLE), *CLASSES, "--out", str(out), "--scale", "0.7", "--block", block]
        assert main([*argv, *_args(tiny_weights)]) == 0
        with rasterio.open(out / NAME) as ds:
            assert ds.shape == (358, 358)
            written.append(ds.read(1))
    # as for native scenes: the window logits agree to float rounding across batchings, labels but at exact ties
    assert (written[0] == written[1]).mean() > 0.999


def _geographic(tmp_path):
    path = tmp_path / "lonlat.tif"
    profile = {"driver": "GTiff", "height": 460, "width": 470, "count": 3, "dtype": "uint8",
               "crs": CRS.from_epsg(4326), "transform": Affine(1e-5, 0, -84.4, 0, -1e-5, 33.7)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.random.default_rng(0).integers(0, 256, (3, 460, 470), dtype=np.uint8))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: _picture(tmp), "plain.png has no CRS, so its pixel size in metres is unknown: use --scale S"),
        (_geographic, "lonlat.tif has a geographic CRS (EPSG:4326): its pixel sizes are in degrees, not metres"),
    ],
)
def test_gsd_without_a_pixel_size_in_metres_is_one_line_before_the_model_loads(tiny_weights, tmp_path, capsys,
                                                                                make, message):
    out = tmp_path / "out"
    argv = ["segment", str(make(tmp_path)), *CLASSES, "--out", str(out), "--scene", "--gsd", "0.5"]
    assert main([*argv, *_args(tiny_weights)]) == 2
    line = _one_line_error(capsys)
    assert message in line and "--gsd 0.5" in line and "use --scale" in line
    assert not out.exists()


def _picture(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 150, 3), dtype=np.uint8)).save(path)
    return path


def test_scale_works_without_a_crs(tiny_weights, tmp_path):
    out = tmp_path / "out"
    argv = ["segment", str(_picture(tmp_path)), *CLASSES, "--out", str(out), "--scene", "--scale", "1.5"]
    assert main([*argv, *_args(tiny_weights)]) == 0
    with rasterio.open(out / "plain.tif") as ds:
        assert ds.shape == (180, 225) and ds.crs is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gsd", "0"], "'0' is not a positive number"),
        (["--scale", "-1"], "'-1' is not a positive number"),
        (["--scale", "nan"], "'nan' is not a positive number"),
        (["--gsd", "inf"], "'inf' is not a positive number"),
        (["--gsd", "x"], "'x' is not a positive number"),
        (["--gsd", "1", "--scale", "0.5"], "not allowed with argument"),
    ],
)
def test_bad_resolution_flags_are_refused_by_the_parser(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(SAMPLE), *CLASSES, "--out", str(tmp_path / "o"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
