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


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
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
    png = cv2.imencode(".png", np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))[1].tobytes()
    # sorted first; its header reads (so it passes the checks before the model loads), its pixels do not:
    # the error comes while the bar is drawn
    (images / "0broken.png").write_bytes(png[: len(png) // 2])
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


# ---------------------------------------------------------------------- fit --help, -v, errors before the model


def test_fit_help_is_one_screen_printed_before_any_heavy_import():
    import subprocess
    import sys

    from conftest import REPO

    probe = (
        "import runpy, sys\n"
        "sys.argv = ['train/fit.py', '--help']\n"
        "try:\n    runpy.run_path('train/fit.py', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('EXIT', code, 'HEAVY', sorted(m for m in ('torch', 'lightning', 'open_clip') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    assert out.rstrip().endswith("EXIT 0 HEAVY []"), out[-300:]
    summary = out.rsplit("EXIT", 1)[0]
    assert len(summary.splitlines()) <= 50 and "Traceback" not in summary
    for flag in ("--config", "--data.train_shards", "--model.model", "--model.pretrained", "--trainer.devices",
                 "--trainer.precision", "--trainer.max_steps", "--trainer.default_root_dir", "--help-all"):
        assert f"  {flag} " in summary, flag


def test_every_option_the_fit_summary_names_exists(capsys):
    from conftest import load_fit
    from simfeatup.training.main import SUMMARY

    fit = load_fit()
    named = set(re.findall(r"^  (--[a-z_]+\.[a-z_]+|--ckpt_path|--print_config)\b", SUMMARY, re.M))
    with pytest.raises(SystemExit) as exit_:
        fit.main(["--help-all"])
    assert exit_.value.code == 0
    full = capsys.readouterr().out
    assert len(full.splitlines()) > 300  # LightningCLI's own list
    assert named and not [flag for flag in named if flag not in full]


def test_lightning_adverts_and_warnings_are_silenced_only_while_a_run_lasts():
    import warnings

    from simfeatup.training.cli import expected_warnings

    message = "Tip: ... try installing [litlogger](https://pypi.org/project/litlogger/) ..."
    tip = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1, message, None, None)
    log = logging.getLogger(tip.name)
    with expected_warnings():
        assert not log.filter(tip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with expected_warnings():
            warnings.warn("Your `IterableDataset` has `__len__` defined. In combination ...", UserWarning)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    assert log.filter(tip)  # outside a run the logger is as it was


def test_verbose_logs_backbone_windows_text_cache_and_timings(random_artefact, labelled, tmp_path, caplog):
    images, _ = labelled
    with caplog.at_level(logging.DEBUG, logger="simfeatup"):
        assert main(["segment", "-v", str(images), "--classes", "background;road", "--upsampler",
                     str(random_artefact), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    text = caplog.text
    for expected in (
        "backbone config(embed_dim=32)/random weights (architecture from the upsampler's record",
        "CLIP (the model config): random weights",
        "text-embedding cache: memory only",
        "text queries: 2 word(s), 0 from the cache, 2 encoded (background, road)",
        "model loaded in ",
        "image 64x48 -> working size 448x336: 6 window(s) of 224 px, stride 112",
        "windows through the model ",
        "wrote a.png in ",
    ):
        assert expected in text, expected


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a segmenter is built: the errors under test must come before the model loads."""
    from simfeatup import cli_segment, segmenter

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(cli_segment, "_build_segmenter", refuse)
    monkeypatch.setattr(segmenter, "build_segmenter", refuse)


def _one_error_line(capsys, prog="simfeatup segment") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_images_and_outputs_are_refused_before_the_model_loads(random_artefact, labelled, tmp_path, capsys,
                                                                   no_model):
    images, labels = labelled
    corrupt, small, a_file = tmp_path / "corrupt.jpg", tmp_path / "small.png", tmp_path / "a_file"
    corrupt.write_bytes(b"these are not pixels" * 10)
    cv2.imwrite(str(small), np.zeros((8, 40, 3), np.uint8))
    a_file.write_text("x")
    common = ["--classes", "background;road", "--upsampler", str(random_artefact)]
    out = tmp_path / "out"

    assert main(["segment", str(corrupt), "--out", str(out), *common]) == 2
    assert f"cannot read image {corrupt}: not a jpg, png or tif file" in _one_error_line(capsys)
    assert main(["segment", str(small), "--out", str(out), *common]) == 2
    assert "small.png is 40x8 pixels, smaller than one 16-pixel patch" in _one_error_line(capsys)
    assert main(["segment", str(corrupt), str(small), "--out", str(out), *common]) == 2
    assert "2 of 2 image(s) could not be segmented" in _one_error_line(capsys)
    assert not out.exists()  # nothing created for a run that could not start
    for target, why in ((a_file, "is a file, not a folder"), (a_file / "sub", f"{a_file} is a file, not a folder")):
        assert main(["segment", str(images / "a.png"), "--out", str(target), *common]) == 2
        assert why in _one_error_line(capsys)

    cv2.imwrite(str(labels / "small.png"), np.zeros((8, 40), np.uint8))
    assert main(["evaluate", str(small), "--labels", str(labels), *common]) == 2
    assert "smaller than one 16-pixel patch" in _one_error_line(capsys, "simfeatup evaluate")


def test_export_refuses_an_out_it_cannot_create_before_the_model_loads(random_artefact, tmp_path, capsys, no_model):
    from conftest import load_script

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code = load_script("export/to_onnx.py").main(["--upsampler", str(random_artefact), "--out", str(a_file / "m")])
    assert code == 2
    assert f"--out {a_file / 'm'} cannot be created: {a_file} is a file, not a folder" in _one_error_line(
        capsys, "to_onnx"
    )
    # a pseudo file system whose permission bits say writable (to root): refused by trying, not after the model
    code = load_script("export/to_onnx.py").main(["--upsampler", str(random_artefact), "--out", "/proc/simfeatup-m"])
    assert code == 2
    assert "--out /proc/simfeatup-m cannot be created in /proc: the file system refuses (" in _one_error_line(
        capsys, "to_onnx"
    )


def test_bfloat16_on_a_cpu_without_bf16_units_is_refused_before_any_input_is_read(random_artefact, labelled,
                                                                                    tmp_path, capsys, monkeypatch):
    from simfeatup import hardware, imaging, segmenter

    def refuse(*args, **kwargs):  # the flag checks run, no image is opened, the model is never built
        raise AssertionError("an image or the model was loaded before the error")

    monkeypatch.setattr(segmenter, "build_segmenter", refuse)
    monkeypatch.setattr(imaging, "check_file", refuse)
    images, _ = labelled
    avx2_only = {"avx512": False, "avx512_bf16": False, "amx": False, "vnni": False, "amx_fp16": False}
    for device in ("cpu", "auto"):  # auto is the CPU here: no CUDA in the test machine's torch
        args = ["segment", str(images / "a.png"), "--classes", "background;road", "--upsampler",
                str(random_artefact), "--out", str(tmp_path / "out"), "--device", device, "--dtype", "bfloat16"]
        monkeypatch.setattr(hardware, "cpu_features", lambda: avx2_only)
        assert main(args) == 2
        line = _one_error_line(capsys)
        assert "--dtype bfloat16: this CPU has no bf16 units (AVX512-BF16 or AMX)" in line
        assert "leave --dtype at auto" in line
        assert not (tmp_path / "out").exists()
        monkeypatch.setattr(hardware, "cpu_features", lambda: {**avx2_only, "amx": True})  # gets further
        with pytest.raises(AssertionError, match="was loaded before"):
            main(args)


def test_a_torch_device_that_cannot_be_used_is_refused_before_any_input_is_read(random_artefact, labelled,
                                                                              tmp_path, capsys, monkeypatch):
    import torch

    from simfeatup import imaging, segmenter

    def refuse(*args, **kwargs):
        raise AssertionError("an image or the model was loaded before the error")

    monkeypatch.setattr(segmenter, "build_segmenter", refuse)
    monkeypatch.setattr(imaging, "check_file", refuse)
    images, _ = labelled
    common = ["segment", str(images / "a.png"), "--classes", "background;road", "--upsampler",
              str(random_artefact), "--out", str(tmp_path / "out"), "--device"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU (or its driver)
    for device, message in [("cuda", "sees no CUDA GPU here"), ("cuda:0", "sees no CUDA GPU here"),
                            ("tpu", "not a device PyTorch knows"), ("cuda:x", "not a device PyTorch knows")]:
        assert main([*common, device]) == 2
        line = _one_error_line(capsys)
        assert f"--device {device}: " in line and message in line, line
        assert not (tmp_path / "out").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU: cuda:1 is not there
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*common, "cuda:1"]) == 2
    assert "PyTorch sees 1 CUDA GPU(s), cuda:0..cuda:0" in _one_error_line(capsys)
    with pytest.raises(AssertionError, match="was loaded before"):  # cuda:0 passes the check
        main([*common, "cuda:0"])


@pytest.mark.parametrize("argv, prog, message", [
    (["segment", "x.png", "--classes", "a;b", "--out", "o", "--prob-thd", "2"], "simfeatup segment",
     "argument --prob-thd: 2 is not a probability"),
    (["segment", "x.png", "--classes", "a;b", "--out", "o", "--skip-existing", "--overwrite"], "simfeatup segment",
     "argument --overwrite: not allowed with argument --skip-existing"),
    (["segmnt"], "simfeatup", "argument command: invalid choice: 'segmnt'"),
    (["evaluate", "x.png"], "simfeatup evaluate", "the following arguments are required"),
])
def test_a_bad_command_line_is_one_line_without_the_usage_block(argv, prog, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    [line] = capsys.readouterr().err.splitlines()  # argparse's own would print its usage lines first
    assert exit_.value.code == 2
    assert line.startswith(f"{prog}: error: {message}") and line.endswith(f"(see {prog} --help)"), line


def test_export_command_line_errors_are_one_line_naming_the_help_command(capsys):
    from conftest import load_script

    with pytest.raises(SystemExit) as exit_:
        load_script("export/to_onnx.py").main(["--out", "m"])
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2
    assert line == ("to_onnx: error: the following arguments are required: --upsampler "
                    "(see python export/to_onnx.py --help)")


def test_a_bare_simfeatup_lists_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: simfeatup") and "segment" in err and "make-shards" in err
