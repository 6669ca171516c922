"""The `simfeatup` command as a user runs it: real model path (tiny registered config + weights file)."""
import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from simfeatup.cli import main
from simfeatup.visualize import palette


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "rgb.png"), rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "gray.jpg"), rng.integers(0, 256, (70, 50), dtype=np.uint8))
    cv2.imwrite(str(folder / "rgba.png"), rng.integers(0, 256, (40, 64, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "deep.png"), rng.integers(0, 65536, (48, 48, 3), dtype=np.uint16))
    return folder


def _args(tiny_weights, *extra):
    name, weights = tiny_weights
    return ["--model", name, "--pretrained", str(weights), *extra]


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_segment_writes_palette_label_maps_and_overlays(tiny_weights, images, tmp_path):
    out = tmp_path / "out"
    files = sorted(images.iterdir())
    assert (
        main(
            [
                "segment",
                *map(str, files),
                "--classes",
                "building,roof;road;water",
                "--out",
                str(out),
                "--overlay",
                "--save-probs",
                *_args(tiny_weights),
            ]
        )
        == 0
    )
    for f in files:
        label = Image.open(out / f"{f.stem}.png")
        assert label.mode == "P" and label.size == Image.open(f).size
        assert np.asarray(label).max() <= 2
        overlay = Image.open(out / f"{f.stem}_overlay.jpg")
        # the picture, then its legend (wider than a small picture: the longest class name fits)
        assert overlay.width >= label.width and overlay.height > label.height
        probs = np.load(out / f"{f.stem}_probs.npy")
        assert probs.shape == (3, label.size[1], label.size[0])
    legend = json.loads((out / "classes.json").read_text())
    assert [c["class"] for c in legend] == ["building,roof", "road", "water"]
    assert [c["color"] for c in legend] == palette(["building,roof", "road", "water"]).tolist()  # one palette


def test_segment_with_preset(tiny_weights, images, tmp_path):
    assert (
        main(
            ["segment", str(images / "rgb.png"), "--preset", "udd5", "--out", str(tmp_path / "o"), *_args(tiny_weights)]
        )
        == 0
    )
    assert np.asarray(Image.open(tmp_path / "o" / "rgb.png")).max() <= 4


def test_missing_image_is_one_line_and_nonzero(tiny_weights, tmp_path, capsys):
    assert (
        main(
            [
                "segment",
                str(tmp_path / "nope.png"),
                "--classes",
                "road",
                "--out",
                str(tmp_path / "o"),
                *_args(tiny_weights),
            ]
        )
        == 2
    )
    assert "image not found" in _one_line_error(capsys)


def test_empty_class_list(tiny_weights, images, tmp_path, capsys):
    assert (
        main(
            ["segment", str(images / "rgb.png"), "--classes", " ; ", "--out", str(tmp_path / "o"), *_args(tiny_weights)]
        )
        == 2
    )
    assert "empty class list" in _one_line_error(capsys)


def test_bad_images_are_reported_and_the_rest_is_written(tiny_weights, images, tmp_path, capsys, caplog):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cv2.imwrite(str(images / "tiny.png"), np.zeros((8, 40, 3), np.uint8))
    out = tmp_path / "o"
    code = main(
        [
            "segment",
            str(images / "broken.png"),
            str(images / "tiny.png"),
            str(images / "rgb.png"),
            "--classes",
            "road;tree",
            "--out",
            str(out),
            *_args(tiny_weights),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err + caplog.text  # per-image messages go through logging
    assert "2 of 3 image(s) could not be segmented" in err
    assert "broken.png" in err and "smaller than one 16-pixel patch" in err and "Traceback" not in err
    assert (out / "rgb.png").is_file() and not (out / "broken.png").exists()


def test_bg_idx_out_of_range(tiny_weights, images, tmp_path, capsys):
    assert (
        main(
            [
                "segment",
                str(images / "rgb.png"),
                "--classes",
                "road;tree",
                "--bg-idx",
                "5",
                "--out",
                str(tmp_path / "o"),
                *_args(tiny_weights),
            ]
        )
        == 2
    )
    assert "--bg-idx 5" in _one_line_error(capsys)


def test_upsampler_of_wrong_feature_size_names_both_sizes(tiny_weights, images, tmp_path, capsys):
    from simfeatup.upsampler import SimFeatUp, save_upsampler

    path = tmp_path / "up.safetensors"
    save_upsampler(SimFeatUp(dim=48, patch_size=16), path)
    code = main(
        [
            "segment",
            str(images / "rgb.png"),
            "--classes",
            "road",
            "--upsampler",
            str(path),
            "--out",
            str(tmp_path / "o"),
            *_args(tiny_weights),
        ]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert "48" in line and "32" in line


def test_presets_lists_all(capsys):
    assert main(["presets"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 17


def test_convert_weights_then_segment_with_them(tiny_weights, images, tmp_path, capsys):
    """A user's path: convert the authors' checkpoint, then segment with it (tiny dims here)."""
    from simfeatup.upsampler import SimFeatUp
    from test_convert import lightning_ckpt

    state = SimFeatUp(dim=32, patch_size=16).state_dict()
    src = lightning_ckpt(tmp_path / "authors.ckpt", state)
    dst = tmp_path / "up.safetensors"
    assert (
        main(["convert-weights", str(src), str(dst), "--model", tiny_weights[0], "--pretrained", str(tiny_weights[1])])
        == 0
    )
    info = json.loads(dst.with_suffix(".json").read_text())
    assert info["backbone"]["feature_source"] == "penultimate"
    assert info["backbone"]["pretrained"] == tiny_weights[1].name  # a name, never this machine's path
    out = tmp_path / "o"
    # the backbone comes from the artefact's .json, its weights file from beside it: no --model/--pretrained needed
    shutil.copy(tiny_weights[1], tmp_path)
    assert (
        main(
            [
                "segment",
                str(images / "rgb.png"),
                "--classes",
                "road;tree",
                "--upsampler",
                str(dst.with_suffix(".json")),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "rgb.png").is_file()
    assert main(["convert-weights", str(tmp_path / "missing.ckpt"), str(tmp_path / "x.safetensors")]) == 2
    assert "missing.ckpt" in _one_line_error(capsys)


def test_outputs_are_written_whole_with_normal_permissions(tiny_weights, images, tmp_path):
    import os
    import stat

    out = tmp_path / "o"
    assert (
        main(
            [
                "segment",
                str(images / "rgb.png"),
                "--classes",
                "road",
                "--out",
                str(out),
                "--overlay",
                *_args(tiny_weights),
            ]
        )
        == 0
    )
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert not list(out.glob(".*partial"))


def test_verbose_flag_works_before_and_after_the_subcommand(capsys, monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # an unconfigured root, as in a fresh process; restored after
    monkeypatch.setattr(root, "level", root.level)
    ours, lightning = logging.getLogger("simfeatup"), logging.getLogger("lightning")
    monkeypatch.setattr(ours, "level", ours.level)
    monkeypatch.setattr(lightning, "propagate", lightning.propagate)
    for argv, level, own in (
        (["-v", "presets"], logging.DEBUG, logging.DEBUG),
        (["presets", "-v"], logging.DEBUG, logging.DEBUG),
        (["presets"], logging.WARNING, logging.INFO),
    ):  # INFO from simfeatup, not from the libraries
        root.handlers = []  # basicConfig only configures a root logger without handlers
        assert main(argv) == 0
        assert (root.level, ours.level) == (level, own), argv
    assert "loveda" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--prob-thd", "2", "not a probability"),
        ("--prob-thd", "-0.5", "not a probability"),
        ("--prob-thd", "nan", "not a finite number"),
        ("--lam", "inf", "not a finite number"),
        ("--bg-idx", "-1", "negative"),
    ],
)
def test_numeric_flags_are_checked_when_parsed(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "segment",
                str(tmp_path / "x.png"),
                "--classes",
                "road;tree",
                f"{flag}={value}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exit_.value.code == 2
    last = _one_line_error(capsys)
    assert flag in last and message in last
    assert not (tmp_path / "o").exists()


def test_segment_with_a_model_config_file_and_its_weights(images, tmp_path, tiny_clip_cfg, monkeypatch, capsys):
    """--model cfg.json --pretrained w.safetensors: a CLIP open_clip has no name for, with those weights."""
    from safetensors.torch import save_file

    from simfeatup.encoder import DenseCLIP
    from simfeatup.imaging import load_image
    from simfeatup.segmenter import Segmenter
    from simfeatup.vocabulary import Vocabulary

    monkeypatch.setenv("SIMFEATUP_CACHE", str(tmp_path / "cache"))
    clip = DenseCLIP.from_config(tiny_clip_cfg, seed=3).clip  # not the seed-0 weights of a random build
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_clip_cfg))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "o"
    argv = [
        "segment",
        str(images / "rgb.png"),
        "--classes",
        "road;tree;roof",
        "--out",
        str(out),
        "--save-probs",
        "--model",
        str(tmp_path / "cfg.json"),
        "--pretrained",
        str(tmp_path / "w.safetensors"),
    ]
    assert main(argv) == 0
    # the same model built here from the same tensors gives the same probabilities
    vocabulary, image = Vocabulary.from_spec("road;tree;roof"), load_image(images / "rgb.png")
    [expected] = Segmenter(DenseCLIP(clip), cache=False).eval().segment([image], vocabulary, return_probs=True)
    np.testing.assert_allclose(np.load(out / "rgb_probs.npy").astype(np.float32), expected.probs, atol=2e-3)
    random = Segmenter(DenseCLIP.from_config(tiny_clip_cfg), cache=False).eval()
    [other] = random.segment([image], vocabulary, return_probs=True)
    assert np.abs(other.probs - expected.probs).max() > 0.01  # the check above can tell the weights apart
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "absent.safetensors")]) == 2
    line = _one_line_error(capsys)
    assert "absent.safetensors" in line and "--pretrained" in line


def test_convert_weights_records_the_models_patch_size(tmp_path, capsys):
    from simfeatup.upsampler import SimFeatUp
    from test_convert import lightning_ckpt

    src = lightning_ckpt(tmp_path / "authors.ckpt", SimFeatUp(dim=32, patch_size=14).state_dict())
    dst = tmp_path / "up.safetensors"
    assert main(["convert-weights", str(src), str(dst), "--model", "ViT-L-14"]) == 0  # was recorded as patch 16
    info = json.loads(dst.with_suffix(".json").read_text())
    assert info["backbone"]["patch_size"] == 14 and info["upsampler"]["patch_size"] == 14
    assert (info["backbone"]["model"], info["backbone"]["pretrained"]) == ("ViT-L-14", "openai")


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(images, tmp_path, capsys, monkeypatch):
    import simfeatup.cli_segment

    monkeypatch.setattr(simfeatup.cli_segment, "_segmenter", lambda *a: pytest.fail("the model must not be loaded"))
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"keep me")
    assert main(["segment", str(images / "rgb.png"), "--classes", "road;tree", "--out", str(taken)]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert main(["segment", str(images / "rgb.png"), "--classes", "road;tree", "--out", str(taken / "sub")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert taken.read_bytes() == b"keep me"
