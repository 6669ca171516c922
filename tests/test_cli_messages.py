"""What `simfeatup` tells a user: --version, the top-level help, the presets, the random-backbone
warning and log lines that never land on a progress bar."""
import importlib.metadata
import logging
import re

import cv2
import numpy as np
import pytest
import torch

from simfeatup import cli
from simfeatup.cli import main

SUBCOMMANDS = {"segment", "evaluate", "compare", "convert-weights", "make-shards", "presets"}


def test_version_prints_the_installed_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"simfeatup {importlib.metadata.version('simfeatup')}\n"


def test_top_level_help_lists_every_subcommand_with_its_summary(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal width
    [sub] = [a for a in cli._parser()._actions if a.dest == "command"]
    summaries = {action.dest: action.help for action in sub._choices_actions}
    assert set(summaries) == set(sub.choices) == SUBCOMMANDS  # every command has a summary, none is hidden
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, summary in summaries.items():
        assert "\n" not in summary and summary
        assert re.search(rf"^ +{re.escape(name)} +{re.escape(summary)}$", out, re.M), name


def test_presets_lists_each_preset_with_its_class_names(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 17
    [loveda] = [line for line in lines if line.startswith("loveda ")]
    assert loveda.split(None, 1)[1] == "7 classes: background, building, road, water, barren, forest, agricultural"


def test_presets_name_shows_class_lines_thresholds_and_label_notes(capsys):
    assert main(["presets", "LoveDA"]) == 0
    out = capsys.readouterr().out
    assert "   1: building,roof,house\n" in out and "   6: agricultural\n" in out
    assert "prob_thd 0.3  bg_idx 0 (background)  lam -0.3" in out
    assert "--reduce-zero-label" in out
    assert main(["presets", "inria"]) == 0
    assert "--binary-255 --foreground-iou" in capsys.readouterr().out
    assert main(["presets", "lovedaa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'lovedaa'" in err[0] and "Did you mean loveda" in err[0]


@pytest.fixture
def random_artefact(tmp_path, tiny_clip_cfg):
    """An upsampler artefact as the tiny recipe writes it: its backbone a model config without weights."""
    from simfeatup.upsampler import SimFeatUp, save_upsampler

    torch.manual_seed(1)
    path = tmp_path / "upsampler.safetensors"
    save_upsampler(SimFeatUp(32, 16), path, backbone={"config": tiny_clip_cfg, "pretrained": None})
    return path


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    cv2.imwrite(str(images / "a.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    cv2.imwrite(str(labels / "a.png"), rng.integers(0, 2, (48, 64), dtype=np.uint8))
    return images, labels


def _random_warnings(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in messages if "random weights" in m]


def test_an_artefact_trained_on_a_random_backbone_warns_once(random_artefact, labelled, tmp_path, caplog):
    images, labels = labelled
    common = ["--classes", "background;road", "--upsampler", str(random_artefact), "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert main(["segment", str(images), "--out", str(tmp_path / "out"), *common]) == 0
    [warning] = _random_warnings(caplog)
    assert str(random_artefact) in warning and "meaningless" in warning
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", str(images), "--labels", str(labels), *common]) == 0
    assert len(_random_warnings(caplog)) == 1


def test_an_artefact_with_real_weights_does_not_warn(tiny_weights, labelled, tmp_path, caplog):
    from simfeatup.upsampler import SimFeatUp, save_upsampler

    name, weights = tiny_weights
    path = tmp_path / "up.safetensors"
    save_upsampler(SimFeatUp(32, 16), path, backbone={"model": name, "pretrained": str(weights)})
    with caplog.at_level(logging.INFO):
        code = main(["segment", str(labelled[0]), "--classes", "a;b", "--upsampler", str(path), "--out",
                     str(tmp_path / "out"), "--pretrained", str(weights)])
    assert code == 0 and _random_warnings(caplog) == []


def test_log_lines_are_not_glued_onto_a_progress_bar(random_artefact, labelled, tmp_path, capsys, monkeypatch):
    images, _ = labelled
    (images / "0broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # sorted first: the bar is drawn already
    root, ours = logging.getLogger(), logging.getLogger("simfeatup")
    monkeypatch.setattr(root, "handlers", [])  # an unconfigured root, as in a fresh process: setup_logging's handler
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(ours, "level", ours.level)
    monkeypatch.setattr(logging.getLogger("lightning"), "propagate", True)
    code = main(["segment", str(images), "--classes", "background;road", "--upsampler", str(random_artefact),
                 "--out", str(tmp_path / "out"), "--batch-size", "1", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "img/s]" in err  # the bar was drawn on the same stream
    pieces = re.split(r"[\r\n]", err)  # what a terminal shows at the start of a line
    skipped = [p for p in pieces if "skipped: " in p]
    assert skipped and all(p.startswith("ERROR simfeatup: skipped: ") for p in skipped), skipped
    assert any(p.startswith("simfeatup segment: error: 1 of 2 image(s)") for p in pieces)
