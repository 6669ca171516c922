"""SPEC 6 scoring: label notes, dataset-level IoU, and `simfeatup evaluate` on a real labelled tile."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simfeatup.cli import main
from simfeatup.constants import IGNORE_INDEX
from simfeatup.evaluation import IoU, LabelError, pair_labels, prepare_labels, read_label

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
    with pytest.raises(LabelError, match="colour-coded labels need converting"):
        read_label(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LabelError, match="cannot read label"):
        read_label(tmp_path / "broken.png")


def test_labels_are_paired_by_stem_and_suffix(tmp_path):
    (tmp_path / "a_label.tif").touch()
    (tmp_path / "b_label.png").touch()
    assert pair_labels([Path("x/a.jpg"), Path("y/b.png")], tmp_path, "_label") == [tmp_path / "a_label.tif", tmp_path / "b_label.png"]
    with pytest.raises(LabelError, match=r"1 image\(s\) have no label .*c_label.png"):
        pair_labels([Path("a.jpg"), Path("c.jpg")], tmp_path, "_label")


# ------------------------------------------------------------------ the command, on a real labelled tile
def test_evaluate_scores_what_segment_writes(onnx_dir, tmp_path, capsys):
    """SpaceNet 3 Las Vegas roads: the report's IoU is the IoU of `segment`'s label map."""
    common = ["--preset", "spacenet", "--onnx", str(onnx_dir)]
    assert main(["evaluate", str(EVAL / "images"), "--labels", str(EVAL / "labels"), *common, "--report", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert main(["segment", str(EVAL / "images"), *common, "--out", str(tmp_path / "seg")]) == 0
    pred = np.asarray(Image.open(tmp_path / "seg" / "spacenet3_vegas.png"))
    mask = np.asarray(Image.open(EVAL / "labels" / "spacenet3_vegas.png")) == 255
    road = pred == 1
    expected = (road & mask).sum() / (road | mask).sum()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"] == "IoU(road)" and report["score"] == round(100 * expected, 2)
    assert report["label_notes"] == {"reduce_zero_label": False, "binary_255": True} and report["pixels"] == mask.size
    assert report["settings"] == {"prob_thd": 0.7, "bg_idx": 0, "lam": -0.3}  # the SpaceNet preset's
    assert f"IoU(road) {100 * expected:.2f} %" in table


def test_evaluate_problems_end_in_one_line(onnx_dir, tmp_path, capsys):
    image = EVAL / "images" / "spacenet3_vegas.jpg"
    small = tmp_path / "labels" / "spacenet3_vegas.png"
    small.parent.mkdir()
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(small)
    wrong = tmp_path / "wrong" / "spacenet3_vegas.png"
    wrong.parent.mkdir()
    Image.fromarray(np.full((560, 700), 7, np.uint8)).save(wrong)  # e.g. another dataset's labels
    cases = [
        (["--labels", str(tmp_path / "nowhere")], "label folder not found"),
        (["--labels", str(tmp_path / "labels"), "--label-suffix", "_gt"], "have no label"),
        (["--labels", str(tmp_path / "labels")], "label is 120x100 but the image 700x560"),
        (["--labels", str(tmp_path / "wrong")], "label values [7] are not class indices 0..1"),
    ]
    for flags, message in cases:
        code = main(["evaluate", str(image), "--preset", "deepglobe", "--onnx", str(onnx_dir), *flags])
        [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and message in line, line
    assert main(["evaluate", str(image), "--classes", "a;b;c", "--binary-255", "--labels", str(EVAL / "labels"), "--onnx", str(onnx_dir)]) == 2
    assert "--binary-255 needs exactly 2 classes" in capsys.readouterr().err


def test_torch_and_onnx_paths_score_the_same(artefacts, tiny_weights, tmp_path):
    path, onnx_dir = artefacts
    name, weights = tiny_weights
    common = ["evaluate", str(EVAL / "images"), "--labels", str(EVAL / "labels"), "--preset", "spacenet"]
    assert main([*common, "--onnx", str(onnx_dir), "--report", str(tmp_path / "onnx.json")]) == 0
    assert main([*common, "--upsampler", str(path), "--model", name, "--pretrained", str(weights), "--report", str(tmp_path / "torch.json")]) == 0
    onnx, torch_ = (json.loads((tmp_path / f).read_text()) for f in ("onnx.json", "torch.json"))
    assert onnx["pixels"] == torch_["pixels"] == 560 * 700
    assert abs(onnx["score"] - torch_["score"]) <= 0.05  # percentage points: only float-level ties may differ
