"""The class palette, legends and overlays of images and scenes."""
import colorsys
import math

import numpy as np
import pytest

from simfeatup import presets
from simfeatup.constants import NODATA_LABEL
from simfeatup.visualize import NODATA_COLOUR, SceneOverlay, blend, legend, overlay, palette


def _hue_sat(colour):
    h, s, _ = colorsys.rgb_to_hsv(*(c / 255 for c in colour))
    return h * 360, s


def test_the_palette_is_a_function_of_the_class_lines_and_never_black():
    lines = ["ship", "plane", "harbor", "bridge", "helicopter"]
    first = palette(lines)
    np.testing.assert_array_equal(first, palette(list(lines)))
    assert first.shape == (5, 3) and first.dtype == np.uint8
    assert (first.max(axis=1) > 60).all()  # class 0 included: no black, nor anything near it
    # user lines of no known kind: fixed, well separated colours
    assert min(math.dist(a, b) for i, a in enumerate(first.tolist()) for b in first.tolist()[i + 1 :]) >= 60
    many = palette([f"class {i}" for i in range(NODATA_LABEL)])
    assert len(many) == NODATA_LABEL and (many.max(axis=1) > 60).all()
    with pytest.raises(TypeError, match="class lines"):
        palette(3)


def test_land_cover_classes_get_their_conventional_colours_from_keywords():
    loveda = presets.load("loveda").classes  # background, building/roof/house, road, water, barren, forest, agric.
    colours = dict(zip(loveda, palette(loveda).tolist()))
    hue, sat = _hue_sat(colours["water"])
    assert 190 <= hue <= 230 and sat > 0.5  # blue
    hue, sat = _hue_sat(colours["forest"])
    assert 90 <= hue <= 150 and sat > 0.5  # green
    r, g, b = colours["building,roof,house"]
    assert r > 2 * g and r > 2 * b  # red
    assert len(set(colours["road"])) == 1  # grey
    assert _hue_sat(colours["background"])[1] < 0.15  # neutral
    # the same words in user lines, synonyms, plurals and other word orders
    mine = palette(["trees", "low vegetation", "houses,roof", "river,water", "clutter,background", "car"])
    assert [tuple(c) for c in mine[:5]] == [
        tuple(colours["forest"]),
        tuple(palette(["grass"])[0]),
        tuple(colours["building,roof,house"]),
        tuple(colours["water"]),
        tuple(colours["background"]),
    ]
    assert tuple(mine[5]) not in {tuple(c) for c in mine[:5]}


def test_a_second_class_of_the_same_kind_gets_another_shade():
    facade, roof, hut = palette(["facade", "roof", "hut,house"]).tolist()
    assert facade != roof != hut != facade
    assert all(r > g and r > b for r, g, b in (facade, roof, hut))  # all reds


def test_blend_tints_classes_and_leaves_nodata_alone():
    rgb = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, NODATA_LABEL], [1, 0, NODATA_LABEL]], np.uint8)
    colours = np.array([[200, 0, 0], [0, 200, 0]], np.uint8)
    out = blend(rgb, labels, colours, alpha=0.5)
    assert out[0, 0].tolist() == [150, 50, 50] and out[0, 1].tolist() == [50, 150, 50]
    assert out[:, 2].tolist() == [[100, 100, 100]] * 2


def test_overlays_carry_a_legend_of_every_class():
    classes = ["building,roof", "road", "tree"]
    colours = palette(classes)
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    labels = np.zeros((300, 400), np.uint8)
    picture = np.asarray(overlay(image, labels, classes))
    assert picture.shape[1] == 400 and picture.shape[0] > 300  # the legend strip is below the image
    np.testing.assert_array_equal(picture[:300], blend(image, labels, colours))
    strip = picture[300:].reshape(-1, 3)
    for colour in colours:  # a swatch of each class
        assert (strip == colour).all(axis=1).sum() >= 25
    assert (strip == (0, 0, 0)).all(axis=1).any()  # and black text
    # a narrow picture still fits the longest name: the strip widens, entries wrap
    narrow = legend(["a very long class name indeed", "b"], palette(["x", "y"]), 40)
    assert narrow.width > 40


def _reference(rgb, valid, labels, factor):
    """The overlay canvas of a whole scene in one go: cell means of valid pixels, the centre pixel's label."""
    h, w = labels.shape
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    mean = np.empty((ch, cw, 3), np.float64)
    seen = np.zeros((ch, cw), bool)
    centre = np.empty((ch, cw), np.uint8)
    for i in range(ch):
        for j in range(cw):
            cell = (slice(i * factor, (i + 1) * factor), slice(j * factor, (j + 1) * factor))
            ok = valid[cell]
            seen[i, j] = ok.any()
            mean[i, j] = rgb[cell][ok].mean(axis=0) if ok.any() else 0
            centre[i, j] = labels[min(i * factor + factor // 2, h - 1), min(j * factor + factor // 2, w - 1)]
    return mean, seen, centre


def test_a_scene_overlay_is_built_block_by_block_at_a_decimated_size():
    rng = np.random.default_rng(1)
    h, w, block = 250, 330, 112  # blocks do not align with the 4-pixel cells
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    valid = np.ones((h, w), bool)
    valid[:, :9] = False  # a nodata border: cells 0-1 empty, cell 2 partly valid
    labels = rng.integers(0, 3, (h, w)).astype(np.uint8)
    labels[~valid] = NODATA_LABEL
    classes = ["building", "road", "tree"]
    scene = SceneOverlay(h, w, classes, long_side=90)
    assert scene.factor == 4 and scene.shape == (63, 83)
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            box = slice(y0, y0 + block), slice(x0, x0 + block)
            scene.add(y0, x0, rgb[box], valid[box], labels[box])
    picture = np.asarray(scene.image())
    assert picture.shape[1] == 83 and picture.shape[0] > 63  # the canvas, then the legend

    mean, seen, centre = _reference(rgb, valid, labels, 4)
    expected = np.empty((63, 83, 3), np.uint8)
    expected[:] = NODATA_COLOUR
    expected[seen] = mean[seen].round()
    expected = blend(expected, np.where(seen, centre, NODATA_LABEL), palette(classes))
    assert (np.abs(picture[:63].astype(int) - expected) <= 1).all()  # float32 sums against float64 means
    assert (picture[:63, :2] == NODATA_COLOUR).all()
