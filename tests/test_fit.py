"""train/fit.py end to end through the real LightningCLI on CPU with the tiny recipe."""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

# imported at collection: the handler Lightning adds on import must not hold one test's captured
# stderr, closed when that test ends ("--- Logging error ---" in the tests after it)
import lightning.pytorch  # noqa: F401
import pytest
import torch

from conftest import load_fit

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"
SAMPLES = ROOT / "samples" / "shards"
TRAIN_SHARDS = str(SAMPLES / "train-{000000..000003}.tar")
VAL_SHARDS = str(SAMPLES / "val-000000.tar")


fit = load_fit()


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    # main(argv) is the command line; pytest's own flags must not look like extra arguments.
    monkeypatch.setattr(sys, "argv", ["train/fit.py"])


def tiny_args(run_dir, *extra, train=TRAIN_SHARDS, val=VAL_SHARDS):
    return [
        "--config", str(TINY),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        "--data.train_shards", train,
        "--data.val_shards", val or "null",
        *extra,
    ]


def _ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


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
    assert fit.main([]) == 2
    err = capsys.readouterr().err
    errors = [
        line for line in err.splitlines() if line.startswith("fit: error: ")
    ]  # Lightning may log "Seed set" first
    assert len(errors) == 1 and "ViT-B-16" in errors[0] and "--model.pretrained" in err
    assert "Traceback" not in err


def test_a_bad_model_config_file_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "cfg.json").write_text('{"embed_dim": 32}')
    assert fit.main(["--model.model", str(tmp_path / "cfg.json"), "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fit: error: ")]
    # returned, not raised: the error was caught and said in one line
    assert len(errors) == 1 and "cfg.json: missing vision_cfg, text_cfg" in errors[0] and "--model.model" in err


