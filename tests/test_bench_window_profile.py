"""bench/window_profile.py: multiply-adds from onnxruntime's profile, parts from the nodes' source locations."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import load_script


def _bench():
    return load_script("bench/window_profile.py")


def test_macs_of_products_plain_and_transposed_and_of_convolutions():
    macs = _bench().macs
    assert macs("MatMul", [[2, 3, 4], [4, 5]], [2, 3, 5]) == 2 * 3 * 5 * 4
    assert macs("Gemm", [[3, 4], [5, 4]], [3, 5]) == 3 * 5 * 4  # B transposed
    assert macs("FusedMatMul", [[4, 3], [4, 5]], [3, 5]) == 3 * 5 * 4  # A transposed
    assert macs("MatMul", [[4], [4, 5]], [5]) == 5 * 4
    assert macs("Conv", [[1, 3, 32, 32], [8, 3, 16, 16]], [1, 8, 2, 2]) == 8 * 2 * 2 * 3 * 16 * 16
    # x^T x (A transposed, M == N != K): the contracted length is the 512 channels
    assert macs("FusedMatMul", [[1, 512, 196], [1, 512, 196]], [1, 196, 196]) == 196 * 196 * 512
    assert macs("Gather", [[10, 4], [3]], [3, 4]) == 0
    assert macs("MatMul", [[2, 3, 4], []], [2, 3, 5]) is None  # an input nobody recorded: not a guess
    with pytest.raises(ValueError, match="no product of"):
        macs("MatMul", [[2, 3, 4], [6, 5]], [2, 3, 5])


def _where(node, namespace: str):
    node.metadata_props.add(key="namespace", value=namespace)
    return node


def test_a_profiled_graph_is_split_into_encoder_and_rest_with_prepacked_weights_counted(tmp_path):
    """A 'patch embedding' conv in the encoder, then a MatMul by a transposed weight: onnxruntime fuses
    the Transpose before the product, folds the weight's Transpose into a constant and pre-packs it,
    and its profile then omits it. Both products are counted exactly and land in their parts."""
    rng = np.random.default_rng(0)
    nodes = [
        _where(helper.make_node("Conv", ["windows", "patch"], ["tokens"], strides=[16, 16], name="conv"),
               "ImageGraph/segmenter.encoder: DenseCLIP/conv"),
        helper.make_node("Reshape", ["tokens", "flat"], ["grid"], name="reshape"),
        helper.make_node("Transpose", ["grid"], ["rows"], perm=[0, 2, 1], name="transpose"),
        helper.make_node("Transpose", ["proj_t"], ["proj"], perm=[1, 0], name="weight_t"),
        _where(helper.make_node("MatMul", ["rows", "proj"], ["scores"], name="matmul"), "ImageGraph/matmul"),
        _where(helper.make_node("Mul", ["scores", "lam"], ["logits"], name="mul"), "ImageGraph/mul"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 16, 16)).astype(np.float32), "patch"),
             numpy_helper.from_array(np.array([1, 8, -1], np.int64), "flat"),
             numpy_helper.from_array(rng.standard_normal((14, 8)).astype(np.float32), "proj_t")]
    inputs = [helper.make_tensor_value_info("windows", TensorProto.FLOAT, [1, 3, 224, 224]),
              helper.make_tensor_value_info("text", TensorProto.FLOAT, [14, 8]),
              helper.make_tensor_value_info("lam", TensorProto.FLOAT, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "image", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "image.onnx")

    bench = _bench()
    nodes = bench.profile_window(tmp_path, threads=1, repeats=2)
    # onnxruntime fuses the Transpose into the product: "matmul/MatmulTransposeFusion/", A transposed
    by_name = {n["name"].split("/")[0]: n for n in nodes}
    assert by_name["conv"]["macs"] == 8 * 14 * 14 * 3 * 16 * 16 and by_name["conv"]["part"] == "encoder"
    assert by_name["matmul"]["macs"] == 196 * 14 * 8 and by_name["matmul"]["part"] == "rest"
    assert by_name["reshape"]["part"] == "encoder"  # no source location: the part of the node run before it
    sums = bench.summary(nodes)
    assert sums["encoder"]["gmac"] * 1e9 == pytest.approx(8 * 14 * 14 * 3 * 16 * 16)
    assert sums["all"]["gmac"] * 1e9 == pytest.approx(8 * 14 * 14 * 3 * 16 * 16 + 196 * 14 * 8)
    assert sums["all"]["ms"] == pytest.approx(sum(n["ms"] for n in nodes))


def test_the_floor_adds_the_extra_products_at_the_encoders_rate():
    sim = {"encoder": {"gmac": 10.0, "matmul_ms": 100.0, "ms": 110.0}, "all": {"gmac": 14.0, "ms": 300.0}}
    bil = {"all": {"gmac": 10.0, "ms": 120.0}}
    # 4 extra GMAC at 100 GMAC/s = 40 ms on a 120 ms bilinear window
    assert _bench().floor_ratio(sim, bil) == pytest.approx(1 + 40 / 120)
