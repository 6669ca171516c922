"""Issue 13's fault matrix: damaged, malicious and half-written inputs end in one line, nothing is run or lost."""
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simfeatup import atomic, safe_load
from simfeatup.atomic import atomic_dir, atomic_write

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"
SHARDS = ROOT / "samples" / "shards"
MARK = "simfeatup-test-pwned"


class Evil:
    """Unpickling this would run code: it touches a file named MARK in the working directory."""

    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


def _files(folder: Path) -> dict[str, Path]:
    """One file of every kind a user may hand us as a checkpoint or weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {"state_dict": {"w": torch.zeros(2)}, "global_step": 1}
    paths = {name: folder / name for name in
             ("code_zip.ckpt", "code_legacy.ckpt", "code_raw.pkl", "plain_raw.pkl", "truncated.ckpt",
              "truncated_legacy.ckpt", "empty.ckpt", "garbage.ckpt")}
    torch.save({**good, "x": Evil()}, paths["code_zip.ckpt"])
    torch.save({**good, "x": Evil()}, paths["code_legacy.ckpt"], _use_new_zipfile_serialization=False)
    paths["code_raw.pkl"].write_bytes(pickle.dumps({"x": Evil()}, protocol=4))
    paths["plain_raw.pkl"].write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    buf = io.BytesIO()
    torch.save(good, buf)
    paths["truncated.ckpt"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    torch.save(good, buf, _use_new_zipfile_serialization=False)
    paths["truncated_legacy.ckpt"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    paths["empty.ckpt"].write_bytes(b"")
    paths["garbage.ckpt"].write_bytes(b"hello world" * 10)
    return paths


EXPECTED = {
    "code_zip.ckpt": "refused: this file contains code (pickle globals, e.g. posix.system), not only tensors",
    "code_legacy.ckpt": "refused: this file contains code (pickle globals, e.g. posix.system), not only tensors",
    "code_raw.pkl": "refused: this file contains code (pickle globals, e.g. posix.system), not only tensors",
    "plain_raw.pkl": "not a PyTorch checkpoint",
    "truncated.ckpt": "damaged or truncated (PytorchStreamReader failed reading zip archive",
    "truncated_legacy.ckpt": "damaged or truncated",
    "empty.ckpt": "an empty file",
    "garbage.ckpt": "not a PyTorch checkpoint",
}


def _one_line_without_bad_advice(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Evil would leave its mark
    return tmp_path


# ------------------------------------------------------------------------------ item 9: one loader, right words
def test_every_bad_file_is_named_and_classified_in_one_line_without_running_it(in_tmp):
    for name, path in _files(in_tmp / "files").items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(safe_load.TorchFileError) as err:
                safe_load.load(path, fix="pass another file")
        message = str(err.value)
        assert message.startswith(f"{path}: ") and EXPECTED[name] in message and message.endswith("pass another file")
        _one_line_without_bad_advice(message)
        assert not caught, [str(w.message) for w in caught]  # torch's pickle-protocol warning does not precede it
    assert not (in_tmp / MARK).exists()
    with pytest.raises(safe_load.TorchFileError, match="none.ckpt: no such file; x"):
        safe_load.load(in_tmp / "none.ckpt", fix="x")


def test_pretrained_and_convert_weights_say_the_file_holds_code(in_tmp, tiny_weights, capsys):
    from simfeatup.backbone import WeightsUnavailableError
    from simfeatup.cli import main as simfeatup
    from simfeatup.encoder import DenseCLIP

    files = _files(in_tmp / "files")
    name, _ = tiny_weights
    for kind in ("code_zip.ckpt", "code_legacy.ckpt", "code_raw.pkl"):
        with pytest.raises(WeightsUnavailableError) as err:
            DenseCLIP.from_pretrained(name, str(files[kind]))
        assert "refused: this file contains code" in str(err.value) and "re-save its state_dict" in str(err.value)
        _one_line_without_bad_advice(str(err.value))
        assert simfeatup(["convert-weights", str(files[kind]), str(in_tmp / "out.safetensors")]) == 2
        stderr = capsys.readouterr().err
        assert "refused: this file contains code" in stderr and "not a PyTorch checkpoint" not in stderr
        _one_line_without_bad_advice(stderr)
    with pytest.raises(WeightsUnavailableError, match="truncated.ckpt: damaged or truncated"):
        DenseCLIP.from_pretrained(name, str(files["truncated.ckpt"]))
    assert not (in_tmp / MARK).exists()


# ------------------------------------------------------------------------------ item 4: checkpoint IO
def test_checkpoints_load_with_weights_only_whatever_lightning_asks(in_tmp, monkeypatch):
    from simfeatup.training.checkpoint import AtomicCheckpointIO

    plugin = AtomicCheckpointIO()
    lightning_like = {  # what Lightning writes besides tensors: plain values only, no global to allow
        "state_dict": {"upsampler.w": torch.ones(2)}, "global_step": 3, "epoch": 0,
        "pytorch-lightning_version": "2.6.6", "hyper_parameters": {"lr": 1e-3, "clip_config": {"embed_dim": 32}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3}]}],
        "callbacks": {"ModelCheckpoint{}": {"best_model_score": None, "dirpath": "/x"}}, "lr_schedulers": [],
    }
    plugin.save_checkpoint(lightning_like, in_tmp / "ok.ckpt")
    asked = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: asked.append(k.get("weights_only")) or real(*a, **k))
    loaded = plugin.load_checkpoint(in_tmp / "ok.ckpt", weights_only=False)  # what Lightning may pass: ignored
    assert asked == [True] and loaded["global_step"] == 3 and loaded["hyper_parameters"]["lr"] == 1e-3

    files = _files(in_tmp / "files")
    for name in ("code_zip.ckpt", "truncated.ckpt", "plain_raw.pkl"):
        with pytest.raises(safe_load.TorchFileError) as err:
            plugin.load_checkpoint(files[name], weights_only=None)
        assert EXPECTED[name] in str(err.value) and "--ckpt_path" in str(err.value)
        _one_line_without_bad_advice(str(err.value))
    assert not (in_tmp / MARK).exists()


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(tiny_clip_cfg):
    from simfeatup.backbone import CHECKPOINT_KEY
    from simfeatup.training.module import SimFeatUpModule

    trained = SimFeatUpModule(clip_config=tiny_clip_cfg)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("backbone.")}
    ckpt = {"state_dict": state, CHECKPOINT_KEY: trained.backbone.backbone.to_dict()}
    other = SimFeatUpModule(clip_config=tiny_clip_cfg, radius=3)
    with pytest.raises(ValueError, match=r"holds another model's weights \(upsampler\..* differ\); resume with the "
                                         r"--model\.\* settings") as err:
        other.on_load_checkpoint(ckpt)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ item 7: resume from the newest
def test_resume_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    from simfeatup.training.checkpoint import AtomicCheckpointIO, newest_checkpoint

    folder = tmp_path / "checkpoints"
    assert newest_checkpoint(folder) is None  # a first run with --ckpt_path last
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"state_dict": {}, "global_step": 3}, folder / "epoch=0-step=3.ckpt")
    plugin.save_checkpoint({"state_dict": {}, "global_step": 2}, folder / "last.ckpt")  # killed before last.ckpt
    (folder / "epoch=0-step=4.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")  # a torn copy (not ours)
    with caplog.at_level(logging.WARNING):
        assert newest_checkpoint(folder) == folder / "epoch=0-step=3.ckpt"
    assert "epoch=0-step=4.ckpt: damaged or truncated" in caplog.text
    plugin.save_checkpoint({"state_dict": {}, "global_step": 3}, folder / "last.ckpt")
    assert newest_checkpoint(folder) == folder / "last.ckpt"  # same step: the later file

    only_damaged = tmp_path / "damaged"
    only_damaged.mkdir()
    (only_damaged / "last.ckpt").write_bytes(b"")
    with pytest.raises(safe_load.TorchFileError) as err:
        newest_checkpoint(only_damaged)
    assert "last.ckpt: an empty file" in str(err.value) and "delete the damaged files" in str(err.value)
    _one_line_without_bad_advice(str(err.value))


def test_a_step_capped_recipe_is_not_capped_by_epochs(caplog, monkeypatch):
    from simfeatup.training.checkpoint import warn_if_epochs_cap_steps
    from simfeatup.training.cli import SimFeatUpCLI
    from simfeatup.training.main import QUICKSTART

    monkeypatch.setattr(sys, "argv", ["train/fit.py"])
    cli = SimFeatUpCLI(args=["--config", str(TINY), "--trainer.max_steps", "9", "--trainer.logger", "false"],
                       parser_kwargs={"default_config_files": [str(QUICKSTART)]})
    assert cli.trainer.max_steps == 9 and cli.trainer.max_epochs == -1  # 9 steps, not 1 epoch of 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simfeatup"):
        warn_if_epochs_cap_steps(cli.trainer, cli.datamodule)
        assert not caplog.records
        capped = SimpleNamespace(max_steps=40, max_epochs=1)
        warn_if_epochs_cap_steps(capped, SimpleNamespace(resampled=True, steps_per_epoch=20))
    assert "max_steps=40 will not be reached: max_epochs=1 x steps_per_epoch=20 stops at step 20" in caplog.text
    assert "--trainer.max_epochs -1" in caplog.text


# ------------------------------------------------------------------------------ item 3: fit's errors in one line
def _fit(run: Path, *extra: str, train: str) -> list:
    return ["--config", str(TINY), "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--data.train_shards", train, "--data.val_shards", "null", *extra]


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """train/fit.py ARGS in a fresh process (for the SIGKILL tests)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train" / "fit.py"), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _error_line(args: list, capsys, monkeypatch) -> str:
    """fit's one error line for ARGS, run in this process (fit.main returns, never raises or exits)."""
    from simfeatup.training.main import main

    monkeypatch.setattr(sys, "argv", ["train/fit.py"])
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Lightning's handlers keep the stderr
        for handler in logging.getLogger(name).handlers:  # of the test that imported it: give them this one's
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", sys.stderr)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("fit: error: ")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


