"""The WebDataset pipeline and ShardDataModule: decoding, crops, skips, resampled vs exactly-once."""
import io
import logging
import tarfile

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from simfeatup.training.data import SkipCounter, expand_urls, make_pipeline, pad_to
from simfeatup.training.datamodule import ShardDataModule


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "tif":
        tifffile.imwrite(buf, arr)
    else:
        Image.fromarray(arr).save(buf, {"jpg": "JPEG", "png": "PNG"}[fmt], **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def _write_shard(path, members):
    """members: [(name, bytes)] written in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _decode_one(tmp_path, arr, fmt, crop, **kw):
    url = _write_shard(tmp_path / "one.tar", [(f"img.{fmt}", _encode(arr, fmt))])
    batches = list(make_pipeline(url, train=False, batch_size=1, crop_size=crop, **kw))
    assert len(batches) == 1
    out = batches[0]
    assert out.dtype == torch.uint8 and out.shape == (1, 3, crop, crop)
    return out[0].permute(1, 2, 0).numpy()  # (crop, crop, 3)


def _ramp(h, w, dtype=np.uint8, top=255):
    y, x = np.mgrid[0:h, 0:w]
    r, g, b = (x * top // max(1, w - 1)), (y * top // max(1, h - 1)), np.full((h, w), top // 3)
    return np.stack([r, g, b], -1).astype(dtype)


def test_png_is_rgb_and_centre_cropped(tmp_path):
    img = _ramp(20, 30)
    out = _decode_one(tmp_path, img, "png", 16)
    np.testing.assert_array_equal(out, img[2:18, 7:23])


def test_jpg(tmp_path):
    img = _ramp(32, 32)
    out = _decode_one(tmp_path, img, "jpg", 32)
    assert np.abs(out.astype(int) - img).mean() < 3


def test_grayscale_becomes_three_channels(tmp_path):
    gray = _ramp(16, 16)[..., 0]
    out = _decode_one(tmp_path, gray, "png", 16)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_drops_alpha(tmp_path):
    img = np.dstack([_ramp(16, 16), np.full((16, 16), 9, np.uint8)])
    out = _decode_one(tmp_path, img, "png", 16)
    np.testing.assert_array_equal(out, img[..., :3])


def test_16bit_tif_stretches(tmp_path):
    img = _ramp(16, 16, np.uint16, top=2000)
    out = _decode_one(tmp_path, img, "tif", 16)  # default "percentile": 2-98 % per band
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    fixed = _decode_one(tmp_path, img, "tif", 16, stretch=2000)  # 2000 -> 255, linear
    np.testing.assert_allclose(fixed.astype(float), img / 2000 * 255, atol=0.51)
    minmax = _decode_one(tmp_path, img, "tif", 16, stretch="minmax")
    assert minmax[..., 1].min() == 0 and minmax[..., 1].max() == 255


def test_multiband_tif_band_order(tmp_path):
    # Blue, Green, Red, NIR as stored by many satellites; bands=(2, 1, 0) makes RGB
    bgrn = np.stack([np.full((16, 16), v, np.uint16) for v in (100, 200, 300, 1000)], -1)
    out = _decode_one(tmp_path, bgrn, "tif", 16, bands=(2, 1, 0), stretch=1000)
    np.testing.assert_array_equal(out[0, 0], [77, 51, 26])  # round(300/1000*255), 200.., 100..
    planar = np.ascontiguousarray(np.moveaxis(bgrn, -1, 0))  # (4, H, W) band-sequential layout
    url = _write_shard(tmp_path / "planar.tar", [("p.tif", _tif_planar(planar))])
    (batch,) = list(make_pipeline(url, train=False, batch_size=1, crop_size=16, bands=(2, 1, 0), stretch=1000))
    np.testing.assert_array_equal(batch[0, :, 0, 0].numpy(), [77, 51, 26])


def _tif_planar(arr):
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, planarconfig="separate", photometric="minisblack")
    return buf.getvalue()


def test_bad_band_order_is_skipped_with_the_reason(tmp_path, caplog):
    rgb = _ramp(16, 16, np.uint16)
    url = _write_shard(tmp_path / "b.tar", [("a.tif", _encode(rgb, "tif"))])
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        assert list(make_pipeline(url, train=False, crop_size=16, bands=(3, 2, 1), counter=counter)) == []
    assert counter.skipped == 1 and "bands=(3, 2, 1)" in caplog.text


def test_small_image_is_reflect_padded(tmp_path):
    img = _ramp(10, 12)
    out = _decode_one(tmp_path, img, "png", 16)
    expected = np.pad(img, ((3, 3), (2, 2), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(out, expected)
    assert pad_to(np.zeros((1, 1, 3), np.uint8), 5).shape == (5, 5, 3)


def test_random_crops_come_from_the_torch_rng(tmp_path):
    url = _write_shard(tmp_path / "r.tar", [("a.png", _encode(_ramp(64, 64), "png"))])

    def crops(seed):
        torch.manual_seed(seed)
        pipe = make_pipeline(url, train=True, resampled=True, steps_per_epoch=6, batch_size=1, crop_size=16)
        return torch.cat(list(pipe))

    assert torch.equal(crops(1), crops(1))
    assert not torch.equal(crops(1), crops(2))


def test_corrupt_and_non_image_members_are_skipped_and_counted(tmp_path, caplog):
    good = _encode(_ramp(16, 16), "jpg")
    url = _write_shard(tmp_path / "bad.tar", [
        ("a.jpg", good),
        ("b.jpg", _encode(_ramp(64, 64), "jpg")[:200]),  # truncated
        ("c.txt", b"not an image"),  # a sample with no image member
        ("d.png", b"\x89PNG\r\n\x1a\n garbage"),  # undecodable
        ("e.jpg", good),
    ])
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        batches = list(make_pipeline(url, train=False, batch_size=4, crop_size=16, counter=counter))
    assert [b.shape[0] for b in batches] == [2]
    assert (counter.skipped, counter.decoded) == (3, 2)
    assert "key=b" in caplog.text and "no image member" in caplog.text


def test_unreadable_shard_is_skipped(tmp_path):
    good = _write_shard(tmp_path / "good.tar", [("a.png", _encode(_ramp(16, 16), "png"))])
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x00garbage" * 100)
    counter = SkipCounter()
    out = list(make_pipeline([str(broken), good], train=False, crop_size=16, counter=counter))
    assert sum(b.shape[0] for b in out) == 1 and counter.skipped >= 1


def test_endless_failures_raise_instead_of_spinning(tmp_path):
    url = _write_shard(tmp_path / "x.tar", [("a.txt", b"x")])
    pipe = make_pipeline(url, train=True, resampled=True, steps_per_epoch=2, crop_size=16,
                         counter=SkipCounter(max_consecutive=50))
    with pytest.raises(ValueError, match="50 samples in a row failed to load, the last from .*x.tar: no image member"):
        list(pipe)  # a ValueError: fit reports it in one line (exit 2), naming the shard


def _id_shards(tmp_path, n_shards, per_shard):
    """Shards of 4x4 images whose red value is their global index."""
    urls, i = [], 0
    for s in range(n_shards):
        members = []
        for _ in range(per_shard[s] if isinstance(per_shard, list) else per_shard):
            members.append((f"s{s}_{i:03d}.png", _encode(np.full((4, 4, 3), i, np.uint8), "png")))
            i += 1
        urls.append(_write_shard(tmp_path / f"shard-{s:06d}.tar", members))
    return urls, i


def _simulate(monkeypatch, rank, world, worker, workers):
    for k, v in (("RANK", rank), ("WORLD_SIZE", world), ("WORKER", worker), ("NUM_WORKERS", workers)):
        monkeypatch.setenv(k, str(v))


def test_exactly_once_across_2_ranks_x_2_workers(tmp_path, monkeypatch):
    urls, total = _id_shards(tmp_path, 5, [5, 4, 6, 3, 5])
    for epoch in range(2):
        seen = []
        for rank in range(2):
            for worker in range(2):
                _simulate(monkeypatch, rank, 2, worker, 2)
                pipe = make_pipeline(urls, train=True, resampled=False, batch_size=3, crop_size=4, shuffle_buffer=4)
                seen += [int(v) for b in pipe for v in b[:, 0, 0, 0]]
        assert sorted(seen) == list(range(total)), f"epoch {epoch}"


def test_exactly_once_needs_enough_shards(tmp_path, monkeypatch):
    urls, _ = _id_shards(tmp_path, 3, 2)
    _simulate(monkeypatch, 0, 2, 0, 2)
    with pytest.raises(ValueError, match="only 3 shards"):
        list(make_pipeline(urls, train=True, resampled=False, crop_size=4))


def test_resampled_epochs_have_fixed_length_and_ranks_draw_independently(tmp_path, monkeypatch):
    urls, _ = _id_shards(tmp_path, 2, 20)

    def run(rank, worker, workers):
        _simulate(monkeypatch, rank, 2, worker, workers)
        torch.manual_seed(0)  # what seed_everything does on every rank
        pipe = make_pipeline(urls, train=True, resampled=True, steps_per_epoch=5, batch_size=4, crop_size=4)
        return [b[:, 0, 0, 0].tolist() for b in pipe]

    assert [len(run(0, w, 2)) for w in range(2)] == [3, 2]  # 5 batches per rank, split over its workers
    r0, r1 = run(0, 0, 1), run(1, 0, 1)
    assert len(r0) == 5 and r0 != r1
    assert run(0, 0, 1) == r0  # reproducible for a given torch seed


def test_expand_urls(tmp_path):
    urls, _ = _id_shards(tmp_path, 3, 1)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    assert expand_urls(pattern) == urls
    assert expand_urls(str(tmp_path)) == urls  # a folder of shards
    assert expand_urls(f"{urls[0]}::{urls[2]}") == [urls[0], urls[2]]
    assert expand_urls("pipe:cat x.tar") == ["pipe:cat x.tar"]
    assert expand_urls("https://example.org/s-{0..1}.tar") == ["https://example.org/s-0.tar", "https://example.org/s-1.tar"]
    with pytest.raises(ValueError, match="not found"):
        expand_urls(str(tmp_path / "nope-{000000..000001}.tar"))


def test_datamodule_with_workers_counts_skips_in_the_main_process(tmp_path):
    good = _encode(_ramp(16, 16), "png")
    urls = [_write_shard(tmp_path / f"t-{s}.tar", [(f"{s}a.png", good), (f"{s}b.png", b"junk"), (f"{s}c.png", good)])
            for s in range(2)]
    dm = ShardDataModule("::".join(urls), str(urls[0]), batch_size=2, num_workers=2, crop_size=8,
                         resampled=False, shuffle_buffer=1)
    batches = list(dm.train_dataloader())
    assert sum(b.shape[0] for b in batches) == 4 and batches[0].shape[1:] == (3, 8, 8)
    assert dm.train_skips.skipped == 2  # counted inside two worker processes
    assert sum(b.shape[0] for b in dm.val_dataloader()) == 2 and dm.skipped == 3


def test_datamodule_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="stretch"):
        ShardDataModule("x.tar", stretch="gamma")
    with pytest.raises(ValueError, match="bands"):
        ShardDataModule("x.tar", bands=(0, 1))
    dm = ShardDataModule(str(tmp_path / "missing-{0..3}.tar"))
    with pytest.raises(ValueError, match="not found"):
        dm.setup("fit")


def test_datamodule_builds_from_yaml_with_the_same_keys():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    cfg = parser.parse_string("data:\n  train_shards: s/train-{0..3}.tar\n  bands: [2, 1, 0]\n"
                              "  stretch: 2047\n  resampled: false\n  num_workers: 0\n")
    dm = parser.instantiate_classes(cfg).data
    assert dm.bands == (2, 1, 0) and float(dm.stretch) == 2047 and dm.resampled is False


def test_trainer_fit_with_bundled_shards_and_no_val(tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shapes = []

        def training_step(self, batch, _):
            self.shapes.append((tuple(batch.shape), batch.dtype))
            return (self.w - batch.float().mean() / 255).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from pathlib import Path

    shards = Path(__file__).resolve().parents[1] / "samples" / "shards" / "train-{000000..000003}.tar"
    dm = ShardDataModule(str(shards), batch_size=2, num_workers=0, crop_size=32, steps_per_epoch=3)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=dm)
    assert probe.shapes == [((2, 3, 32, 32), torch.uint8)] * 6


def test_dataloader_bench_runs_as_users_run_it(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "dataloader.py"
    spec = importlib.util.spec_from_file_location("bench_dataloader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--workers", "0", "--batches", "2", "--warmup", "1", "--batch-size", "2", "--crop-size", "64"]
    results = bench.main(argv)
    assert results[0]["images"] == 4 and results[0]["images_per_s"] > 0
    assert "1.00x" in capsys.readouterr().out


def test_pipe_and_http_urls(tmp_path):
    import functools
    import http.server
    import threading

    urls, total = _id_shards(tmp_path, 2, 3)
    piped = [f"pipe:cat {u}" for u in urls]
    seen = [int(v) for b in make_pipeline(piped, train=False, crop_size=4) for v in b[:, 0, 0, 0]]
    assert sorted(seen) == list(range(total))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = f"http://127.0.0.1:{server.server_port}/shard-{{000000..000001}}.tar"
        seen = [int(v) for b in make_pipeline(spec, train=False, crop_size=4) for v in b[:, 0, 0, 0]]
        assert sorted(seen) == list(range(total))
    finally:
        server.shutdown()
        server.server_close()
