"""Export a segmenter to a verified ONNX model folder (SPEC 7) and prove the graphs equal torch.

- :mod:`.graph_form`: the segmenter's window model in the form that is traced (same formulas,
  layout fit for one dynamic-shape graph);
- :mod:`.graphs`: tracing the image and text graphs, checks on what the exporter wrote;
- :mod:`.verify`: onnxruntime against float32 torch on random and real windows;
- :mod:`.writer`: :func:`export_onnx`, the manifest, the atomic folder;
- :mod:`.main`: the command line (``export/to_onnx.py``).

The folder's format (names, manifest, checksums) is :mod:`simfeatup.model_folder`.
"""
import importlib

# Imported on first use, so that ``simfeatup.export.main`` (``--help``, missing-extra messages)
# works without the torch extra.
_LAZY = {
    "export_onnx": ".writer", "DTYPES": ".writer", "verify_onnx": ".verify",
    "OnnxExportError": ".graphs", "ImageGraph": ".graphs", "TextGraph": ".graphs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
