"""SPEC 6 scoring: label notes, dataset-level IoU, and `simfeatup evaluate` on a real labelled tile."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simfeatup.cli import main
from simfeatup.constants import IGNORE_INDEX
from simfeatup.evaluation import IoU, LabelError, LabelNotes, pair_labels, prepare_labels, read_label

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "samples" / "eval"


# ------------------------------------------------------------------ label notes (SPEC 5)
def test_reduce_zero_label_ignores_no_data_and_shifts_the_rest():
    raw = np.array([[0, 1, 2], [7, 255, 3]], np.uint8)
    np.testing.assert_array_equal(prepare_labels(raw, 7, reduce_zero_label=True), [[255, 0, 1], [6, 255, 2]])


def test_binary_255_maps_masks_to_0_1_and_leaves_0_1_masks_alone():
    np.testing.assert_array_equal(prepare_labels(np.array([[0, 255]], np.uint8), 2, binary_255=True), [[0, 1]])
    np.testing.assert_array_equal(prepare_labels(np.array([[1, 0]], np.uint8), 2, binary_255=True), [[1, 0]])


def test_values_that_are_no_class_are_refused_in_one_line():
    with pytest.raises(LabelError, match=r"label values \[7, 9\] are not class indices 0..6") as err:
        prepare_labels(np.array([[7, 9, 255, 0]], np.uint8), 7)
    assert "\n" not in str(err.value)
    with pytest.raises(LabelError, match="binary_255"):
        prepare_labels(np.array([[0, 128]], np.uint8), 2, binary_255=True)  # a JPEG-ish mask


def test_flags_override_the_presets_notes_one_by_one():
    from simfeatup import presets

    spacenet = presets.load("spacenet").labels
    assert LabelNotes.resolve(spacenet) == LabelNotes(binary_255=True, foreground_iou=True)
    assert LabelNotes.resolve(spacenet, binary_255=False) == LabelNotes(foreground_iou=True)
    assert LabelNotes.resolve(presets.load("loveda").labels) == LabelNotes(reduce_zero_label=True)
    assert LabelNotes.resolve(None, foreground_iou=True) == LabelNotes(foreground_iou=True)
    with pytest.raises(TypeError, match="unknown label notes"):
        LabelNotes.resolve(spacenet, binary255=True)
    single = [k for k in presets.available() if presets.load(k).labels.get("foreground_iou")]
    assert len(single) == 9  # SPEC 6: the 9 single-class datasets


# ------------------------------------------------------------------ IoU over a dataset (SPEC 6)
def _naive_iou(preds, labels, k):
    pred = np.concatenate([p.ravel() for p in preds])
    label = np.concatenate([g.ravel() for g in labels])
    keep = label != IGNORE_INDEX
    pred, label = pred[keep], label[keep]
    out = []
    for c in range(k):
        inter = np.sum((pred == c) & (label == c))
        union = np.sum((pred == c) | (label == c))
        out.append(inter / union if union else np.nan)
    return np.array(out)


def test_intersection_and_union_accumulate_over_the_dataset_not_per_image():
    rng = np.random.default_rng(0)
    k = 4
    labels = [rng.integers(0, k, (30, 40)), rng.integers(0, k - 1, (17, 9))]
    labels[0][:5] = IGNORE_INDEX
    preds = [np.where(rng.random(g.shape) < 0.6, g, rng.integers(0, k, g.shape)) % 255 for g in labels]
    iou = IoU(k)
    for p, g in zip(preds, labels):
        iou.update(p, g)
    np.testing.assert_allclose(iou.per_class, _naive_iou(preds, labels, k))
    per_image = []
    for p, g in zip(preds, labels):
        one = IoU(k)
        one.update(p, g)
        per_image.append(one.per_class)
    assert not np.allclose(np.nanmean(per_image, axis=0), iou.per_class)  # averaging images would differ
    report = iou.summary(["a", "b", "c", "d"])
    assert report.metric == "mIoU" and report.score == pytest.approx(np.nanmean(iou.per_class))
    assert report.pixels == sum(g.size for g in labels) - 5 * 40


def test_a_class_never_labelled_nor_predicted_has_no_iou_and_no_vote():
    iou = IoU(3)
    iou.update(np.array([[0, 1, 1]]), np.array([[0, 1, 0]]))
    assert np.isnan(iou.per_class[2])
    report = iou.summary(["x", "y", "z"])
    assert report.score == pytest.approx((0.5 + 0.5) / 2)
    assert report.as_dict()["per_class_iou"] == {"x": 50.0, "y": 50.0, "z": None}
    assert "z" in report.table() and "mIoU 50.00 %" in report.table()


def test_single_class_datasets_report_the_foreground_iou():
    iou = IoU(2)
    iou.update(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]]))
    report = iou.summary(["background", "building"], foreground_only=True)
    assert report.metric == "IoU(building)" and report.score == pytest.approx(0.5)


# ------------------------------------------------------------------ files
def test_read_label_gives_indices_of_palette_pngs_and_refuses_colour_coded_ones(tmp_path):
    index = np.array([[0, 3], [5, 1]], np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] * 2)
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), index)
    Image.fromarray(np.stack([index] * 3, -1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_label(tmp_path / "grey_rgb.png"), index)
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(LabelError, match="colour-coded RGB labels need converting"):
        read_label(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LabelError, match="cannot read label"):
        read_label(tmp_path / "broken.png")


def test_read_label_accepts_16_bit_1_bit_and_whole_number_float_rasters(tmp_path):
    import tifffile

    index = np.array([[0, 3], [300, 1]], np.uint16)
    Image.fromarray(index).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(read_label(tmp_path / "i16.png"), index)
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_label(tmp_path / "bits.png"), [[1, 0]])
    tifffile.imwrite(tmp_path / "f.tif", index.astype(np.float32))
    np.testing.assert_array_equal(read_label(tmp_path / "f.tif"), index)
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0.5, 1.0], [2.0, 0.0]], np.float32))
    tifffile.imwrite(tmp_path / "planar.tif", index[None])  # (1, H, W)
    np.testing.assert_array_equal(read_label(tmp_path / "planar.tif"), index)
    with pytest.raises(LabelError, match="not whole numbers"):
        read_label(tmp_path / "frac.tif")


def test_negative_values_and_contradicting_notes_are_refused():
    with pytest.raises(LabelError, match=r"label values \[-1\]"):
        prepare_labels(np.array([[-1, 0]], np.int16), 2)
    with pytest.raises(LabelError, match="exclude each other"):
        prepare_labels(np.array([[0]], np.uint8), 2, reduce_zero_label=True, binary_255=True)
    with pytest.raises(LabelError, match="try --reduce-zero-label"):
        prepare_labels(np.array([[0, 6, 1]], np.uint8), 6)  # mmsegmentation's Potsdam: 1..6, 0 no-data


def test_labels_are_paired_by_stem_suffixes_and_any_letter_case(tmp_path):
    (tmp_path / "a_label.TIF").touch()
    (tmp_path / "b_label.png").touch()
    other = tmp_path / "other"
    other.mkdir()
    (other / "c_label.png").touch()
    got = pair_labels([Path("x/a.jpg"), Path("y/b.png"), Path("z/c.jpg")], [tmp_path, other], suffix="_label")
    assert got == [tmp_path / "a_label.TIF", tmp_path / "b_label.png", other / "c_label.png"]
    (other / "x_mask.png").touch()
    assert pair_labels([Path("d/x_sat.jpg")], [other], suffix="_mask", image_suffix="_sat") == [other / "x_mask.png"]
    with pytest.raises(LabelError, match=r"no label for d.jpg \(looked for d_label.png .* and 1 more image\(s\)"):
        pair_labels([Path("a.jpg"), Path("d.jpg"), Path("e.jpg")], [tmp_path], suffix="_label")
    assert pair_labels([Path("d.jpg")], [tmp_path], strict=False) == [None]


# ------------------------------------------------------------------ the command, on a real labelled tile
@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_evaluate_scores_what_segment_writes(onnx_dir, tmp_path, capsys):
    """SpaceNet 3 Las Vegas roads: the report's IoU is the IoU of `segment`'s label map."""
    common = ["--preset", "spacenet", "--onnx", str(onnx_dir)]
    report = ["--report", str(tmp_path / "r.json")]
    assert main(["evaluate", str(EVAL / "images"), "--labels", str(EVAL / "labels"), *common, *report]) == 0
    table = capsys.readouterr().out
    assert main(["segment", str(EVAL / "images"), *common, "--out", str(tmp_path / "seg")]) == 0
    pred = np.asarray(Image.open(tmp_path / "seg" / "spacenet3_vegas.png"))
    mask = np.asarray(Image.open(EVAL / "labels" / "spacenet3_vegas.png")) == 255
    road = pred == 1
    expected = (road & mask).sum() / (road | mask).sum()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"] == "IoU(road)" and report["score"] == pytest.approx(100 * expected)
    assert report["label_notes"] == {"reduce_zero_label": False, "binary_255": True, "foreground_iou": True}
    assert report["pixels"] == mask.size and np.sum(report["confusion"]) == mask.size and report["preset"] == "spacenet"
    assert report["settings"] == {"prob_thd": 0.7, "bg_idx": 0, "lam": -0.3}  # the SpaceNet preset's
    assert f"IoU(road) {100 * expected:.2f} %" in table


def _tile(folder: Path, name: str = "tile", label=None, size=(96, 128)) -> Path:
    """A small crop of the real sample image (and a label for it) for fast command runs."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.open(EVAL / "images" / "spacenet3_vegas.jpg").crop((0, 0, w, h)).save(folder / f"{name}.jpg")
    if label is not None:
        Image.fromarray(label).save(folder / f"{name}_gt.png")
    return folder / f"{name}.jpg"


