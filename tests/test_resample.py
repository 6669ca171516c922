"""The uint8 bilinear resize of SPEC 2.1 for any output window, and scenes resampled with it (SPEC 9)."""
import cv2
import numpy as np
import pytest
from affine import Affine

from simfeatup.resample import ResampledScene, resize, scaled_size
from simfeatup.scene import ArrayScene, SceneError, block_boxes, touching_windows


def _cases():
    """(H, W, h, w): reductions and enlargements, integer and not, odd sizes, one-pixel axes, one axis kept."""
    rng = np.random.default_rng(0)
    cases = [
        (128, 96, 64, 48),  # exactly 2x smaller: cv2 takes its INTER_AREA fast path here
        (129, 97, 65, 49),  # nearly
        (120, 90, 40, 30),  # 3x: every output pixel is one source pixel
        (120, 96, 30, 24),  # 4x: two taps of weight 1/2
        (90, 120, 18, 24),  # 5x
        (64, 48, 128, 96),  # 2x larger
        (33, 35, 99, 105),  # 3x larger, odd
        (37, 41, 37, 20),  # one axis unchanged
        (50, 1, 25, 1),
        (1, 50, 1, 75),
        (1, 1, 3, 4),
        (7, 5, 1, 1),
        (512, 512, 256, 256),
        (300, 200, 449, 301),
    ]
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 260, 2))
        scale = float(np.exp(rng.uniform(np.log(0.08), np.log(4.0))))
        cases.append((h, w, *(max(1, v) for v in scaled_size(h, w, scale, scale))))
    return cases


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[rng.random((h, w)) < 0.2] = rng.choice([0, 255])  # extremes, where saturation and rounding bite
    return image


def test_whole_images_are_bit_identical_to_cv2_resize():
    mismatched = []
    for k, (h, w, dh, dw) in enumerate(_cases()):
        image = _image(h, w, k)
        expected = cv2.resize(image, (dw, dh), interpolation=cv2.INTER_LINEAR)
        got = resize(image, dh, dw)
        assert got.shape == expected.shape and got.dtype == np.uint8
        if not np.array_equal(got, expected):
            mismatched.append(((h, w, dh, dw), int(np.abs(got.astype(int) - expected).max())))
    assert not mismatched, f"(H, W, h, w), max deviation: {mismatched}"


def test_a_large_image_is_bit_identical_to_cv2_resize():
    image = _image(900, 1300, 1)
    for dh, dw in ((333, 481), (1621, 2340)):  # processed in several strips of rows
        expected = cv2.resize(image, (dw, dh), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize(image, dh, dw), expected)


def test_any_window_equals_that_slice_of_the_whole_result():
    rng = np.random.default_rng(2)
    for k, (h, w, dh, dw) in enumerate(_cases()[:60]):
        image = _image(h, w, k)
        whole = resize(image, dh, dw)
        for _ in range(5):
            r0, r1 = sorted(int(v) for v in rng.integers(0, dh + 1, 2))
            c0, c1 = sorted(int(v) for v in rng.integers(0, dw + 1, 2))
            r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
            if r1 > dh or c1 > dw:
                continue
            np.testing.assert_array_equal(resize(image, dh, dw, rows=(r0, r1), cols=(c0, c1)), whole[r0:r1, c0:c1])


class _Recording(ArrayScene):
    """An in-memory scene that records the boxes read from it."""

    def __init__(self, rgb, valid=None):
        super().__init__(rgb, valid)
        self.boxes = []

    def read(self, y0, y1, x0, x1):
        self.boxes.append((y0, y1, x0, x1))
        return super().read(y0, y1, x0, x1)


@pytest.mark.parametrize("scale", [0.5, 0.37, 1.6, 3.0])
def test_a_resampled_scene_reads_only_what_each_window_needs_and_equals_the_whole(scale):
    source = _Recording(_image(301, 467, 3))
    height, width = scaled_size(source.height, source.width, scale, scale)
    scene = ResampledScene(source, height, width)
    whole = cv2.resize(source.rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    # the boxes block streaming asks for: each block's touching windows, read as their union
    for box in block_boxes(height, width, 224):
        wins = touching_windows(height, width, box, 224, 112)
        y0, y1, x0, x1 = wins[0][0], wins[-1][1], wins[0][2], wins[-1][3]
        rgb, valid = scene.read(y0, y1, x0, x1)
        np.testing.assert_array_equal(rgb, whole[y0:y1, x0:x1])
        assert valid.all() and valid.shape == rgb.shape[:2]
        sy0, sy1, sx0, sx1 = source.boxes[-1]
        # the source rows/columns read are those the taps touch: within one pixel of the window's footprint
        assert sy0 >= int(y0 / scale) - 1 and sy1 <= min(source.height, int(y1 / scale) + 2)
        assert sx0 >= int(x0 / scale) - 1 and sx1 <= min(source.width, int(x1 / scale) + 2)


def test_the_valid_mask_keeps_exactly_the_pixels_nodata_cannot_reach():
    rng = np.random.default_rng(4)
    rgb = _image(120, 160, 5)
    valid = np.ones((120, 160), bool)
    valid[:, :30] = False  # a border strip
    valid[rng.random((120, 160)) < 0.01] = False  # scattered pixels
    for height, width in ((60, 80), (47, 63), (250, 333)):
        out = {}
        for seed in (0, 1):  # nodata pixels hold anything: valid outputs must not see it
            noisy = rgb.copy()
            noisy[~valid] = np.random.default_rng(seed).integers(0, 256, ((~valid).sum(), 3))
            out[seed] = ResampledScene(ArrayScene(noisy, valid), height, width).read(0, height, 0, width)
        (a, mask), (b, mask_b) = out[0], out[1]
        np.testing.assert_array_equal(mask, mask_b)
        np.testing.assert_array_equal(a[mask], b[mask])
        assert not mask[:, : int(30 * width / 160) - 1].any() and mask[:, int(31 * width / 160) + 1 :].mean() > 0.9
    # exactly 2x smaller: an output pixel is the mean of its 2 x 2 sources, invalid iff one of them is
    _, mask = ResampledScene(ArrayScene(rgb, valid), 60, 80).read(0, 60, 0, 80)
    np.testing.assert_array_equal(mask, valid.reshape(60, 2, 80, 2).all(axis=(1, 3)))


def test_the_transform_keeps_the_extent_with_pixels_of_the_new_size():
    source = ArrayScene(_image(300, 500, 6))
    source.transform = Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
    scene = ResampledScene(source, *scaled_size(300, 500, 0.3, 0.3))
    assert (scene.height, scene.width) == (90, 150)
    t = scene.transform
    assert t.a == pytest.approx(0.5 * 500 / 150) and t.e == pytest.approx(-0.5 * 300 / 90)
    assert (t.c, t.f) == (733601.0, 3725139.0)
    s = source.transform
    assert (t.a * 150 + t.c, t.e * 90 + t.f) == pytest.approx((s.a * 500 + s.c, s.e * 300 + s.f))  # same far corner


def test_a_scene_resampled_to_nothing_is_refused():
    with pytest.raises(SceneError, match="has no pixel left"):
        ResampledScene(ArrayScene(_image(10, 10, 7)), *scaled_size(10, 10, 0.01, 0.01))
