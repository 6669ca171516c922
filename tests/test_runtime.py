"""The onnxruntime path as users run it: torch-free, same labels as torch, refuses corrupt folders."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simfeatup import imaging
from simfeatup.extras import TORCH_MODULES
from simfeatup.runtime import ModelFolderError, OnnxSegmenter, choose_providers
from simfeatup.scores import Scoring
from simfeatup.tokenizer import Tokenizer
from simfeatup.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def _labels_agree(a: np.ndarray, b: np.ndarray, probs: np.ndarray, prob_thd: float, tie: float = 1e-4):
    """Identical labels, except at float-level ties of the torch class probabilities: top-2 gap
    or distance of the top probability to the threshold below ``tie``."""
    top = np.sort(probs, axis=0)
    tie = ((top[-1] - top[-2]) < tie) | (np.abs(top[-1] - prob_thd) < tie)
    assert np.array_equal(a[~tie], b[~tie])
    assert (a != b).sum() <= 10 + a.size // 10_000  # ties are rare: the mask must not hide real disagreement


# ------------------------------------------------------------------ tokenizer
TEXTS = [
    "a photo of a building.", "Bâtiment, forêt & rivière", "ÉCOLE naïve café", "道路と建物", "森林",
    "🏠 house 🌳 tree 🇫🇷", "it's the road's edge", "  tabs\tand\nnewlines  ", "&amp; html &lt;b&gt;",
    "ﬁnancial ligature", "mojibake Ã©", "Ελληνικά", "русский", "مرحبا", "हिन्दी", "", "123 4567 8.9",
    "x" * 500, " ".join(["word"] * 100),
]


def test_tokenizer_gives_open_clips_ids():
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-16")
    mine = Tokenizer(open_clip.tokenizer.default_bpe())
    ids = mine(TEXTS)
    assert ids.dtype == np.int64 and ids.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(ids, ref(TEXTS).numpy())
    assert ids[-1, -1] == mine.eot and ids[-2, -1] == mine.eot  # truncated texts still end with end-of-text


def test_tokenizer_refuses_another_file(tmp_path):
    import gzip

    bad = tmp_path / "merges.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not CLIP's BPE merges"):
        Tokenizer(bad)


# ------------------------------------------------------------------ same labels as torch
def test_same_label_maps_as_torch_on_the_sample_images(artefacts, tiny_weights):
    from simfeatup.segmenter import build_segmenter
    from simfeatup.text import encode_queries

    path, onnx_dir = artefacts
    name, weights = tiny_weights
    torch_segmenter = build_segmenter(path, model=name, pretrained=str(weights))
    onnx_segmenter = OnnxSegmenter(onnx_dir, cache=False)
    vocabulary = Vocabulary.from_preset("openearthmap")
    text = encode_queries(torch_segmenter.encoder, vocabulary.queries, cache=False)
    np.testing.assert_allclose(onnx_segmenter.encode_queries(vocabulary.queries), text, atol=1e-5)
    images = [imaging.load_image(p) for p in SAMPLES]
    assert len(images) >= 2
    scoring = Scoring(lam=-0.3, prob_thd=0.1, bg_idx=0)
    refs = torch_segmenter.segment(images, vocabulary, scoring=scoring, text=text, return_probs=True)
    for ref, got, image in zip(
        refs, onnx_segmenter.segment(images, vocabulary, scoring=scoring, return_probs=True), images
    ):
        assert got.labels.shape == image.shape[:2] and got.labels.dtype == ref.labels.dtype
        assert np.abs(got.probs - ref.probs).max() < 1e-3
        _labels_agree(ref.labels, got.labels, ref.probs, scoring.prob_thd)


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_cli_segment_with_onnx_matches_the_torch_cli(artefacts, tiny_weights, tmp_path):
    from simfeatup.cli import main

    path, onnx_dir = artefacts
    name, weights = tiny_weights
    image = SAMPLES[-1]
    common = [str(image), "--preset", "udd5", "--save-probs"]
    assert main(["segment", *common, "--onnx", str(onnx_dir), "--out", str(tmp_path / "onnx")]) == 0
    assert (
        main(
            [
                "segment",
                *common,
                "--upsampler",
                str(path),
                "--model",
                name,
                "--pretrained",
                str(weights),
                "--out",
                str(tmp_path / "torch"),
            ]
        )
        == 0
    )
    got = np.asarray(Image.open(tmp_path / "onnx" / f"{image.stem}.png"))
    ref = np.asarray(Image.open(tmp_path / "torch" / f"{image.stem}.png"))
    probs = np.load(tmp_path / "torch" / f"{image.stem}_probs.npy").astype(np.float32)  # saved as float16
    _labels_agree(ref, got, probs, prob_thd=0.4, tie=1e-3)  # udd5: prob_thd 0.4


def test_manifest_records_the_upsampler_artefact(artefacts, tiny_weights):
    import json

    from simfeatup.model_folder import sha256

    path, onnx_dir = artefacts
    up = json.loads((onnx_dir / "manifest.json").read_text())["upsampler"]
    assert up["kind"] == "simfeatup" and up["file"] == path.name and up["sha256"] == sha256(path)
    assert (
        up["backbone"] == {"model": tiny_weights[0], "pretrained": str(tiny_weights[1])} and up["config"]["dim"] == 32
    )


def test_cli_rejects_torch_only_flags_with_onnx(onnx_dir, tmp_path, capsys):
    from simfeatup.cli import main

    common = ["segment", str(SAMPLES[0]), "--classes", "road;tree", "--onnx", str(onnx_dir), "--out", str(tmp_path)]
    for flags, message in (
        (["--model", "ViT-B-16"], "--model does not apply with --onnx"),
        (["--attention", "clearclip"], "--attention does not apply with --onnx"),
        (["--dtype", "float16"], "--dtype does not apply with --onnx: the precision was fixed at export"),
    ):
        assert main([*common, *flags]) == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------ no torch, bounded memory, caching
# The torch-free install as users have it: every module of the `torch` extra made unimportable (or,
# in CI, a separate venv with only `pip install ".[onnxruntime]"`, given as $SIMFEATUP_RUNTIME_PYTHON).
RUNTIME_PYTHON = os.environ.get("SIMFEATUP_RUNTIME_PYTHON", sys.executable)


def _run_without(blocked, argv, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        tried = set()

        class NotInstalled:  # `import name` raises ModuleNotFoundError, as if not installed, and is recorded
            def find_spec(self, name, path=None, target=None):
                top = name.partition(".")[0]
                if top in {sorted(blocked)!r}:
                    tried.add(top)
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        from simfeatup.cli import main
        code = main({argv!r})
        print("tried to import:", sorted(tried))
        sys.exit(code)
        """
    )
    env = {**os.environ, "SIMFEATUP_CACHE": str(tmp_path / "cache")}
    # cwd = the repository, so `simfeatup` is this checkout whatever the install looks like
    return subprocess.run(
        [RUNTIME_PYTHON, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # 5-8 s on a 2-core AVX2 machine: the default run stays under 5 min
def test_cli_segments_with_onnx_without_torch_installed(onnx_dir, tmp_path):
    from simfeatup.cli import main

    image = SAMPLES[0]
    common = ["segment", str(image), "--preset", "loveda", "--overlay"]
    done = _run_without(TORCH_MODULES, [*common, "--onnx", str(onnx_dir), "--out", str(tmp_path / "free")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tried to import: []" in done.stdout  # not even an import attempt caught by a try
    assert main([*common, "--onnx", str(onnx_dir), "--out", str(tmp_path / "here")]) == 0
    label_map = f"{image.stem}.png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "free" / label_map)), np.asarray(Image.open(tmp_path / "here" / label_map))
    )
    assert (tmp_path / "free" / f"{image.stem}_overlay.jpg").is_file()
    assert (tmp_path / "free" / "classes.json").read_text() == (tmp_path / "here" / "classes.json").read_text()


@pytest.mark.parametrize(
    "blocked, flags, needs",
    [
        (
            TORCH_MODULES,
            [],
            # the first module of the extra that the command imports (torch, or open_clip for the early checks)
            "segmenting with PyTorch (without --onnx) needs ",
        ),
        (
            ("onnxruntime",),
            ["--onnx", "MODEL"],
            "segment --onnx needs onnxruntime, which is not installed: "
            'pip install "simfeatup[onnxruntime]" (CPU) or "simfeatup[gpu]"',
        ),
    ],
    ids=["torch", "onnxruntime"],
)
def test_a_missing_extra_is_named_in_one_line(onnx_dir, tmp_path, blocked, flags, needs):
    flags = [str(onnx_dir) if f == "MODEL" else f for f in flags]
    done = _run_without(
        blocked,
        ["segment", str(SAMPLES[0]), "--classes", "road;tree", *flags, "--out", str(tmp_path / "out")],
        tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("simfeatup segment: error: " + needs), line
    assert ", which is not installed: pip install \"simfeatup[" in line, line


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_onnx_device_flag_picks_the_provider(onnx_dir, tmp_path, capsys, monkeypatch):
    import onnxruntime

    from simfeatup.cli import main
    from simfeatup.runtime import providers_for_device

    assert providers_for_device("auto") is None and providers_for_device("cpu") == ["CPUExecutionProvider"]
    assert providers_for_device("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        providers_for_device("mps")
    common = ["segment", str(SAMPLES[0]), "--classes", "road;tree", "--onnx", str(onnx_dir), "--out", str(tmp_path)]
    assert main([*common, "--device", "cpu"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])  # a CPU build
    assert main([*common, "--device", "cuda"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "['CUDAExecutionProvider'] are not available here" in line and "onnxruntime-gpu" in line


def test_corrupt_graph_is_refused_in_one_line_naming_the_file(onnx_dir, tmp_path):
    copy = Path(shutil.copytree(onnx_dir, tmp_path / "copy"))
    data = copy / "image.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the weights
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelFolderError) as err:
        OnnxSegmenter(copy)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert str(data) in message and "checksum" in message


def test_missing_folder_and_file_are_clear(onnx_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        OnnxSegmenter(tmp_path / "nowhere")
    copy = Path(shutil.copytree(onnx_dir, tmp_path / "copy"))
    (copy / "text.onnx").unlink()
    with pytest.raises(ModelFolderError, match="text.onnx: listed in manifest.json but missing"):
        OnnxSegmenter(copy)


def test_folders_of_another_format_version_or_other_constants_are_refused(onnx_dir, tmp_path):
    import json

    for change, message in (
        (lambda m: m.update(version=99), "format version 99, this simfeatup reads 2"),
        (lambda m: m["preprocessing"].update(mean=[0.5, 0.5, 0.5]), "preprocessing/scoring constants"),
        (lambda m: m.update(logit_scale=100.0), "preprocessing/scoring constants"),
        (lambda m: m["preprocessing"].update(patch=0), "preprocessing.patch is 0, not a positive whole number"),
        (lambda m: m["preprocessing"].update(window="224"), "preprocessing.window is '224'"),
        (lambda m: m["preprocessing"].update(window=200), "window 200 / stride 112 / patch 16 are inconsistent"),
        (lambda m: m["preprocessing"].update(stride=300), "inconsistent"),
        (lambda m: m.update(default_lambda=None), "default_lambda is None, not a number"),
        (lambda m: m.pop("tokenizer"), "tokenizer section missing"),
        (lambda m: m.update(default_lambda=float("inf")), "default_lambda is inf, not a number"),
        (lambda m: m.update(embed_dim=True), "embed_dim is True, not a positive whole number"),
        (lambda m: m["tokenizer"].update(context_length=0), "tokenizer section missing or incomplete"),
        (lambda m: m["files"].pop("text.onnx"), r"\['text.onnx'\] not in its files section"),
        (lambda m: m["files"].update({"../x": "0" * 64}), "files section missing or not"),
        # valid values, but not those the graphs were verified with: the manifest's own checksum refuses them
        (lambda m: m["preprocessing"].update(window=448), "edited after export .* re-export the model folder"),
        (lambda m: m["preprocessing"].update(stride=56), "edited after export"),
        (lambda m: m.update(default_lambda=0.0), "edited after export"),
    ):
        copy = Path(shutil.copytree(onnx_dir, tmp_path / message[:6].replace(" ", "_") / str(id(change))))
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelFolderError, match=message):
            OnnxSegmenter(copy)


def test_a_manifest_that_does_not_belong_to_its_graphs_is_refused(onnx_dir, tmp_path):
    """Even with its checksum recomputed, a manifest must agree with the graphs' own inputs and outputs."""
    import json

    from simfeatup.model_folder import write_manifest

    for change, message in (
        (lambda m: m.update(embed_dim=m["embed_dim"] + 1), "image graph's text has shape"),
        (lambda m: m["tokenizer"].update(context_length=76), "text graph's tokens has shape"),
    ):
        copy = Path(shutil.copytree(onnx_dir, tmp_path / str(id(change))))
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        write_manifest(copy, manifest)
        with pytest.raises(ModelFolderError, match=message) as err:
            OnnxSegmenter(copy)
        assert "re-export the model folder" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_windows_go_through_the_graph_in_fixed_size_batches(onnx_dir, monkeypatch):
    segmenter = OnnxSegmenter(onnx_dir, window_batch=2, cache=False)
    sizes = []
    run = segmenter.window_logits
    monkeypatch.setattr(segmenter, "window_logits", lambda windows, *a: sizes.append(len(windows)) or run(windows, *a))
    image = np.random.default_rng(1).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    segmenter.segment([image], Vocabulary.from_spec("road;tree"))
    assert sizes == [2, 2, 2, 2, 1]  # 3 x 3 windows, never more than 2 at once


def test_query_embeddings_are_cached_by_text_graph_checksum(onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMFEATUP_CACHE", str(tmp_path))
    first = OnnxSegmenter(onnx_dir).encode_queries(["road", "forêt"])
    second = OnnxSegmenter(onnx_dir)
    monkeypatch.setattr(second, "encode_texts", lambda texts: pytest.fail("should have come from the cache"))
    np.testing.assert_array_equal(second.encode_queries(["road", "forêt"]), first)
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-6)


def test_providers_fall_back_to_cpu_and_unknown_ones_are_refused(monkeypatch):
    assert choose_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        choose_providers(["NoSuchExecutionProvider"])
    monkeypatch.setenv("SIMFEATUP_ORT_PROVIDERS", "NoSuchExecutionProvider, CPUExecutionProvider")
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        choose_providers()


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_threads_flag_reaches_onnxruntime_and_torch(artefacts, tmp_path, monkeypatch):
    """--threads N: onnxruntime sessions get N intra-op threads, the torch path torch.set_num_threads(N);
    0 or a non-number is refused by argparse."""
    import onnxruntime
    import torch

    from simfeatup.cli import main

    path, onnx_dir = artefacts
    seen = []
    real = onnxruntime.InferenceSession

    def recording(path, options=None, **kwargs):
        seen.append(options.intra_op_num_threads)
        return real(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    common = ["segment", str(SAMPLES[0]), "--classes", "road;tree", "--out", str(tmp_path)]
    assert main([*common, "--onnx", str(onnx_dir), "--threads", "1"]) == 0
    assert seen and set(seen) == {1}  # the image and the text graph
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # the pytest process keeps its own count
    assert main([*common, "--upsampler", str(path), "--device", "cpu", "--threads", "2"]) == 0
    assert threads == [2]
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as exit_:
            main([*common, "--onnx", str(onnx_dir), "--threads", bad])
        assert exit_.value.code == 2
