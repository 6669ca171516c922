"""Shared fixtures: tiny randomly initialised open_clip models, offline, CPU, caches in a temporary folder."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# commands run in-process here (cli.main, fit, to_onnx) would change the pytest process's malloc
# settings for every later test (simfeatup.allocator); tests/test_allocator.py checks them in subprocesses
os.environ["SIMFEATUP_KEEP_FREED_MEMORY"] = "0"

# Where the user's caches are (what tests must never write into), then every cache simfeatup and
# its libraries use pointed at a folder of this session, before any of them is imported (the Hugging
# Face hub reads its variables at import). Subprocesses of the tests inherit them.
USER_CACHES = {
    "simfeatup": Path(os.environ.get("SIMFEATUP_CACHE") or Path.home() / ".cache" / "simfeatup"),
    "huggingface": Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                        / "huggingface"),
}
TEST_CACHE = Path(tempfile.mkdtemp(prefix="simfeatup-test-cache-"))
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
for variable, folder in (
    ("XDG_CACHE_HOME", TEST_CACHE),  # the default root of the ones below
    ("SIMFEATUP_CACHE", TEST_CACHE / "simfeatup"),  # simfeatup.cache: text embeddings
    ("HF_HOME", TEST_CACHE / "huggingface"),  # open_clip's weights downloads (huggingface_hub)
    ("HF_HUB_CACHE", TEST_CACHE / "huggingface" / "hub"),
    ("TORCH_HOME", TEST_CACHE / "torch"),  # torch.hub
):
    os.environ[variable] = str(folder)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)  # an older spelling that would win over HF_HUB_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

# A 2-block ViT-B/16-shaped CLIP (patch 16, 224 input, 14x14 grid) small enough for CPU tests.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def tiny_clip_cfg():
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_CLIP.items()}


TINY_NAME = "simfeatup-tiny-test"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The tiny config registered as an open_clip model + a weights file for it.

    Lets tests go through the real user path (`--model NAME --pretrained FILE`).
    """
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return TINY_NAME, weights


# the session's one export, run as users run the script, in a process of its own: the tiny model's
# name is registered with open_clip there first
_EXPORT = ("import runpy, sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
           "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


_EXPORT_NEEDED = pytest.StashKey[bool]()


@pytest.fixture(scope="session", autouse=True)
def _export_started(request, tmp_path_factory):
    """A SimFeatUp artefact for the registered tiny model, and its ONNX export started at the first test.

    The export (~2 minutes of tracing and optimising on 2 cores) runs in a subprocess while the
    test modules that do not need it run (pytest_collection_modifyitems puts those first);
    :func:`artefacts` waits for it. Not started when no collected test needs it."""
    import subprocess
    import sys

    from simfeatup.upsampler import SimFeatUp, save_upsampler

    if not request.config.stash.get(_EXPORT_NEEDED, False):
        yield None
        return
    name, weights = request.getfixturevalue("tiny_weights")
    folder = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(5)
    up = SimFeatUp(32, 16)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = folder / "upsampler.safetensors"
    save_upsampler(up, path, backbone={"model": name, "pretrained": str(weights)})
    out = folder / "onnx"
    argv = ["--upsampler", str(path), "--model", name, "--pretrained", str(weights), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tracing is one thread's work; leave the other core to tests
    log = folder / "export.log"  # a file, not a pipe: nobody reads until a test needs the export
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", _EXPORT, str(weights.parent), str(REPO / "export" / "to_onnx.py"), *argv],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
    yield path, out, process, log
    if process.poll() is None:  # a run that never needed it
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def artefacts(_export_started):
    """A SimFeatUp artefact for the registered tiny model, and its verified ONNX export."""
    path, out, process, log = _export_started
    assert process.wait() == 0, f"export/to_onnx.py failed:\n{log.read_text()[-4000:]}"
    return path, out


def pytest_collection_modifyitems(config, items):
    """Test modules that use the session's export run after the others (stable order otherwise),
    so the export started with the first test overlaps them; a module is never split."""
    users = {item.module.__name__ for item in items if "artefacts" in item.fixturenames and hasattr(item, "module")}
    config.stash[_EXPORT_NEEDED] = bool(users)
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", None) in users)


@pytest.fixture(scope="session")
def onnx_dir(artefacts):
    return artefacts[1]


@pytest.fixture(scope="session")
def fixed_dirs(artefacts, tiny_weights, tmp_path_factory):
    """Fixed-vocabulary folders (OpenEarthMap preset) derived from the session's export, no second
    trace: {"float32": folder, "uint8": folder with --uint8-input}."""
    from simfeatup import presets
    from simfeatup.export.fixed import derive_fixed
    from simfeatup.scores import Scoring
    from simfeatup.segmenter import build_segmenter
    from simfeatup.vocabulary import Vocabulary

    path, onnx_dir = artefacts
    name, weights = tiny_weights
    segmenter = build_segmenter(path, model=name, pretrained=str(weights)).eval()
    preset = presets.load("openearthmap")
    folder = tmp_path_factory.mktemp("fixed")
    return {
        kind: derive_fixed(onnx_dir, folder / kind, segmenter, Vocabulary.from_lines(preset.classes),
                           Scoring.resolve(preset), preset="openearthmap", uint8_input=kind == "uint8",
                           samples=[REPO / "samples" / "spacenet6_rotterdam.jpg"])
        for kind in ("float32", "uint8")
    }


REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "configs" / "train" / "tiny.yaml"


def load_script(path: str):
    """A script of the checkout (train/fit.py, export/to_onnx.py) as a module, loaded as it runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_fit():
    return load_script("train/fit.py")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The session's one training run: the tiny recipe for 2 steps, started as a user would, from a
    folder outside the checkout with the recipe's own (bundled) shards and the default logger.

    Returns (run folder, simfeatup's log records as text, the warnings raised, whether the
    process's warning filters were the same after the run).
    """
    import logging
    import sys
    import warnings

    import lightning.pytorch  # noqa: F401 -- Lightning adds its own filters when first imported; ours must not stay

    fit = load_fit()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    run = elsewhere / "run"
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("simfeatup")
    log.addHandler(handler)
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(elsewhere)
    sys.argv = ["train/fit.py"]  # pytest's own flags must not look like extra arguments
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filters = list(warnings.filters)
            code = fit.main(
                ["--config", str(TINY_RECIPE), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
                 "--trainer.enable_progress_bar", "false"]
            )
            same_filters = warnings.filters == filters
    finally:
        os.chdir(cwd)
        sys.argv = argv
        log.removeHandler(handler)
    assert code == 0
    return run, "\n".join(records), caught, same_filters
