"""The model folder's self-description (docs/model-folder.md): graph metadata, format versions, static fields."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from simfeatup.folder_segmenter import run_in_chunks
from simfeatup.model_folder import (
    METADATA_FIELDS,
    METADATA_PREFIX,
    ModelFolderError,
    graph_metadata,
    read_manifest,
    sha256,
    write_manifest,
)
from simfeatup.runtime import OnnxSegmenter


def test_each_graph_describes_itself_as_its_manifest_does(onnx_dir):
    import onnxruntime as ort

    manifest = read_manifest(onnx_dir)
    for graph in ("image", "text"):
        path = onnx_dir / manifest["graphs"][graph]["file"]
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        assert {k: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)} == graph_metadata(manifest, graph)
        assert json.loads(meta["simfeatup.window"]) == manifest["preprocessing"]["window"] == 224
        assert json.loads(meta["simfeatup.mean"]) == manifest["preprocessing"]["mean"]
        assert json.loads(meta["simfeatup.model"]) == manifest["model"]
        assert json.loads(meta["simfeatup.graph"]) == graph
    # a dynamic default folder has no static entry nor a fixed vocabulary's; every other field is there
    assert set(graph_metadata(manifest, "image")) == {METADATA_PREFIX + k for k in (*METADATA_FIELDS, "graph")} - {
        "simfeatup.static", "simfeatup.vocabulary", "simfeatup.image_input"
    }


def _with_graph_metadata(folder: Path, name: str, change: dict) -> None:
    """Rewrite one graph's metadata (weights untouched) and re-sign the manifest, as a careless tool would."""
    path = folder / name
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**props, **change})
    onnx.save(model, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256(path)
    write_manifest(folder, manifest)


def test_graph_metadata_that_disagrees_with_the_manifest_is_refused_in_one_line(onnx_dir, tmp_path):
    for name, change, expected in (
        ("image.onnx", {"simfeatup.window": "448"}, "image graph's metadata simfeatup.window is 448, the manifest"),
        ("text.onnx", {"simfeatup.graph": '"image"'}, "text graph's metadata simfeatup.graph"),
        ("image.onnx", {"simfeatup.extra": "1"}, "simfeatup.extra is 1, the manifest says None"),
    ):
        copy = Path(shutil.copytree(onnx_dir, tmp_path / str(len(list(tmp_path.iterdir())))))
        _with_graph_metadata(copy, name, change)
        with pytest.raises(ModelFolderError, match=expected) as err:
            OnnxSegmenter(copy, cache=False)
        assert "re-export the model folder" in str(err.value) and "\n" not in str(err.value)
    # keys of the user's own (no simfeatup. prefix) are left alone
    copy = Path(shutil.copytree(onnx_dir, tmp_path / "own"))
    _with_graph_metadata(copy, "image.onnx", {"owner": "me"})
    OnnxSegmenter(copy, cache=False)


def test_a_version_2_folder_is_still_read_and_a_bad_static_section_is_refused(onnx_dir, tmp_path):
    copy = Path(shutil.copytree(onnx_dir, tmp_path / "v2"))
    manifest = json.loads((copy / "manifest.json").read_text())
    for key in ("static", "docs"):
        manifest.pop(key)
    manifest["version"] = 2
    write_manifest(copy, manifest)
    _with_graph_metadata(copy, "image.onnx", {"simfeatup.window": "448"})  # v2 graphs carry none: not checked
    assert OnnxSegmenter(copy, cache=False).static is None
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    manifest["static"] = {"window_batch": 0, "queries": 4, "text_batch": 16}
    bad = Path(shutil.copytree(onnx_dir, tmp_path / "bad"))
    write_manifest(bad, manifest)
    with pytest.raises(ModelFolderError, match="static is .* not {window_batch, queries, text_batch"):
        read_manifest(bad)


def test_run_in_chunks_pads_to_the_static_size_and_drops_the_padding():
    calls = []

    def graph(x):  # a "static" graph: rows in, (1, rows, 2) out; each row on its own
        assert len(x) == 4
        calls.append(x.copy())
        return np.stack([x * 2, x + 1], axis=-1)[None]

    x = np.arange(10.0)
    out = run_in_chunks(graph, x, 4, out_axis=1)
    np.testing.assert_array_equal(out, np.stack([x * 2, x + 1], axis=-1)[None])
    assert len(calls) == 3 and list(calls[-1]) == [8.0, 9.0, 9.0, 9.0]  # the last piece repeats its last row


def test_an_int8_folder_with_8_bit_weights_is_warned_about(onnx_dir, tmp_path, caplog):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    old = {"method": "onnxruntime.quantization.quantize_dynamic", "nodes": 7}  # what folders before 7 bits said
    for quantization, warned in ((old, True), ({**old, "reduce_range": True}, False)):
        folder = Path(shutil.copytree(onnx_dir, tmp_path / str(warned)))
        write_manifest(folder, {**manifest, "dtype": "int8", "quantization": quantization})
        caplog.clear()
        with caplog.at_level("WARNING", logger="simfeatup"):
            read_manifest(folder)
        assert ("full 8-bit weights" in caplog.text and "re-export it" in caplog.text) == warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="simfeatup"):
        read_manifest(onnx_dir)  # float32 folders say nothing
    assert not caplog.records


def test_a_graph_file_given_for_the_folder_names_the_folder(tmp_path):
    from simfeatup.model_folder import ModelFolderError, read_manifest

    folder = tmp_path / "model_onnx"
    folder.mkdir()
    (folder / "image.onnx").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match=f"image.onnx is a file: give the model folder .*\\(--onnx {folder}\\)"):
        read_manifest(folder / "image.onnx")
