import sys

import cv2
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from simfeatup import imaging, windows
from simfeatup.constants import CLIP_MEAN, CLIP_STD


@pytest.mark.parametrize(
    "hw, expected",
    [((360, 600), (269, 448)), ((400, 133), (448, 149)), ((448, 448), (448, 448)), ((10, 10), (448, 448))],
)
def test_resized_shape_follows_spec_rounding(hw, expected):
    assert imaging.resized_shape(*hw) == expected


def test_preprocess_resizes_uint8_with_opencv_before_normalising():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (360, 600, 3), dtype=np.uint8)
    x = imaging.preprocess(image)
    resized = cv2.resize(image, (448, 269), interpolation=cv2.INTER_LINEAR)
    expected = (resized / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert x.shape == (3, 269, 448) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), atol=1e-5)
    # Normalising first then resizing in float is what SPEC 2.1 forbids; it gives other values.
    wrong = cv2.resize(((image / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32), (448, 269))
    assert np.abs(wrong.transpose(2, 0, 1) - x).max() > 1e-3


@pytest.mark.parametrize(
    "length, starts",
    [(448, [0, 112, 224]), (269, [0, 45]), (224, [0]), (100, [0]), (300, [0, 76]), (449, [0, 112, 224, 225])],
)
def test_window_starts_shift_the_last_window_inside(length, starts):
    assert windows.window_starts(length) == starts


@pytest.mark.parametrize("h, w", [(448, 448), (269, 448), (448, 149), (100, 448), (37, 23), (224, 225)])
def test_windows_cover_every_pixel_and_stay_inside(h, w):
    cover = np.zeros((h, w), int)
    for y0, y1, x0, x1 in windows.window_boxes(h, w):
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert y1 - y0 == min(224, h) and x1 - x0 == min(224, w)
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1


def test_square_448_gives_nine_windows():
    assert len(windows.window_boxes(448, 448)) == 9


@pytest.mark.parametrize("size, pads", [(224, (0, 0)), (149, (5, 6)), (100, (6, 6)), (17, (7, 8))])
def test_padding_to_patch_multiple_puts_half_first(size, pads):
    assert windows.padding(size, 16) == pads
    assert (size + sum(pads)) % 16 == 0


@pytest.mark.parametrize(
    "src, dst", [((7, 9), (16, 31)), ((40, 30), (13, 17)), ((448, 269), (360, 600)), ((5, 5), (5, 12))]
)
def test_resize_bilinear_matches_torch(src, dst):
    x = np.random.default_rng(1).standard_normal((3, *src)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(x)[None], size=dst, mode="bilinear", align_corners=False, antialias=False
    )[0]
    np.testing.assert_allclose(imaging.resize_bilinear(x, dst), expected.numpy(), atol=1e-5)


def test_wrong_bands_and_stretch_are_named(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((4, 8, 8), np.uint16))
    with pytest.raises(imaging.ImageError, match=r"bands=\(4, 2, 1\) does not fit a 4-band image"):
        imaging.load_image(tmp_path / "m.tif", bands=(4, 2, 1))
    with pytest.raises(imaging.ImageError, match="stretch='log'"):
        imaging.load_image(tmp_path / "m.tif", stretch="log")


def test_load_image_formats(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    assert np.array_equal(imaging.load_image(tmp_path / "a.png"), rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "b.png"), rgba[..., [2, 1, 0, 3]])
    assert np.array_equal(imaging.load_image(tmp_path / "b.png"), rgb)
    cv2.imwrite(str(tmp_path / "g.png"), rgb[..., 0])
    assert imaging.load_image(tmp_path / "g.png").shape == (20, 30, 3)
    deep = rgb.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "d.png"), deep[..., ::-1])
    assert np.array_equal(imaging.load_image(tmp_path / "d.png", stretch=65535), rgb)
    bands = np.stack([rgb[..., 2], rgb[..., 1], rgb[..., 0], rgb[..., 0]])  # (4, H, W), band-first B,G,R,NIR
    tifffile.imwrite(tmp_path / "m.tif", bands)
    assert np.array_equal(imaging.load_image(tmp_path / "m.tif", bands=(2, 1, 0)), rgb)


@pytest.mark.parametrize("compression", ["lzw", "deflate"])
def test_compressed_tiffs_are_read_without_imagecodecs(tmp_path, monkeypatch, compression):
    # tifffile decodes LZW only through imagecodecs (not in the default install): OpenCV reads it
    # as installed by default: tifffile's own codecs (zlib, no LZW), whether or not imagecodecs is there
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    from tifffile import _imagecodecs

    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", _imagecodecs)
    fallback = []
    read = imaging._read_tiff_cv2
    monkeypatch.setattr(imaging, "_read_tiff_cv2", lambda *a: fallback.append(1) or read(*a))
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    code = {"lzw": 5, "deflate": 8}[compression]  # TIFF compression tag values
    assert cv2.imwrite(str(tmp_path / "c.tif"), rgb[..., ::-1], [cv2.IMWRITE_TIFF_COMPRESSION, code])
    assert np.array_equal(imaging.load_image(tmp_path / "c.tif"), rgb)
    assert fallback == ([1] if compression == "lzw" else [])  # tifffile decodes Deflate itself (zlib)


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(imaging.ImageError, match="image not found"):
        imaging.load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(imaging.ImageError, match="cannot read image") as err:
        imaging.load_image(tmp_path / "notes.png")
    assert "\n" not in str(err.value)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(imaging.ImageError, match="cannot read image"):
        imaging.load_image(tmp_path / "bad.tif")


def test_check_size_refuses_images_below_one_patch():
    imaging.check_size(np.zeros((16, 16, 3), np.uint8), 16)
    with pytest.raises(imaging.ImageError, match="smaller than one 16-pixel patch"):
        imaging.check_size(np.zeros((15, 40, 3), np.uint8), 16, "tiny.png")


def test_window_batches_cover_every_window_once_in_same_shape_batches():
    sizes = [(448, 448), (269, 448), (100, 130)]
    batches = list(windows.window_batches(sizes, 224, 112, 16, 4))
    seen = [(i, box) for batch in batches for i, box, _ in batch]
    assert sorted(seen) == sorted(
        (i, box) for i, size in enumerate(sizes) for box in windows.window_boxes(*size, 224, 112)
    )
    for batch in batches:
        assert 1 <= len(batch) <= 4
        shapes = {(y1 - y0 + sum(pads[0]), x1 - x0 + sum(pads[1])) for _, (y0, y1, x0, x1), pads in batch}
        assert len(shapes) == 1 and all(n % 16 == 0 for n in shapes.pop())