def test_whole_numbers_stay_batch_counts_and_fractions_shares(tmp_path):
    """limit_val_batches: 1 in tiny.yaml is one batch (lightning's float-first annotation made it 100 %)."""
    from simfeatup.training.cli import SimFeatUpCLI

    base = ["--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    trainer = SimFeatUpCLI(args=base).trainer
    assert type(trainer.limit_val_batches) is int and trainer.limit_val_batches == 1
    limits = ["--trainer.limit_val_batches", "0.5", "--trainer.limit_train_batches", "3"]
    trainer = SimFeatUpCLI(args=[*base, *limits]).trainer
    assert (trainer.limit_val_batches, trainer.limit_train_batches) == (0.5, 3)
    assert type(trainer.limit_train_batches) is int
    assert list(tmp_path.iterdir()) == []


def test_a_missing_shard_path_is_one_line_naming_it_and_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert fit.main(["--config", str(TINY), "--data.train_shards", "nowhere/train-{000000..000001}.tar"]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("fit: error: ")]
    assert "not found: nowhere/train-000000.tar" in line and f"(current directory: {tmp_path})" in line
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []  # no empty run folder left behind


def test_tiny_recipe_trains_from_any_folder_and_checkpoints(tiny_run):
    run, log, caught, same_filters = tiny_run
    assert same_filters  # the run's own filters ended with it
    # The two warnings every run triggers by design are silenced while it runs.
    assert not [
        w
        for w in caught
        if re.search(r"ModelCheckpoint with manual optimization|module\(s\) in eval mode", str(w.message))
    ]
    last = run / "checkpoints" / "last.ckpt"
    assert _ckpt_step(last) == 2
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    info = json.loads((run / "upsampler.json").read_text())
    assert info["training"]["steps"] == 2 and info["backbone"]["feature_source"] == "final"
    # the recipe's shard paths are relative to the recipe, not to the folder it was run from
    assert info["training"]["data"]["train_shards"] == TRAIN_SHARDS
    assert info["training"]["data"]["val_shards"] == VAL_SHARDS
    assert (run / "upsampler.safetensors").stat().st_size > 0
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # nothing written into the working folder


def test_the_end_of_a_run_says_where_its_results_are(tiny_run):
    run, log, _, _ = tiny_run
    assert f"upsampler: {run / 'upsampler.safetensors'}" in log
    assert f"checkpoints: {run / 'checkpoints'}" in log
    assert f"tensorboard --logdir {run / 'lightning_logs'}" in log
    assert list((run / "lightning_logs").glob("version_0/events.out.tfevents.*"))  # where that command looks


def test_a_run_writes_captioned_previews_into_its_folder(tiny_run):
    from PIL import Image

    from simfeatup.visualize import enlargement, grid_layout

    run, log, _, _ = tiny_run
    # the recipe previews every 2 steps; the 2-step run makes one, at step 0
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step_000000.png"]
    assert f"previews (image | low-res | upsampled | bilinear features): {run / 'previews'}" in log
    picture = Image.open(run / "previews" / "step_000000.png")
    side = 64 * enlargement(64, 64)  # the recipe's 64 px crops, shown at 256 px
    assert side == 256
    # batch 2: two rows of image | low-res | upsampled | bilinear, under captions, above a note
    assert picture.size == grid_layout(2, 4, side, side, note=True)[0]


@pytest.mark.slow  # 5-8 s on a 2-core AVX2 machine: the default run stays under 5 min
def test_resume_continues_the_step_count_and_the_artefact_serves_segment(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert fit.main(tiny_args(run, "--trainer.max_steps", "2")) == 0
    assert _ckpt_step(last) == 2

    # Resume: the step counter continues from 2, it does not restart at 0.
    assert fit.main(tiny_args(run, "--trainer.max_steps", "4", "--ckpt_path", "last")) == 0
    assert _ckpt_step(last) == 4
    assert _logged_steps(run, 1)[0] >= 2
    assert json.loads((run / "upsampler.json").read_text())["training"]["steps"] == 4
    from simfeatup.upsampler import load_upsampler

    upsampler, _ = load_upsampler(run / "upsampler.safetensors")
    assert upsampler.dim == 32

    # The artefact is what `simfeatup segment` takes, backbone and all.
    from simfeatup.cli import main as simfeatup

    out = tmp_path / "seg"
    assert (
        simfeatup(
            [
                "segment",
                str(ROOT / "samples" / "spacenet6_rotterdam.jpg"),
                "--classes",
                "building;road;tree",
                "--upsampler",
                str(run / "upsampler.safetensors"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "spacenet6_rotterdam.png").is_file()

    # convert-weights on our own checkpoint keeps the backbone it was trained for (not ViT-B-16/openai)
    assert simfeatup(["convert-weights", str(last), str(tmp_path / "from_ckpt.safetensors")]) == 0
    converted = json.loads((tmp_path / "from_ckpt.json").read_text())["backbone"]
    assert converted == json.loads((run / "upsampler.json").read_text())["backbone"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    run = tmp_path / "run"
    args = tiny_args(
        run,
        "--trainer.max_steps",
        "8",
        "--data.steps_per_epoch",
        "8",
        "--checkpoint.every_n_train_steps",
        "1",
        "--trainer.val_check_interval",
        "8",
    )
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


DDP_SCRIPT = '''
import hashlib, json, sys
from pathlib import Path
import torch
from lightning.pytorch.callbacks import Callback
from simfeatup.training.cli import SimFeatUpCLI

OUT = Path(sys.argv[1])


class Record(Callback):
    """Which sample (its constant colour) each rank trained on, per epoch, and the final weights."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = [int(v) for v in batch[:, 0, 0, 0]]
        with open(OUT / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "ids": ids}) + "\\n")

    def on_train_end(self, trainer, pl_module):
        h = hashlib.sha256()
        for k, v in sorted(pl_module.state_dict().items()):
            if not k.startswith("backbone."):
                h.update(v.detach().cpu().numpy().tobytes())
        (OUT / f"weights{trainer.global_rank}.txt").write_text(h.hexdigest())


if __name__ == "__main__":
    SimFeatUpCLI(args=sys.argv[2:], trainer_defaults={"callbacks": [Record()]}).fit()
'''


def _colour_shards(folder, n_images, per_shard, size=40):
    """Shards of constant-colour PNGs whose red value identifies the sample."""
    import numpy as np
    from PIL import Image

    from simfeatup.shards import make_shards

    src = folder / "src"
    src.mkdir(parents=True)
    for i in range(n_images):
        colour = np.array([10 + 7 * i, 120, 60], dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (size, size, 3)).copy()).save(src / f"img{i:03d}.png")
    summary = make_shards([src], str(folder / "train-%06d.tar"), maxcount=per_shard, progress=False)
    return summary.urls, [10 + 7 * i for i in range(n_images)]


@pytest.mark.slow
def test_ddp_two_cpu_processes_see_every_sample_once_per_epoch(tmp_path):
    urls, ids = _colour_shards(tmp_path / "shards", n_images=16, per_shard=4)
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "run"
    args = tiny_args(
        run,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "-1",
        "--trainer.max_epochs",
        "2",
        "--data.resampled",
        "false",
        "--data.crop_size",
        "32",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "0",
        train=urls,
        val=None,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {0: [], 1: []}
    for rank in (0, 1):
        for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen[rec["epoch"]].append((rank, rec["ids"]))
    for epoch, batches in seen.items():
        got = sorted(i for _, batch in batches for i in batch)
        assert got == ids, f"epoch {epoch}: {got}"
        per_rank = [sorted(i for r, b in batches if r == rank for i in b) for rank in (0, 1)]
        assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    # Gradients were all-reduced: both ranks end with the same weights.
    assert (tmp_path / "weights0.txt").read_text() == (tmp_path / "weights1.txt").read_text()
    assert json.loads((run / "upsampler.json").read_text())["training"]["steps"] == 8


@pytest.mark.slow
def test_learning_signal_on_held_out_real_crops(tmp_path):
    """After a short CPU training on the sample shards, the SPEC reconstruction loss on the
    held-out val shard is lower than at initialisation and lower than bilinear upsampling's."""
    import lightning as L
    import yaml

    from simfeatup.training.datamodule import ShardDataModule
    from simfeatup.training.module import SimFeatUpModule

    def validate(module):
        data = ShardDataModule(TRAIN_SHARDS, VAL_SHARDS, crop_size=64, val_batch_size=20, num_workers=0)
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
        return metrics

    torch.manual_seed(0)
    clip_config = yaml.safe_load(TINY.read_text())["model"]["clip_config"]
    init = validate(SimFeatUpModule(clip_config=clip_config))
    run = tmp_path / "run"
    steps = "12"
    assert (
        fit.main(
            tiny_args(
                run,
                "--trainer.max_steps",
                steps,
                "--data.steps_per_epoch",
                steps,
                "--trainer.val_check_interval",
                steps,
                "--checkpoint.every_n_train_steps",
                steps,
            )
        )
        == 0
    )
    trained = validate(SimFeatUpModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt"))
    print(
        f"\nheld-out SPEC reconstruction loss (20 val crops, 64 px, tiny random backbone, {steps} steps):"
        f"\n  upsampler at init     {init['val/rec']:.4f}   (bilinear with init heads {init['val/rec_bilinear']:.4f})"
        f"\n  upsampler trained     {trained['val/rec']:.4f}"
        f"\n  bilinear, same heads  {trained['val/rec_bilinear']:.4f}"
    )
    assert trained["val/rec"] < init["val/rec"]
    assert trained["val/rec"] < trained["val/rec_bilinear"]


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_training_goes_on_past_a_truncated_file_and_a_non_image_member(tmp_path, caplog):
    """A damaged shard among good ones: training completes and the skip count is reported."""
    import io
    import logging
    import tarfile

    good = sorted(tarfile.open(SAMPLES / "train-000000.tar").getmembers(), key=lambda m: m.name)[:6]
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(SAMPLES / "train-000000.tar") as src, tarfile.open(bad, "w") as dst:
        members = [(m.name, src.extractfile(m).read()) for m in good]
        members += [("truncated.jpg", members[0][1][:300]), ("notes.txt", b"not an image")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        assert (
            fit.main(
                tiny_args(
                    tmp_path / "run", "--trainer.max_steps", "3", "--data.resampled", "false", train=str(bad), val=None
                )
            )
            == 0
        )
    assert json.loads((tmp_path / "run" / "upsampler.json").read_text())["training"]["steps"] == 3
    assert "samples were skipped in total" in caplog.text


def test_a_bf16_recipe_on_a_cpu_without_bf16_units_is_refused_in_one_line(tmp_path, monkeypatch, capsys, caplog):
    from simfeatup import hardware

    none = {"avx512": False, "avx512_bf16": False, "amx": False, "vnni": False, "amx_fp16": False}
    monkeypatch.setattr(hardware, "cpu_features", lambda: none)
    base = ["--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.precision", "bf16-mixed"]
    for accelerator in ("cpu", "auto"):  # auto is the CPU here: the test machine's torch sees no GPU
        assert fit.main([*base, "--trainer.accelerator", accelerator]) == 2
        [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fit: error: ")]
        assert "--trainer.precision bf16-mixed on this CPU: this CPU has no bf16 units" in line
        assert line.endswith("train with --trainer.precision 32-true")
    assert list(tmp_path.iterdir()) == []  # refused before any run folder is made
    from simfeatup.training.cli import SimFeatUpCLI

    monkeypatch.setattr(hardware, "cpu_features", lambda: {**none, "avx512": True})  # emulated by oneDNN: a warning
    with caplog.at_level("WARNING", logger="simfeatup"):
        SimFeatUpCLI(args=[*base, "--trainer.logger", "false"])
    assert "--trainer.precision bf16-mixed on this CPU: this CPU has AVX-512 but no bf16 units" in caplog.text


def test_a_gpu_trainer_on_a_machine_without_one_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))  # as on a CPU-only machine
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    args = ["--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "gpu"]
    assert fit.main(args) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("fit: error: ")]
    assert "Traceback" not in err and line.startswith("fit: error: the --trainer settings cannot run here: ")
    assert line.endswith("(on a machine without a GPU: --trainer.accelerator cpu, or auto)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--data.batchsize", "3"], "unrecognized arguments: --data.batchsize 3"),
    (["--data.batch_size", "x"], 'Parser key "data.batch_size": Expected a <class \'int\'>. Got value: x'),
    (["--config", "/nonexistent/recipe.yaml"], "/nonexistent/recipe.yaml"),
])
def test_a_bad_command_line_is_one_line_without_the_usage_block(extra, message, tmp_path, capsys):
    assert fit.main(["--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("INFO")]  # Lightning may log "Seed set" first
    assert len(lines) == 1 and "usage:" not in err and "Traceback" not in err, err
    assert lines[0].startswith("fit: error: ") and message in lines[0], lines[0]
    assert lines[0].endswith("(see python train/fit.py --help, or --help-all for every option)")
    assert list(tmp_path.iterdir()) == []
