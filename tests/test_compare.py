"""`simfeatup compare` and its picture: image | bilinear | SimFeatUp | where they differ, above a legend."""
import re

import numpy as np
import pytest
from PIL import Image

from simfeatup.cli import main
from simfeatup.visualize import (
    COMPARE_LONG_SIDE,
    comparison,
    differing,
    enlargement,
    grid_layout,
    legend,
    palette,
)

CLASSES = ["building", "road", "tree", "water"]


def _layout(height, width, classes=CLASSES):
    """(picture size, panel origins, panel size) of a comparison of an image shown at height x width."""
    (w, h), origins = grid_layout(1, 4, height, width, note=True)
    strip = legend(classes, palette(classes), w)
    return (max(w, strip.width), h + strip.height), origins[0], (height, width)


def test_the_comparison_picture_shows_the_image_both_results_and_where_they_differ():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    bilinear = np.zeros((30, 40), np.uint8)
    upsampled = bilinear.copy()
    upsampled[10:20, 10:30] = 2  # SimFeatUp says "tree" in a 10 x 20 block
    assert differing(bilinear, upsampled) == pytest.approx(200 / 1200)
    picture = np.asarray(comparison(image, bilinear, upsampled, CLASSES, note="x.png"))
    scale = enlargement(30, 40)
    assert scale == 6  # a 40 px wide image is shown 240 px wide, each pixel a 6 x 6 block
    size, origins, (h, w) = _layout(30 * scale, 40 * scale)
    assert picture.shape == (size[1], size[0], 3)
    x, y = origins[0]
    np.testing.assert_array_equal(picture[y:y + h:scale, x:x + w:scale], image)
    colours = palette(CLASSES)
    x, y = origins[3]  # where they differ: SimFeatUp's colour inside the block, a black rim, a grey photo outside
    diff = picture[y:y + h, x:x + w].astype(int)  # at display resolution: the rim is one pixel thin
    block = diff[10 * scale:20 * scale, 10 * scale:30 * scale]
    np.testing.assert_array_equal(block[1:-1, 1:-1], np.broadcast_to(colours[2], (10 * scale - 2, 20 * scale - 2, 3)))
    assert (block[[0, -1]] == 0).all() and (block[:, [0, -1]] == 0).all()
    outside = diff[:8 * scale]
    assert (outside[..., 0] == outside[..., 1]).all() and (outside >= 127).all()  # faded grey


def test_large_images_are_shrunk_to_a_viewable_size():
    image = np.zeros((500, 3000, 3), np.uint8)
    labels = np.zeros((500, 3000), np.uint8)
    picture = comparison(image, labels, labels, CLASSES)
    height = round(500 * COMPARE_LONG_SIDE / 3000)
    (w, h), _ = grid_layout(1, 4, height, COMPARE_LONG_SIDE, note=False)
    assert picture.width == w and picture.height == h + legend(CLASSES, palette(CLASSES), w).height


@pytest.fixture
def picture_file(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "tile.png")
    return folder / "tile.png"


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_compare_writes_the_picture_and_prints_the_share_that_differs(artefacts, tiny_weights, picture_file,
                                                                      tmp_path, capsys):
    from simfeatup.imaging import load_image
    from simfeatup.segmenter import build_segmenter
    from simfeatup.vocabulary import Vocabulary

    upsampler, _ = artefacts
    name, weights = tiny_weights
    out = tmp_path / "out"
    code = main(["compare", str(picture_file), "--classes", ";".join(CLASSES), "--upsampler", str(upsampler),
                 "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["tile_compare.jpg"]
    picture = Image.open(out / "tile_compare.jpg")
    scale = enlargement(48, 64)
    assert picture.format == "JPEG" and picture.size == _layout(48 * scale, 64 * scale)[0]
    printed = re.search(r"^tile\.png\s+([\d.]+) %$", capsys.readouterr().out, re.M)
    assert printed
    # The same share from the library: SimFeatUp, and the bilinear baseline of the same backbone.
    vocab, image = Vocabulary.from_spec(";".join(CLASSES)), load_image(picture_file)
    [up] = build_segmenter(upsampler).segment([image], vocab)
    [base] = build_segmenter("bilinear", model=name, pretrained=str(weights)).segment([image], vocab)
    assert float(printed[1]) == pytest.approx(100 * differing(base.labels, up.labels), abs=0.051)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "compare needs --upsampler ARTEFACT"),
        (["--upsampler", "bilinear"], "compare needs --upsampler ARTEFACT"),
        (["--onnx", "ONNX"], "give --onnx-bilinear DIR"),
        (["--onnx-bilinear", "ONNX"], "--onnx-bilinear needs --onnx DIR too"),
        (["--onnx", "ONNX", "--onnx-bilinear", "ONNX"], "is not a bilinear export (simfeatup)"),
    ],
)
def test_bad_compare_flags_are_one_line(extra, message, onnx_dir, picture_file, tmp_path, capsys):
    extra = [str(onnx_dir) if e == "ONNX" else e for e in extra]
    out = tmp_path / "out"
    assert main(["compare", str(picture_file), "--classes", "a;b", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("simfeatup compare: error: ") and message in err[-1]
    assert not out.exists()


def test_compare_of_a_missing_image_is_one_line(artefacts, tmp_path, capsys):
    code = main(["compare", str(tmp_path / "nope.png"), "--classes", "a;b", "--upsampler", str(artefacts[0]),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"simfeatup compare: error: image not found: {tmp_path / 'nope.png'}"


@pytest.mark.slow
def test_compare_with_two_onnx_folders(onnx_dir, tiny_weights, picture_file, tmp_path, capsys):
    from conftest import load_script

    name, weights = tiny_weights
    bilinear = tmp_path / "bilinear_onnx"
    assert load_script("export/to_onnx.py").main(
        ["--upsampler", "bilinear", "--model", name, "--pretrained", str(weights), "--out", str(bilinear)]
    ) == 0
    out = tmp_path / "out"
    assert main(["compare", str(picture_file), "--classes", ";".join(CLASSES), "--onnx", str(onnx_dir),
                 "--onnx-bilinear", str(bilinear), "--out", str(out), "--device", "cpu"]) == 0
    scale = enlargement(48, 64)
    assert Image.open(out / "tile_compare.jpg").size == _layout(48 * scale, 64 * scale)[0]
    assert re.search(r"^tile\.png\s+[\d.]+ %$", capsys.readouterr().out, re.M)
    # swapped folders are refused in one line
    assert main(["compare", str(picture_file), "--classes", "a;b", "--onnx", str(bilinear),
                 "--onnx-bilinear", str(onnx_dir), "--out", str(out)]) == 2
    assert "holds no SimFeatUp upsampler (bilinear)" in capsys.readouterr().err.strip().splitlines()[-1]