@pytest.mark.parametrize("shard, workers", [("zero.tar", 0), ("none.tar", 1)])
def test_fit_with_only_empty_shards_ends_in_one_line(tmp_path, capsys, monkeypatch, shard, workers):
    (tmp_path / "zero.tar").write_bytes(b"")  # a 0-byte file: every read fails
    with tarfile.open(tmp_path / "none.tar", "w"):
        pass  # a valid tar without members: reads "succeed" with nothing, forever
    line = _error_line(_fit(tmp_path / "run", "--data.num_workers", str(workers), train=str(tmp_path / shard)),
                       capsys, monkeypatch)  # with a worker the error crosses a process: still one line
    assert str(tmp_path / shard) in line and "make-shards" in line


def test_fit_with_a_missing_shard_or_a_bad_checkpoint_ends_in_one_line(in_tmp, capsys, monkeypatch):
    run = in_tmp / "run"
    missing = str(SHARDS / "train-{000000..000009}.tar")
    line = _error_line(_fit(run, train=missing), capsys, monkeypatch)
    assert "train-000004.tar" in line and "brace pattern" in line

    files = _files(in_tmp / "files")
    good = str(SHARDS / "train-{000000..000003}.tar")
    for name in ("truncated.ckpt", "code_legacy.ckpt"):
        line = _error_line(_fit(run, "--ckpt_path", str(files[name]), train=good), capsys, monkeypatch)
        assert str(files[name]) in line and EXPECTED[name] in line and "--ckpt_path" in line
        _one_line_without_bad_advice(line)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(files["truncated.ckpt"].read_bytes())
    line = _error_line(_fit(run, "--ckpt_path", "last", train=good), capsys, monkeypatch)
    assert str(run / "checkpoints" / "last.ckpt") in line and "damaged or truncated" in line
    assert not (in_tmp / MARK).exists()


