"""The OpenVINO backend (``--runtime openvino``) against onnxruntime on the session's exported folder.

Each check runs in a process of its own (tests/openvino_checks.py says why): this module never
imports openvino.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

CHECKS = (  # each 9-13 s on a 2-core AVX2 machine: under -m slow, so the default run stays under 5 min
    pytest.param("f32_window_logits_match_onnxruntime", marks=pytest.mark.slow),
    pytest.param("bf16_keeps_the_text_exact_and_most_labels", marks=pytest.mark.slow),
    pytest.param("cli_runs_openvino_and_refuses_misplaced_flags", marks=pytest.mark.slow),
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason='openvino is not installed (pip install -e ".[openvino]")')


def _run(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
                          **kwargs)


@pytest.mark.parametrize("check", CHECKS)
def test_openvino_check(check, onnx_dir, tmp_path):
    done = _run(str(REPO / "tests" / "openvino_checks.py"), check, str(onnx_dir), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_the_openvino_runtime_never_imports_torch(onnx_dir):
    code = (
        "import sys; from simfeatup.openvino_runtime import OpenVinoSegmenter; "
        f"s = OpenVinoSegmenter({str(onnx_dir)!r}, cache=False); s.encode_texts(['a road']); "
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, sorted(sys.modules)"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
