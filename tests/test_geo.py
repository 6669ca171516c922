"""Rasters in scene mode (SPEC 9): windowed reads, bands, nodata, the label Cloud-Optimised GeoTIFF."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio import Affine
from rio_cogeo.cogeo import cog_validate

from simfeatup import imaging
from simfeatup.constants import NODATA_LABEL
from simfeatup.geo import (
    PROB_SCALE,
    LabelRaster,
    ProbRaster,
    RasterScene,
    SceneError,
    choose_bands,
    overview_factors,
    quantise_probs,
)
from simfeatup.scene import segment_scene
from simfeatup.visualize import palette
from simfeatup.vocabulary import Vocabulary

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "geo" / "spacenet4_atlanta_pan.tif"
VOCAB = Vocabulary.from_spec("building,roof;road;tree")
CLASSES = [",".join(c) for c in VOCAB.classes]


@pytest.fixture(scope="module")
def segmenter():
    from conftest import TINY_CLIP
    from simfeatup.encoder import DenseCLIP
    from simfeatup.segmenter import Segmenter

    torch.manual_seed(0)
    # one window per model call: every window's logits are then bit-identical whatever the
    # block, so labels can be compared exactly
    return Segmenter(DenseCLIP.from_config(TINY_CLIP), None, window_batch=1, cache=False)


def _write(path, data, **profile):
    """A GeoTIFF of ``data`` (C, H, W) in the sample's CRS."""
    base = {
        "driver": "GTiff",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype,
        "crs": "EPSG:32616",
        "transform": Affine(0.5, 0, 733601.0, 0, -0.5, 3725139.0),
    }
    with rasterio.open(path, "w", **{**base, **profile}) as ds:
        ds.write(data)
    return path


def _with_nodata_border(tmp_path, width=40):
    with rasterio.open(SAMPLE) as src:
        data, profile = src.read(), src.profile
    data[:, :width] = 0  # the sample's nodata value
    data[:, :, -width:] = 0
    return _write(tmp_path / "bordered.tif", data, **{k: profile[k] for k in ("crs", "transform", "nodata")})


def _segment_to(path, reader, segmenter, block):
    with LabelRaster(
        path,
        height=reader.height,
        width=reader.width,
        crs=reader.crs,
        transform=reader.transform,
        classes=CLASSES,
        block=block,
    ) as raster:
        for b in segment_scene(segmenter, reader, VOCAB, text=segmenter.query_embeddings(VOCAB, _TEXT), block=block):
            raster.write(b.y0, b.y1, b.x0, b.x1, b.labels)
    return path


_TEXT = torch.nn.functional.normalize(
    torch.randn(len(VOCAB.queries), 32, generator=torch.Generator().manual_seed(1)), dim=1
).numpy()


# ------------------------------------------------------------------ bands
@pytest.mark.parametrize(
    "colorinterp, bands, expected",
    [
        (["red", "green", "blue"], None, (1, 2, 3)),
        (["blue", "green", "red", "undefined"], None, (3, 2, 1)),  # tagged B, G, R, NIR
        (["red", "green", "blue", "alpha"], None, (1, 2, 3)),
        (["gray", "undefined", "undefined"], None, (1, 2, 3)),  # 3 untagged bands are R, G, B
        (["gray"], None, (1, 1, 1)),
        (["gray", "alpha"], None, (1, 1, 1)),
        (["gray", "undefined", "undefined", "undefined"], (2, 1, 0), (3, 2, 1)),
        (["red", "green", "blue"], (2, 1, 0), (3, 2, 1)),  # --bands wins over the tags
    ],
)
def test_bands_come_from_the_colour_interpretation_or_the_flag(colorinterp, bands, expected):
    assert choose_bands(colorinterp, bands, "x.tif") == expected


@pytest.mark.parametrize(
    "colorinterp, bands, message",
    [
        (
            ["gray", "undefined", "undefined", "undefined"],
            None,
            "x.tif has 4 bands and does not say which are red, green and blue: give --bands",
        ),
        (["gray", "undefined"], None, "x.tif has 2 bands"),
        (["red", "green", "blue"], (0, 1, 3), "--bands 0,1,3 does not fit x.tif, which has 3 band"),
        (["red", "green", "blue"], (0, 1), "give 3 indices in 0..2"),
        (["palette"], None, "palette"),
    ],
)
def test_bands_that_cannot_be_chosen_are_refused_in_one_line(colorinterp, bands, message):
    with pytest.raises(SceneError, match=message) as err:
        choose_bands(colorinterp, bands, "x.tif")
    assert "\n" not in str(err.value)


def test_a_four_band_file_without_tags_needs_bands_before_anything_is_read(tmp_path):
    path = _write(tmp_path / "bgrn.tif", np.ones((4, 20, 30), np.uint16))
    with pytest.raises(SceneError, match="give --bands"):
        RasterScene(path)
    with RasterScene(path, bands=(2, 1, 0)) as reader:
        assert reader.indexes == (3, 2, 1)


