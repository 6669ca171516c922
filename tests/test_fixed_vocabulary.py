"""Fixed-vocabulary and uint8-input model folders (docs/model-folder-fixed.md): export, checks, Python runtime."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from simfeatup import imaging, presets, scores
from simfeatup.model_folder import ModelFolderError, read_manifest
from simfeatup.runtime import OnnxSegmenter
from simfeatup.runtime_fixed import FixedOnnxSegmenter, open_model_folder
from simfeatup.scores import Scoring
from simfeatup.visualize import palette
from simfeatup.vocabulary import Vocabulary
from simfeatup.windows import crop_and_pad, padding

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))
OEM = Vocabulary.from_preset("openearthmap")


def test_folder_holds_no_text_graph_and_describes_its_vocabulary(onnx_dir, fixed_dirs):
    mode = (onnx_dir / "image.onnx.data").stat().st_mode
    for kind, folder in fixed_dirs.items():
        assert (folder / "image.onnx.data").stat().st_mode == mode  # as readable as the default folder's
        names = {p.name for p in folder.iterdir()}
        assert {"image.onnx", "scoring.onnx", "classes.json", "manifest.json"} <= names
        assert not {"text.onnx", "bpe_simple_vocab_16e6.txt.gz"} & names
        manifest = read_manifest(folder)
        assert manifest["image_input"] == kind and "tokenizer" not in manifest
        doc = json.loads((folder / "classes.json").read_text())
        lines = [",".join(c) for c in OEM.classes]
        assert doc["names"] == OEM.names and doc["classes"] == [list(c) for c in OEM.classes]
        assert doc["colours"] == palette(lines).tolist()
        preset = presets.load("openearthmap")
        assert (doc["prob_thd"], doc["bg_idx"], doc["lam"]) == (preset.prob_thd, preset.bg_idx, preset.lam)
        assert manifest["vocabulary"]["query_class"] == OEM.query_class.tolist()
        assert manifest["verification"]["fixed"]["max_abs_logit_diff"] < 1e-4


def test_image_graph_inputs_are_the_windows_alone(fixed_dirs):
    image = {k: ort.InferenceSession(str(f / "image.onnx")) for k, f in fixed_dirs.items()}
    (u8,) = image["uint8"].get_inputs()
    (f32,) = image["float32"].get_inputs()
    assert (u8.name, u8.type, u8.shape[3]) == ("windows", "tensor(uint8)", 3)
    assert (f32.name, f32.type, f32.shape[1]) == ("windows", "tensor(float)", 3)
    # uint8 in, unpadded: the graph normalises and pads with the mean colour exactly as simfeatup.windows does
    rgb = np.random.default_rng(0).integers(0, 256, (37, 90, 3), dtype=np.uint8)
    pads = padding(37, 16), padding(90, 16)
    padded = crop_and_pad(imaging.normalise(rgb), (0, 37, 0, 90), pads)[None]
    want = image["float32"].run(None, {"windows": padded})[0][:, :, pads[0][0] : pads[0][0] + 37,
                                                              pads[1][0] : pads[1][0] + 90]
    got = image["uint8"].run(None, {"windows": rgb[None]})[0]
    assert got.shape == (1, len(OEM.queries), 37, 90)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # 5-8 s on a 2-core AVX2 machine: the default run stays under 5 min
def test_labels_equal_the_default_folders_for_the_same_classes(onnx_dir, fixed_dirs):
    images = [imaging.load_image(SAMPLES[-1])]  # the 600x600 sample: a resize, 9 windows, fast
    scoring = Scoring.resolve(presets.load("openearthmap"))
    ref = OnnxSegmenter(onnx_dir, cache=False).segment(images, OEM, scoring=scoring)
    for folder in fixed_dirs.values():
        segmenter = open_model_folder(folder)
        assert isinstance(segmenter, FixedOnnxSegmenter)
        for want, got in zip(ref, segmenter.segment(images)):
            np.testing.assert_array_equal(got.labels, want.labels)


def test_scoring_graph_matches_simfeatup_scores(fixed_dirs):
    session = ort.InferenceSession(str(fixed_dirs["uint8"] / "scoring.onnx"))
    logits = np.random.default_rng(1).normal(0, 0.05, (len(OEM.queries), 40, 30)).astype(np.float32)
    probs, labels = session.run(None, {"logits": logits})
    want = scores.class_probabilities(logits, OEM.query_class, len(OEM))
    assert probs.shape == want.shape and np.abs(probs - want).max() < 1e-6
    np.testing.assert_array_equal(labels, scores.labels_from_probabilities(want, prob_thd=0.1, bg_idx=0))
    assert labels.dtype == np.uint8


@pytest.mark.slow  # 5-8 s on a 2-core AVX2 machine: the default run stays under 5 min
def test_cli_uses_the_baked_vocabulary_and_refuses_another(onnx_dir, fixed_dirs, tmp_path, capsys):
    from simfeatup.cli import main

    image = str(SAMPLES[-1])
    assert main(["segment", image, "--onnx", str(fixed_dirs["uint8"]), "--out", str(tmp_path / "fixed")]) == 0
    assert main(["segment", image, "--preset", "openearthmap", "--onnx", str(onnx_dir),
                 "--out", str(tmp_path / "default")]) == 0
    name = f"{SAMPLES[-1].stem}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "fixed" / name)),
                                  np.asarray(Image.open(tmp_path / "default" / name)))
    # restating the baked classes is fine; other classes or another lambda are one clear line
    assert main(["segment", image, "--preset", "openearthmap", "--onnx", str(fixed_dirs["float32"]),
                 "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    for flags, words in ((["--classes", "road;tree"], "fixed vocabulary"), (["--lam", "0"], "lam -0.3")):
        assert main(["segment", image, *flags, "--onnx", str(fixed_dirs["float32"]),
                     "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
    assert main(["segment", image, "--onnx", str(onnx_dir), "--out", str(tmp_path / "none")]) == 2
    assert "give --preset, --classes or --classes-file" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--uint8-input"], "--uint8-input only apply to a fixed vocabulary"),
    (["--prob-thd", "0.5"], "--prob-thd only apply to a fixed vocabulary"),
    (["--classes", "a;b", "--bg-idx", "2"], "--bg-idx 2 is not a class index"),
])
def test_export_flags_of_a_fixed_vocabulary_are_checked_first(tmp_path, capsys, flags, words):
    from conftest import load_script

    out = tmp_path / "out"
    assert load_script("export/to_onnx.py").main(["--upsampler", "bilinear", "--out", str(out), *flags]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_an_edited_vocabulary_is_refused(fixed_dirs, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(fixed_dirs["float32"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["vocabulary"]["prob_thd"] = 0.9
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="edited after export"):
        FixedOnnxSegmenter(folder)


@pytest.mark.slow
def test_export_script_writes_a_verified_fixed_uint8_folder(artefacts, tiny_weights, tmp_path, fixed_dirs):
    """The user path: export/to_onnx.py --preset --uint8-input traces, bakes and verifies (minutes on 2 cores)."""
    from conftest import load_script

    path, _ = artefacts
    name, weights = tiny_weights
    out = tmp_path / "fixed"
    assert load_script("export/to_onnx.py").main([
        "--upsampler", str(path), "--model", name, "--pretrained", str(weights), "--out", str(out),
        "--preset", "openearthmap", "--uint8-input",
    ]) == 0
    image = imaging.load_image(SAMPLES[-1])
    want = open_model_folder(fixed_dirs["uint8"]).segment([image])[0].labels
    np.testing.assert_array_equal(open_model_folder(out).segment([image])[0].labels, want)


def test_a_folder_of_either_kind_exported_from_a_random_clip_warns_when_opened(onnx_dir, fixed_dirs, monkeypatch,
                                                                             caplog):
    import logging

    from simfeatup import backbone, folder_segmenter, runtime_fixed

    manifest = read_manifest(fixed_dirs["uint8"])
    assert manifest["upsampler"]["backbone"]["pretrained"]  # the tests' CLIP has a weights file: no warning
    random = {**manifest, "upsampler": {**manifest["upsampler"],
                                        "backbone": {**manifest["upsampler"]["backbone"], "pretrained": None}}}
    with caplog.at_level(logging.WARNING):
        backbone.warn_if_folder_trained_on_random(manifest, "real")
        backbone.warn_if_folder_trained_on_random(random, "demo")  # as exported from the offline demo's artefact
    [line] = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert line.startswith("the upsampler of demo was trained on a CLIP with random weights") and "meaningless" in line
    seen = []  # (the graphs are checked against their manifest: a folder cannot be edited into a random one)
    spy = lambda manifest, model_dir: seen.append(str(model_dir))  # noqa: E731
    monkeypatch.setattr(folder_segmenter, "warn_if_folder_trained_on_random", spy)
    monkeypatch.setattr(runtime_fixed, "warn_if_folder_trained_on_random", spy)
    for folder in (onnx_dir, fixed_dirs["uint8"]):
        open_model_folder(folder)
    assert seen == [str(onnx_dir), str(fixed_dirs["uint8"])]
