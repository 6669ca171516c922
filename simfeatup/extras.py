"""Which optional install provides which module, and the one-line advice when one is missing.

``pip install simfeatup`` is the torch-free runtime: segmenting an exported model folder with
onnxruntime. The extras add the rest (keep in step with pyproject.toml):

- ``simfeatup[onnxruntime]`` (CPU) or ``simfeatup[gpu]`` (``onnxruntime-gpu``; never both),
- ``simfeatup[torch]``: PyTorch, open_clip and Lightning for the torch segmenter, training,
  weight conversion and export.
- ``simfeatup[geo]``: rasterio (and friends) for georeferenced scenes (scene mode, SPEC 9).
- ``simfeatup[openvino]``: OpenVINO, the other runtime of a model folder (``--runtime openvino``).
"""
from __future__ import annotations

TORCH_MODULES = (
    "torch", "torchvision", "open_clip", "lightning", "jsonargparse", "kornia", "webdataset",
    "onnx", "onnxscript", "safetensors", "tensorboard", "huggingface_hub",
)
TORCH_ADVICE = 'pip install "simfeatup[torch]" (in a checkout: pip install -c constraints.txt -e ".[torch]")'
GEO_MODULES = ("rasterio", "rio_cogeo", "pyogrio", "shapely")
ADVICE = {
    **{module: TORCH_ADVICE for module in TORCH_MODULES},
    "onnxruntime": 'pip install "simfeatup[onnxruntime]" (CPU) or "simfeatup[gpu]" (onnxruntime-gpu), not both',
    **{module: 'pip install "simfeatup[geo]"' for module in GEO_MODULES},
    "openvino": 'pip install "simfeatup[openvino]"',
}


def missing_extra(err: ModuleNotFoundError, what: str) -> str | None:
    """One line for a package that an extra installs (``what`` needs it), else None.

    None also for a missing submodule of an installed package (``torch._C``): a broken
    install, not a missing extra, and its traceback is the useful report.
    """
    top = (err.name or "").split(".")[0]
    if top not in ADVICE or err.name != top:
        return None
    return f"{what} needs {top}, which is not installed: {ADVICE[top]}"
