"""Where onnxruntime spends one window, and SimFeatUp on / bilinear with its products at the encoder's rate.

    python bench/window_profile.py                          # exports random ViT-B/16 folders (~3 min)
    python bench/window_profile.py --keep /tmp/e2e_folders   # the folders of bench/e2e.py --keep, reused
    python bench/window_profile.py --keep DIR --threads 1 --repeats 5 --top 15

Profiles the image graph of the fp32 SimFeatUp folder and of the bilinear folder (random
ViT-B/16 weights, exported as ``bench/e2e.py`` does) on one 224 x 224 window with onnxruntime's
own profiler, and splits each graph's node time into the encoder and the rest (upsampler and
scoring). For every matrix product (MatMul, FusedMatMul, Gemm, Conv) it counts the
multiply-adds from the shapes the profiler recorded (constants it leaves out, such as
pre-packed weights, from the graph file), so each part gets its achieved GMAC/s. Einsum nodes
(a few million multiply-adds in these graphs) are not counted; their time is listed with the
other ops.

The floor: what SimFeatUp on / bilinear per window would be if every extra matrix product ran
at the encoder's average rate, ``1 + (MACs(SimFeatUp graph) - MACs(bilinear graph)) / rate /
time(bilinear window)``, with everything else the upsampler does (gathers, softmax, GELU,
elementwise passes) taking no time. It is an estimate of what this graph form could reach on
this machine, not a bound: a product may run faster than the encoder's average, and another
formulation may need fewer multiply-adds. Issue 10 asks for 1.5 on the whole image.

Node times are medians over --repeats profiled calls after one warm-up; onnxruntime runs the
nodes one after another (its sequential executor), each on --threads threads. Nodes that graph
fusions created without a source location are counted in the part of the node run before them.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

ENCODER = "segmenter.encoder"  # the module path of the image tower in the exported nodes' metadata
PRODUCTS = ("MatMul", "FusedMatMul", "Gemm", "Conv")  # the ops whose multiply-adds are counted


def contracted(a: list[int], b: list[int], out: list[int]) -> int:
    """The contracted length of a product of A (shape a) by B (shape b), either of them possibly
    transposed (onnxruntime fuses Transposes into FusedMatMul and Gemm), whose result has shape out.

    Every transposition that fits the output gives the same length (when two fit, the axes they
    disagree on are equal), so the first that fits is the answer.
    """
    if len(a) == 1 or len(b) == 1:
        return a[0] if len(a) == 1 else b[0]
    for k, m in ((a[-1], a[-2]), (a[-2], a[-1])):
        for kb, n in ((b[-2], b[-1]), (b[-1], b[-2])):
            if k == kb and (m, n) == tuple(out[-2:]):
                return k
    raise ValueError(f"no product of {a} by {b}, transposed or not, has shape {out}")


def macs(op: str, inputs: list[list[int]], output: list[int]) -> int | None:
    """Multiply-adds of one node from its input and output shapes: 0 for ops that are no matrix
    product, None for a product whose inputs are not all known.

    MatMul/FusedMatMul/Gemm: output elements times the contracted length (:func:`contracted`).
    Conv: output elements times the weight's per-output-channel size.
    """
    if op not in PRODUCTS:
        return 0
    if len(inputs) < 2 or not all(inputs[:2]):
        return None
    if op == "Conv":
        return math.prod(output) * math.prod(inputs[1][1:])
    return math.prod(output) * contracted(inputs[0], inputs[1], output)


def _shapes(typed: list[dict] | None) -> list[list[int]]:
    """onnxruntime's [{'float': [1, 2]}, ...] -> [[1, 2], ...]."""
    return [next(iter(t.values())) for t in typed or []]


