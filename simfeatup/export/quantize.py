"""The int8 export variant: the image tower's linear layers quantised after tracing (``--dtype int8``).

onnxruntime's dynamic quantisation (weights int8 per output channel, activations quantised per call)
restricted to the MatMul/Gemm nodes that the exporter placed under the encoder's module scope with a
constant weight: the ViT's qkv, out_proj, MLP and final projection. The upsampler, the scoring and
the text graph stay float32 (docs/method.md section 8), so only the ViT's features move.

The weights use 7 of int8's bits (|w| <= 64, onnxruntime's ``reduce_range``): a folder runs on
whatever CPU its user has, and on x86 CPUs without VNNI (AVX2, and AVX-512 before Cascade Lake)
onnxruntime's uint8 x int8 kernel sums pairs of products in int16, which full-range weights
overflow (255 * 127 * 2 > 32767). On such a CPU (AVX2) ViT-B/16's window labels agreed with
torch's at 62% with 8-bit weights and the folder's with fp32's at 99.3% with 7-bit ones (README
"Benchmarks"). Elsewhere the 7th bit only costs precision, which the export's label check bounds.
"""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ENCODER_SCOPE = "/segmenter.encoder"  # the dynamo exporter's namespace of the ImageGraph's encoder
QUANTISED_OPS = ("MatMul", "Gemm")


def encoder_linear_nodes(model) -> list[str]:
    """Names of the MatMul/Gemm nodes of an image graph that are the encoder's linear layers (constant weight)."""
    constants = {init.name for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in QUANTISED_OPS or len(node.input) < 2 or node.input[1] not in constants:
            continue
        scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if ENCODER_SCOPE in scope:
            names.append(node.name)
    return names


def quantize_image_graph(path: Path) -> dict:
    """Quantise the encoder's linear layers of the image graph at ``path`` in place; returns the record
    the manifest keeps under ``quantization``."""
    import onnx
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .graphs import OnnxExportError

    path = Path(path)
    nodes = encoder_linear_nodes(onnx.load(str(path), load_external_data=False))
    if not nodes:
        raise OnnxExportError(f"{path.name}: no encoder MatMul/Gemm node with a constant weight to quantise")
    staged = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(
        str(path), str(staged), op_types_to_quantize=list(QUANTISED_OPS), nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
    # the graph references its data file by name: write it again under the folder's usual names
    model = onnx.load(str(staged))
    for file in (path, path.with_name(path.name + ".data"), staged, staged.with_name(staged.name + ".data")):
        file.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    logger.info("int8: quantised %d linear layers of the image tower", len(nodes))
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8 in 7 bits (|w| <= 64: no int16 overflow on CPUs without VNNI), symmetric, per output channel",
        "reduce_range": True,  # read by simfeatup.model_folder: folders without it have 8-bit weights
        "activations": "uint8, dynamic (per call)",
        "scope": "image tower linear layers (qkv, out_proj, MLP, proj); upsampler, scoring, text graph float32",
        "nodes": len(nodes),
        "onnxruntime": ort_version,
    }