# ------------------------------------------------------------------------------ item 6: stale temporaries
def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_every_atomic_writer_sweeps_what_a_killed_run_left_beside_it(tmp_path):
    dead = _dead_pid()
    for folder, writes in (
        ("out", lambda f: atomic_write(f / "a.png").__exit__(None, None, None)),
        ("export", lambda f: atomic_dir(f / "model_onnx").__enter__()),
    ):
        target = tmp_path / folder
        target.mkdir()
        stale_file = target / f".last.ckpt.{atomic._HOST}.{dead}.0123abcd.partial"
        stale_dir = target / f".model_onnx.{atomic._HOST}.{dead}.4567cdef.partial"
        stale_file.write_bytes(b"")
        stale_dir.mkdir()
        (stale_dir / "image.onnx").write_bytes(b"half")
        theirs = target / ".notes.partial"  # not our name form: never touched
        theirs.write_bytes(b"")
        writes(target)
        assert not stale_file.exists() and not stale_dir.exists() and theirs.exists(), folder


@pytest.mark.slow
def test_a_killed_training_leaves_nothing_the_next_run_keeps(tmp_path):
    """SIGKILL while checkpoints are written every step: the rerun resumes and no temporary survives it."""
    run = tmp_path / "run"
    args = _fit(run, "--trainer.max_steps", "12", "--data.steps_per_epoch", "12",
                "--checkpoint.every_n_train_steps", "1", train=str(SHARDS / "train-{000000..000003}.tar"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train" / "fit.py"), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = run / "checkpoints"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not list(folder.glob(".*.partial")):
            time.sleep(0.01)  # kill while a checkpoint is being written, when we catch one
        while time.monotonic() < deadline and proc.poll() is None and not (folder / "last.ckpt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # a temporary the killed run might have left, named as its writer (now dead) names them
    (folder / f".last.ckpt.{atomic._HOST}.{proc.pid}.89abcdef.partial").write_bytes(b"")
    done = _run([*args, "--ckpt_path", "last"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 12
    leftovers = [p.name for p in (*folder.iterdir(), *run.iterdir()) if p.name.endswith((".partial", ".old"))]
    assert not leftovers


@pytest.mark.slow
def test_a_killed_export_leaves_no_staging_folder_after_the_next_export(tmp_path, tiny_weights):
    name, weights = tiny_weights
    out = tmp_path / "model_onnx"
    config = weights.parent / f"{name}.json"  # the tiny model as a model config file: no registration needed
    cmd = [sys.executable, str(ROOT / "export" / "to_onnx.py"), "--upsampler", "bilinear", "--model", str(config),
           "--pretrained", str(weights), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob(".model_onnx.*")):
            time.sleep(0.05)
        assert proc.poll() is None, "the export ended before it could be killed"
        time.sleep(1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp_path.glob(".model_onnx.*.partial")) and not out.exists()  # the litter of issue 13
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".model_onnx.*"))