def node_info(model_path: Path) -> dict[str, tuple[str, list]]:
    """{node name: (part, constant inputs' shapes)}: part 'encoder' or 'rest' from the exported
    nodes' source locations (metadata), '' without one; per input, its shape when it is a
    constant (a weight, or computed from weights only, e.g. a transposed weight), else None.

    onnxruntime folds such constants and pre-packs the weights of products, and its profile then
    leaves them out, so their shapes come from the graph file (ONNX shape inference)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    graph = model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    constant = {t.name for t in graph.initializer}
    info = {}
    for node in graph.node:  # topologically ordered
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input if i)):
            constant.update(node.output)
        where = " ".join(p.value for p in node.metadata_props)
        part = "encoder" if ENCODER in where else ("rest" if where else "")
        info[node.name] = (part, [shapes.get(i) if i in constant else None for i in node.input])
    return info


def profile_window(model_dir: Path, threads: int | None, repeats: int, window: int = 224) -> list[dict]:
    """Per node, in execution order: {name, op, part, ms (median over repeats), macs (None: a product
    whose inputs could not be found or do not fit its output), shape (of its first output)} for one
    window."""
    import numpy as np
    import onnxruntime as ort

    from simfeatup.runtime import session_options

    path = model_dir / "image.onnx"
    info = node_info(path)
    options = session_options()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "simfeatup_window_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dims = {i.name: i.shape for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    text = rng.standard_normal((14, dims["text"][-1])).astype(np.float32)
    feeds = {"windows": rng.standard_normal((1, 3, window, window)).astype(np.float32),
             "text": text / np.linalg.norm(text, axis=1, keepdims=True), "lam": np.asarray(-0.3, np.float32)}
    feeds = {name: feeds[name] for name in dims}
    for _ in range(repeats + 1):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    durations, first = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < starts[1]:
            continue  # the warm-up call is left out
        name = e["name"][: -len("_kernel_time")]
        durations[name].append(e["dur"] / 1e3)
        if name not in first:
            args = e["args"]
            # fused nodes are named after the node they replaced ("node_MatMul_7/MatMulScaleFusion/"), with
            # its inputs in the same places, or not at all
            part, constants = info.get(name.split("/")[0], ("", []))
            inputs = _shapes(args.get("input_type_shape"))
            if len(inputs) < len(constants):  # some constants left out: theirs from the graph, the rest in order
                listed = iter(inputs)
                inputs = [shape if shape is not None else next(listed, None) for shape in constants]
            output = (_shapes(args.get("output_type_shape")) or [[0]])[0]
            try:
                count = macs(args["op_name"], inputs, output)
            except ValueError:  # shapes that fit no product: reported with the unresolved ones
                count = None
            first[name] = {"name": name, "op": args["op_name"], "ts": e["ts"], "shape": output, "source_part": part,
                           "macs": count}
    nodes = sorted(first.values(), key=lambda n: n["ts"])
    part = "encoder"
    for node in nodes:
        part = node.pop("source_part") or part  # no source location: the part of the node run before it
        node["part"], node["ms"] = part, statistics.median(durations[node["name"]])
    return nodes


def summary(nodes: list[dict]) -> dict[str, dict]:
    """{part: {ms, gmac, matmul_ms}} and 'all'."""
    out = collections.defaultdict(lambda: {"ms": 0.0, "gmac": 0.0, "matmul_ms": 0.0})
    for node in nodes:
        for key in (node["part"], "all"):
            out[key]["ms"] += node["ms"]
            out[key]["gmac"] += (node["macs"] or 0) / 1e9
            out[key]["matmul_ms"] += node["ms"] if node["macs"] else 0.0
    return dict(out)


def floor_ratio(sim: dict, bil: dict) -> float:
    """SimFeatUp on / bilinear per window if the extra multiply-adds ran at the encoder's rate."""
    rate = sim["encoder"]["gmac"] / (sim["encoder"]["matmul_ms"] / 1e3)  # GMAC/s of the encoder's products
    extra = sim["all"]["gmac"] - bil["all"]["gmac"]
    return 1 + extra / rate / (bil["all"]["ms"] / 1e3)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="export the folders here (or reuse them: bench/e2e.py --keep)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own, one per core)")
    parser.add_argument("--repeats", type=_positive, default=3, help="profiled calls after one warm-up (medians)")
    parser.add_argument("--top", type=int, default=12, help="the rest's costliest nodes to list")
    args = parser.parse_args(argv)

    from bench.e2e import _folder, build_torch
    from simfeatup import hardware
    from simfeatup.allocator import keep_freed_memory

    keep_freed_memory()  # as every simfeatup command does
    with tempfile.TemporaryDirectory(prefix="simfeatup_window_profile_") as tmp:  # each export is ~600 MB
        root = args.keep or Path(tmp)
        kinds = ("fp32", "bilinear")
        torch_seg = None if all((root / k / "manifest.json").is_file() for k in kinds) else build_torch()
        folders = {kind: _folder(kind, torch_seg, root) for kind in kinds}
        nodes = {kind: profile_window(folder, args.threads, args.repeats) for kind, folder in folders.items()}
    sums = {kind: summary(n) for kind, n in nodes.items()}
    print(f"CPU: {hardware.describe()}\none 224x224 window, random ViT-B/16, onnxruntime threads: "
          f"{args.threads or 'its default'}, node-time medians of {args.repeats}\n")
    print("| graph | part | ms | matmul GMAC | matmul ms | matmul GMAC/s |\n|---|---|---|---|---|---|")
    for kind in ("bilinear", "fp32"):
        for part in ("encoder", "rest", "all"):
            s = sums[kind].get(part)
            if s:
                rate = s["gmac"] / (s["matmul_ms"] / 1e3) if s["matmul_ms"] else 0.0
                print(f"| {kind} | {part} | {s['ms']:.1f} | {s['gmac']:.2f} | {s['matmul_ms']:.1f} | {rate:.1f} |")
    rest = sorted((n for n in nodes["fp32"] if n["part"] == "rest"), key=lambda n: -n["ms"])
    print(f"\nSimFeatUp graph, after the encoder, costliest {args.top} nodes (output shape):")
    for n in rest[: args.top]:
        rate = f"{n['macs'] / 1e9 / (n['ms'] / 1e3):6.1f} GMAC/s" if n["macs"] and n["ms"] else ""
        print(f"  {n['ms']:7.1f} ms  {n['op']:12s} {rate:14s} {str(n['shape']):26s} {n['name']}")
    others = collections.Counter()
    for n in nodes["fp32"]:
        if n["part"] == "rest" and n["op"] not in PRODUCTS:
            others[n["op"]] += n["ms"]
    print(f"everything else after the encoder, {sum(others.values()):.1f} ms: "
          + ", ".join(f"{op} {ms:.1f}" for op, ms in others.most_common(6)))
    uncounted = [n["name"] for kind in nodes for n in nodes[kind] if n["macs"] is None]
    if uncounted:
        print(f"products whose inputs the profile and the graph do not give, counted as 0: {', '.join(uncounted)}")
    measured = sums["fp32"]["all"]["ms"] / sums["bilinear"]["all"]["ms"]
    floor = floor_ratio(sums["fp32"], sums["bilinear"])
    print(f"\nper window: SimFeatUp on / bilinear = {measured:.2f}; with every extra matrix product at the "
          f"encoder's rate it would be {floor:.2f} (issue 10's whole-image target: <= 1.5, moonshot 1.2)")
    return {"summary": sums, "ratio": measured, "floor": floor}


if __name__ == "__main__":
    main()