# ------------------------------------------------------------------ reading
def test_sixteen_bit_scenes_are_stretched_with_whole_scene_statistics(tmp_path):
    with rasterio.open(SAMPLE) as src:
        raw = src.read(1)
    lo, hi = imaging.stretch_limits(np.repeat(raw.reshape(-1, 1), 3, axis=1), "percentile")
    with RasterScene(SAMPLE) as reader:
        assert (reader.height, reader.width) == raw.shape and reader.georeferenced
        for y0, y1, x0, x1 in [(0, 100, 0, 512), (300, 512, 200, 260)]:
            rgb, valid = reader.read(y0, y1, x0, x1)
            assert rgb.dtype == np.uint8 and valid.all()
            # the same limits in every block: a block's own percentiles would differ
            np.testing.assert_array_equal(
                rgb, imaging.apply_stretch(np.repeat(raw[y0:y1, x0:x1, None], 3, axis=2), lo, hi)
            )


def test_large_scenes_take_their_statistics_from_a_decimated_read(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "STATS_MAX_PIXELS", 64 * 64)
    shapes = []
    real = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        shapes.append(kwargs.get("out_shape"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    with RasterScene(SAMPLE) as reader:
        assert shapes == []  # opening a scene (to check it) reads no pixels
        reader.read(0, 10, 0, 10)
        reader.read(10, 20, 0, 10)
    # one read of the whole scene 8 x 8 times smaller (512 / 64), once; blocks are windowed
    # reads at full resolution
    assert shapes == [(3, 64, 64), None, None]


def test_nodata_comes_from_the_nodata_value_and_the_alpha_band(tmp_path):
    with RasterScene(_with_nodata_border(tmp_path)) as reader:
        _, valid = reader.read(0, 512, 0, 512)
    expected = np.ones((512, 512), bool)
    expected[:40] = expected[:, -40:] = False
    np.testing.assert_array_equal(valid, expected)

    rgba = np.random.default_rng(0).integers(0, 256, (4, 30, 40), dtype=np.uint8)
    rgba[3] = 255
    rgba[3, 5:9, 10:30] = 0
    path = _write(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    with RasterScene(path) as reader:
        rgb, valid = reader.read(0, 30, 0, 40)
    assert reader.indexes == (1, 2, 3)
    np.testing.assert_array_equal(rgb, np.moveaxis(rgba[:3], 0, -1))  # uint8 is not stretched
    np.testing.assert_array_equal(valid, rgba[3] > 0)


def test_unreadable_files_end_in_one_line(tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SceneError, match="cannot read .*broken.tif"):
        RasterScene(broken)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(SAMPLE.read_bytes()[:150_000])
    with pytest.raises(SceneError, match="truncated.tif") as err:
        with RasterScene(truncated) as reader:
            reader.read(0, reader.height, 0, reader.width)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ writing
def test_label_raster_is_a_cog_in_the_scene_crs_with_nodata_kept(tmp_path, segmenter):
    source = _with_nodata_border(tmp_path)
    with RasterScene(source) as reader:
        out = _segment_to(tmp_path / "out" / "labels.tif", reader, segmenter, block=224)
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.tif"]  # no staging file left
    assert cog_validate(str(out)) == (True, [], [])
    with rasterio.open(source) as src, rasterio.open(out) as dst:
        assert (
            dst.crs == src.crs and dst.transform == src.transform and (dst.height, dst.width) == (src.height, src.width)
        )
        labels, nodata_in = dst.read(1), src.read_masks(1) == 0
        assert dst.nodata == NODATA_LABEL and dst.profile["compress"] == "deflate" and dst.block_shapes == [(512, 512)]
        assert json.loads(dst.tags()["classes"]) == ["building,roof", "road", "tree"]
        # the palette of every other output (a road is grey), nodata transparent
        assert dst.colormap(1)[1] == (110, 110, 110, 255) and dst.colormap(1)[NODATA_LABEL][3] == 0
        assert [dst.colormap(1)[k][:3] for k in range(3)] == [tuple(c) for c in palette(CLASSES).tolist()]
    np.testing.assert_array_equal(labels == NODATA_LABEL, nodata_in)
    assert set(np.unique(labels[~nodata_in])) <= {0, 1, 2}


def test_probability_raster_has_a_band_per_class_in_the_scene_crs(tmp_path, segmenter):
    source = _with_nodata_border(tmp_path)
    path = tmp_path / "out" / "probs.tif"
    labels = np.zeros((512, 512), np.uint8)
    probs = np.zeros((3, 512, 512), np.float32)
    text = segmenter.query_embeddings(VOCAB, _TEXT)
    with RasterScene(source) as reader:
        with ProbRaster(
            path, height=512, width=512, crs=reader.crs, transform=reader.transform, classes=CLASSES, block=224
        ) as raster:
            for b in segment_scene(segmenter, reader, VOCAB, text=text, block=224, return_probs=True):
                raster.write_probs(b.y0, b.y1, b.x0, b.x1, b.probs, b.valid)
                labels[b.y0 : b.y1, b.x0 : b.x1], probs[:, b.y0 : b.y1, b.x0 : b.x1] = b.labels, b.probs
    assert sorted(p.name for p in path.parent.iterdir()) == ["probs.tif"]
    assert cog_validate(str(path)) == (True, [], [])
    with rasterio.open(source) as src, rasterio.open(path) as dst:
        assert dst.crs == src.crs and dst.transform == src.transform and dst.shape == src.shape
        assert dst.count == 3 and dst.dtypes == ("uint8",) * 3 and dst.nodata == NODATA_LABEL
        assert dst.descriptions == tuple(CLASSES) and json.loads(dst.tags()["classes"]) == CLASSES
        assert dst.scales == (1 / PROB_SCALE,) * 3 and "value / 254" in dst.tags()["probability"]
        stored, nodata_in = dst.read(), src.read_masks(1) == 0
    assert (stored[:, nodata_in] == NODATA_LABEL).all() and (stored[:, ~nodata_in] <= PROB_SCALE).all()
    p = stored[:, ~nodata_in] / PROB_SCALE
    np.testing.assert_allclose(p, probs[:, ~nodata_in], atol=0.5 / PROB_SCALE + 1e-6)  # rounded, not floored
    top2 = np.sort(probs[:, ~nodata_in], axis=0)[-2:]
    confident = top2[1] - top2[0] > 1 / PROB_SCALE  # rounding cannot swap the two best there
    assert confident.mean() > 0.5
    np.testing.assert_array_equal(stored[:, ~nodata_in].argmax(0)[confident], labels[~nodata_in][confident])


def test_quantised_probabilities_keep_the_nodata_value():
    probs = np.array([[[0.0, 0.5], [1.0, 0.3]], [[1.0, 0.5], [0.0, 0.7]]], np.float32)
    valid = np.array([[True, True], [True, False]])
    np.testing.assert_array_equal(quantise_probs(probs, valid), [[[0, 127], [254, 255]], [[254, 127], [0, 255]]])


def test_block_size_does_not_change_the_written_labels(tmp_path, segmenter):
    source = _with_nodata_border(tmp_path)
    written = []
    for block in (224, 336, 1792):
        with RasterScene(source) as reader:
            path = _segment_to(tmp_path / f"labels_{block}.tif", reader, segmenter, block=block)
        with rasterio.open(path) as ds:
            written.append(ds.read(1))
    for labels in written[1:]:
        np.testing.assert_array_equal(labels, written[0])
    assert len(np.unique(written[0])) > 2  # the scene is not one flat class


def test_overviews_pick_labels_never_average_them(tmp_path):
    labels = np.indices((1100, 700)).sum(axis=0) % 2 * 2  # 0/2 checkerboard: an average would make 1
    labels[:30] = NODATA_LABEL
    path = tmp_path / "big.tif"
    with LabelRaster(
        path, height=1100, width=700, crs="EPSG:32616", transform=Affine.identity(), classes=["a", "b", "c"], block=448
    ) as raster:
        for y0 in range(0, 1100, 448):
            for x0 in range(0, 700, 448):
                raster.write(y0, min(y0 + 448, 1100), x0, min(x0 + 448, 700), labels[y0 : y0 + 448, x0 : x0 + 448])
    assert overview_factors(1100, 700) == [2, 4]
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4]
        np.testing.assert_array_equal(ds.read(1), labels)
        for factor in (2, 4):
            small = ds.read(1, out_shape=(1100 // factor, 700 // factor))
            assert set(np.unique(small)) <= {0, 2, NODATA_LABEL}
    assert cog_validate(str(path))[0]


@pytest.mark.parametrize("where", ["while writing blocks", "while finishing the COG"])
def test_an_interrupted_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch, where):
    path = tmp_path / "labels.tif"
    old = tmp_path / "kept.tif"
    old.write_bytes(b"the previous run's labels")
    if where == "while finishing the COG":
        import rasterio.shutil

        monkeypatch.setattr(rasterio.shutil, "copy", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    for target in (path, old):
        with pytest.raises(KeyboardInterrupt):
            with LabelRaster(
                target, height=500, width=500, crs=None, transform=Affine.identity(), classes=["a"], block=224
            ) as raster:
                raster.write(0, 224, 0, 224, np.zeros((224, 224), np.uint8))
                if where == "while writing blocks":
                    raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.tif"]  # no staging file left either
    assert old.read_bytes() == b"the previous run's labels"