def _evaluate(onnx_dir, tmp_path, *argv):
    report = tmp_path / "report.json"
    code = main(["evaluate", *map(str, argv), "--onnx", str(onnx_dir), "--report", str(report)])
    return code, (json.loads(report.read_text()) if code == 0 else None)


def test_evaluate_problems_end_in_one_line_before_the_model_runs(onnx_dir, tmp_path, capsys, monkeypatch):
    import simfeatup.cli_segment

    data = tmp_path / "data"
    _tile(data, "a", np.zeros((96, 128), np.uint8))
    _tile(data, "b", np.zeros((50, 60), np.uint8))  # the wrong size
    _tile(tmp_path / "bad", "b", np.full((96, 128), 7, np.uint8))  # another dataset's labels
    monkeypatch.setattr(simfeatup.cli_segment, "_segmenter", lambda *a: pytest.fail("the model must not be loaded"))
    base = ["--preset", "deepglobe", "--label-suffix", "_gt", "--onnx", str(onnx_dir)]
    a, b = str(data / "a.jpg"), str(data / "b.jpg")
    cases = [
        ([a, "--labels", str(tmp_path / "nowhere")], "label folder not found"),
        ([a, "--labels", str(data), "--label-suffix=-x"], "no label for"),
        ([b, "--labels", str(data)], "b_gt.png is 60x50 but"),
        ([b, "--labels", str(tmp_path / "bad")], "label values [7] are not class indices 0..1"),
        ([a, "--labels", str(data), "--report", str(tmp_path)], "is a folder: give a file name"),
        ([a, "--labels", str(data), "--reduce-zero-label"], "exclude each other"),
        (
            [a, "--labels", str(data), "--classes", "a;b;c"],
            "not allowed with argument",
        ),  # argparse: --preset and --classes
    ]
    for flags, message in cases:
        try:
            code = main(["evaluate", flags[0], *base, *flags[1:]])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and message in line, line
    code = main(
        [
            "evaluate",
            str(data / "a.jpg"),
            "--classes",
            "a;b;c",
            "--binary-255",
            "--labels",
            str(data),
            "--label-suffix",
            "_gt",
            "--onnx",
            str(onnx_dir),
        ]
    )
    assert code == 2 and "need exactly 2 classes" in capsys.readouterr().err


