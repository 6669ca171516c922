"""Segmentation with OpenVINO and a model folder from :func:`simfeatup.export.export_onnx` (``--runtime openvino``).

OpenVINO reads the folder's ONNX graphs itself; everything else (manifest, tokenizer, cache, feeds,
pixel rules) is :class:`simfeatup.folder_segmenter.FolderSegmenter`, as for onnxruntime. Never
imports torch (nor onnxruntime).

Precision: OpenVINO's CPU plugin runs bf16 by default where the CPU has bf16 units (AMX, or
AVX512-BF16 as on AMD Zen 4), so f32 is asked for explicitly unless bf16 is chosen. bf16 reaches the
image graph only: the text graph stays f32, so the embeddings (and the cache keyed by the text
graph) are the same as onnxruntime's.
"""
from __future__ import annotations

import logging

import numpy as np
import openvino as ov

from .folder_segmenter import FolderSegmenter
from .model_folder import ModelFolderError

logger = logging.getLogger(__name__)

PRECISIONS = {"f32": "f32", "bf16": "bf16"}  # --precision -> INFERENCE_PRECISION_HINT
DEVICES = {"auto": "CPU", "cpu": "CPU"}  # --device -> OpenVINO device (the CPU plugin is the one tested)
# Threads per image-graph call (None: OpenVINO's choice, all cores). OpenVINO 2026.4's CPU plugin, on more than
# one thread, miscomputed the last JBU step's tile Gather of the padded kernels in full 224x224 windows (logits
# off by ~0.5), so this was 1 until the graph form folded the bicubic resize into its filter: that Gather is
# gone: a ViT-B/16 folder's probabilities match onnxruntime's within 5e-7 on the bundled 448 px sample (9 full
# windows) on 2, 4 and 8 threads (INFERENCE_NUM_THREADS, on a 2-core machine), and 2 threads ran 1.7x faster
# than one. tests/test_openvino_runtime.py checks the parity at 224x224 with this default.
IMAGE_GRAPH_THREADS = None


def openvino_device(device: str) -> str:
    """``--device`` for OpenVINO: auto or cpu (the CPU plugin)."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not supported with --runtime openvino: use auto or cpu")
    return DEVICES[device]


def bf16_problem(core, device: str = "CPU") -> str | None:
    """Why OpenVINO cannot run the image graph in bf16 on ``device`` (its capabilities lack BF16), or None."""
    capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    if "BF16" in capabilities:
        return None
    listed = ", ".join(capabilities)
    return f"this {device} has no bf16 support in OpenVINO (capabilities: {listed}): use --precision f32"


class OpenVinoSegmenter(FolderSegmenter):
    """Sliding-window segmentation (SPEC 2) with the exported graphs compiled by OpenVINO.

    ``precision``: "f32" (default; matches onnxruntime within 1e-4) or "bf16" (the image graph
    only; needs a CPU that OpenVINO reports BF16 for). ``device``: an OpenVINO device name.
    ``threads``: CPU threads per graph call (None: OpenVINO's choice; see :data:`IMAGE_GRAPH_THREADS`).
    ``window_batch``, ``cache``: see :class:`~simfeatup.folder_segmenter.FolderSegmenter`.
    """

    runtime = "openvino"

    def __init__(
        self, model_dir, *, precision: str = "f32", device: str = "CPU", threads: int | None = IMAGE_GRAPH_THREADS,
        window_batch: int = 1, cache=True,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
        self.core = ov.Core()
        self.device, self.precision, self.threads = device, precision, threads
        problem = bf16_problem(self.core, device) if precision == "bf16" else None
        if problem:
            raise ValueError(problem)
        super().__init__(model_dir, window_batch=window_batch, cache=cache)
        logger.info("openvino %s on %s, image graph in %s", ov.get_version(), device, precision)

    def _load(self, name: str, graph: str):
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[self.precision] if graph == "image" else "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            model = self.core.read_model(str(self.model_dir / name))
            # the ONNX metadata_props, which OpenVINO keeps as the model's rt_info "framework" section
            framework = model.get_rt_info(["framework"]).astype(dict) if model.has_rt_info(["framework"]) else {}
            self._graph_metadata = {**getattr(self, "_graph_metadata", {}),
                                    graph: {k: v.astype(str) for k, v in framework.items()}}
            return self.core.compile_model(model, self.device, config)
        except RuntimeError as err:  # OpenVINO reports every load failure as a RuntimeError
            raise ModelFolderError(
                f"{self.model_dir / name}: OpenVINO cannot load it ({str(err).strip().splitlines()[0]})"
            ) from None

    def _run(self, graph, feeds: dict) -> np.ndarray:
        # a compiled model's own call keeps one infer request; its output is copied (the buffer is reused)
        return np.array(graph(feeds)[graph.output(0)], np.float32, copy=True)

    def _io_shapes(self) -> tuple[dict, dict, dict]:
        def shapes(ports) -> dict:
            return {
                port.get_any_name(): [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
                for port in ports
            }

        return shapes(self.image_graph.inputs), shapes(self.text_graph.inputs), shapes(self.text_graph.outputs)

    def _metadata(self, graph: str) -> dict:
        return self._graph_metadata[graph]

    def describe(self) -> dict:
        openvino = {"precision": self.precision, "threads": self.threads, "openvino": ov.get_version()}
        return {**super().describe(), **openvino}
