"""train/fit.py end to end through the real LightningCLI on CPU with the tiny recipe."""
import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"
SAMPLES = ROOT / "samples" / "shards"
TRAIN_SHARDS = str(SAMPLES / "train-{000000..000003}.tar")
VAL_SHARDS = str(SAMPLES / "val-000000.tar")


def _load_fit():
    spec = importlib.util.spec_from_file_location("train_fit", ROOT / "train" / "fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fit = _load_fit()


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    # main(argv) is the command line; pytest's own flags must not look like extra arguments.
    monkeypatch.setattr(sys, "argv", ["train/fit.py"])


def tiny_args(run_dir, *extra):
    return [
        "--config", str(TINY),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        "--data.train_shards", TRAIN_SHARDS,
        "--data.val_shards", VAL_SHARDS,
        *extra,
    ]


def _ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _logged_steps(run_dir, version):
    with open(run_dir / "lightning_logs" / f"version_{version}" / "metrics.csv") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")})


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config):
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exc:
        fit.main(["--config", str(config), "--print_config"])
    assert exc.value.code == 0
    assert "train_shards:" in out.getvalue() and "every_n_train_steps:" in out.getvalue()


def test_no_arguments_runs_the_quickstart_and_fails_clearly_offline(capsys):
    assert fit.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ViT-B-16" in err
    assert "Traceback" not in err


def test_tiny_recipe_trains_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "run"
    assert fit.main(tiny_args(run, "--trainer.max_steps", "2")) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert _ckpt_step(last) == 2
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    info = json.loads((run / "upsampler.json").read_text())
    assert info["training"]["steps"] == 2 and info["backbone"]["feature_source"] == "final"
    assert info["training"]["data"]["train_shards"] == TRAIN_SHARDS
    assert (run / "upsampler.safetensors").stat().st_size > 0

    # Resume: the step counter continues from 2, it does not restart at 0.
    assert fit.main(tiny_args(run, "--trainer.max_steps", "4", "--ckpt_path", "last")) == 0
    assert _ckpt_step(last) == 4
    assert _logged_steps(run, 1)[0] >= 2
    assert json.loads((run / "upsampler.json").read_text())["training"]["steps"] == 4
    from simfeatup.upsampler import load_upsampler

    upsampler, _ = load_upsampler(run / "upsampler.safetensors")
    assert upsampler.dim == 32


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    run = tmp_path / "run"
    args = tiny_args(run, "--trainer.max_steps", "8", "--data.steps_per_epoch", "8",
                     "--checkpoint.every_n_train_steps", "1", "--trainer.val_check_interval", "8")
    cmd = [sys.executable, str(ROOT / "train" / "fit.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists() and _ckpt_step(last) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _ckpt_step(last)  # loads: never half-written
    assert 3 <= killed_at < 8
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".ckpt") and p.stat().st_size == 0]

    done = subprocess.run([*cmd, "--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _ckpt_step(last) == 8
    assert _logged_steps(run, 1)[0] >= killed_at