@pytest.mark.slow  # 5-8 s on a 2-core AVX2 machine: the default run stays under 5 min
def test_preset_label_notes_reach_the_command(onnx_dir, tmp_path, caplog):
    # LoveDA: raw 0 is no-data, 1..7 are the classes; without the note, 7 is no class index.
    raw = np.zeros((96, 128), np.uint8)
    raw[:, 32:] = np.resize(np.arange(1, 8).repeat(14), 96)  # columns of classes 1..7, every row alike
    image = _tile(tmp_path / "loveda", label=raw)
    code, report = _evaluate(
        onnx_dir, tmp_path, image, "--labels", image.parent, "--label-suffix", "_gt", "--preset", "loveda"
    )
    assert code == 0 and report["pixels"] == 96 * 96 and report["metric"] == "mIoU"
    assert report["label_notes"]["reduce_zero_label"] is True
    assert (
        _evaluate(
            onnx_dir,
            tmp_path,
            image,
            "--labels",
            image.parent,
            "--label-suffix",
            "_gt",
            "--preset",
            "loveda",
            "--no-reduce-zero-label",
        )[0]
        == 2
    )
    # SpaceNet roads stored as 0/1: --no-binary-255 changes nothing, and the score stays the road IoU.
    mask = (np.arange(128)[None, :].repeat(96, 0) % 20 < 4).astype(np.uint8)
    road = _tile(tmp_path / "road", label=mask)
    _, as_01 = _evaluate(
        onnx_dir,
        tmp_path,
        road,
        "--labels",
        road.parent,
        "--label-suffix",
        "_gt",
        "--preset",
        "spacenet",
        "--no-binary-255",
    )
    Image.fromarray(mask * 255).save(road.parent / "tile_gt.png")
    _, as_255 = _evaluate(
        onnx_dir, tmp_path, road, "--labels", road.parent, "--label-suffix", "_gt", "--preset", "spacenet"
    )
    assert as_01["metric"] == as_255["metric"] == "IoU(road)" and as_01["score"] == as_255["score"]
    # ... and 0/255 masks without the note lose every road pixel: said, not silently scored.
    with caplog.at_level("WARNING"):
        _, lost = _evaluate(
            onnx_dir, tmp_path, road, "--labels", road.parent, "--label-suffix", "_gt", "--classes", "background;road"
        )
    assert lost["pixels"] == int((mask == 0).sum()) and "need --binary-255" in caplog.text


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_each_image_is_scored_once_and_labels_beside_images_are_not_images(onnx_dir, tmp_path, capsys):
    mask = np.zeros((96, 128), np.uint8)
    image = _tile(tmp_path / "d", label=mask)
    code, report = _evaluate(
        onnx_dir,
        tmp_path,
        image.parent,
        image,
        "--labels",
        image.parent,
        "--label-suffix",
        "_gt",
        "--preset",
        "spacenet",
    )
    assert (
        code == 0 and report["images"] == 1 and report["pixels"] == mask.size
    )  # folder + file: one image, no tile_gt.png image
    twin = _tile(tmp_path / "twin", label=None)
    code, _ = _evaluate(
        onnx_dir, tmp_path, image, twin, "--labels", image.parent, "--label-suffix", "_gt", "--preset", "spacenet"
    )
    assert code == 2 and "is the label of several images" in capsys.readouterr().err
    Image.fromarray(np.full((96, 128), 255, np.uint8)).save(image.parent / "tile_gt.png")
    assert (
        _evaluate(onnx_dir, tmp_path, image, "--labels", image.parent, "--label-suffix", "_gt", "--classes", "a;b")[0]
        == 2
    )
    assert "every label pixel is ignored" in capsys.readouterr().err


def test_torch_and_onnx_paths_score_the_same(artefacts, tiny_weights, tmp_path):
    path, onnx_dir = artefacts
    name, weights = tiny_weights
    common = ["evaluate", str(EVAL / "images"), "--labels", str(EVAL / "labels"), "--preset", "spacenet"]
    assert main([*common, "--onnx", str(onnx_dir), "--report", str(tmp_path / "onnx.json")]) == 0
    assert (
        main(
            [
                *common,
                "--upsampler",
                str(path),
                "--model",
                name,
                "--pretrained",
                str(weights),
                "--report",
                str(tmp_path / "torch.json"),
            ]
        )
        == 0
    )
    onnx, torch_ = (json.loads((tmp_path / f).read_text()) for f in ("onnx.json", "torch.json"))
    assert onnx["pixels"] == torch_["pixels"] == 560 * 700
    assert abs(onnx["score"] - torch_["score"]) <= 0.05  # percentage points: only float-level ties may differ
