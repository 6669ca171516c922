"""The Node.js consumer (examples/node) implements docs/model-folder-fixed.md alone: same labels as the Python runtime.

Needs node and npm; examples/node/node_modules is used when present (.ci/run: `npm ci` there), else
`npm ci` installs into a temporary copy, with onnxruntime-node's download step off (ONNXRUNTIME_NODE_INSTALL
=skip, --ignore-scripts: its CPU binaries ship inside the npm package).
"""
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from simfeatup import imaging
from simfeatup.runtime_fixed import open_model_folder

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "node"
SAMPLE = REPO / "samples" / "spacenet6_rotterdam.jpg"  # 600x600: a real resize, 9 windows
MIN_AGREEMENT = 0.999

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node/npm not installed (CI installs node 20)"
)


@pytest.fixture(scope="module")
def consumer(tmp_path_factory) -> Path:
    """A folder holding segment.js with its node_modules installed by `npm ci`."""
    if (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        return EXAMPLE
    folder = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json", "segment.js", "contract.js"):
        shutil.copy(EXAMPLE / name, folder / name)
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    done = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def node(consumer: Path, *args, timeout=300):
    done = subprocess.run(["node", *map(str, args)], cwd=consumer, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("png") / f"{SAMPLE.stem}.png"
    Image.open(SAMPLE).convert("RGB").save(path)  # lossless: both consumers read the same pixels
    return path


def test_resize_is_opencvs_to_the_grey_level(consumer, png, tmp_path):
    rgb = imaging.load_image(png)
    for h, w in ((448, 448), (269, 448), (123, 77), (900, 1001)):
        out = tmp_path / "resized.raw"
        node(consumer, "-e", f"""
            const c = require('./contract.js'); const {{ PNG }} = require('pngjs'); const fs = require('fs');
            const p = PNG.sync.read(fs.readFileSync({str(png)!r}));
            const rgb = new Uint8Array(p.width * p.height * 3);
            for (let i = 0; i < p.width * p.height; i++) for (let k = 0; k < 3; k++) rgb[3*i+k] = p.data[4*i+k];
            fs.writeFileSync({str(out)!r}, c.resizeUint8(rgb, p.height, p.width, {h}, {w}));""")
        got = np.frombuffer(out.read_bytes(), np.uint8).reshape(h, w, 3)
        want = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        assert int(np.abs(got.astype(int) - want).max()) == 0, (h, w)


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in ("uint8", "float32")])  # ~7 s each
def test_node_labels_equal_the_python_runtimes(consumer, png, fixed_dirs, tmp_path, kind):
    labels, overlay = tmp_path / "labels.png", tmp_path / "overlay.png"
    node(consumer, "segment.js", fixed_dirs[kind], png, labels, "--overlay", overlay)
    got = np.asarray(Image.open(labels))
    want = open_model_folder(fixed_dirs[kind]).segment([imaging.load_image(png)])[0].labels
    assert got.shape == want.shape
    agreement = float((got == want).mean())
    assert agreement >= MIN_AGREEMENT, f"{agreement:.5%} of pixels equal"
    assert agreement == 1.0  # measured: every pixel (the resize and the float32 arithmetic are exact)
    assert np.asarray(Image.open(overlay)).shape == (*want.shape, 3)


def test_node_refuses_a_default_folder_in_one_line(consumer, png, onnx_dir, tmp_path):
    done = subprocess.run(["node", "segment.js", str(onnx_dir), str(png), str(tmp_path / "x.png")], cwd=consumer,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a fixed-vocabulary folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
