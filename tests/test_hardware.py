"""simfeatup.hardware: what the CPU's reduced-precision units are, and when bf16 or float16 is refused or warned."""
import platform
import types

import pytest

from simfeatup import hardware

NONE = {"avx512": False, "avx512_bf16": False, "amx": False, "vnni": False, "amx_fp16": False}


def test_features_are_pytorchs_capabilities_on_x86():
    features = hardware.cpu_features()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert features is None
        return
    import torch

    found = torch.cpu.get_capabilities()
    assert features == {"avx512": found["avx512_f"], "avx512_bf16": found["avx512_bf16"], "amx": found["amx_bf16"],
                        "vnni": found["avx512_vnni"] or found["avx_vnni"], "amx_fp16": found["amx_fp16"]}
    # the private probes PyTorch's kernels dispatch on agree with the public table
    assert features["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    assert features["amx"] == torch.cpu._is_amx_tile_supported()
    assert hardware.bf16_units() == (features["avx512_bf16"] or features["amx"])
    line = hardware.describe()
    assert f"{torch.backends.cpu.get_cpu_capability()} kernels" in line and "bf16 units " in line


def _fake_torch_cpu(monkeypatch, **attrs):
    import torch

    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace(**attrs))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")


def test_older_pytorch_falls_back_to_the_private_probes(monkeypatch):
    probes = {"_is_avx512_supported": lambda: True, "_is_avx512_bf16_supported": lambda: False,
              "_is_amx_tile_supported": lambda: True, "_is_vnni_supported": lambda: True}
    _fake_torch_cpu(monkeypatch, **probes)  # no get_capabilities, no AMX-FP16 probe
    assert hardware.cpu_features() == {"avx512": True, "avx512_bf16": False, "amx": True, "vnni": True,
                                       "amx_fp16": False}
    del probes["_is_vnni_supported"]
    _fake_torch_cpu(monkeypatch, **probes)  # a PyTorch with too few probes claims nothing
    assert hardware.cpu_features() is None
    assert hardware.bf16_units() is None and hardware.cpu_dtype_advice("bfloat16") is None


def test_nothing_is_claimed_off_x86(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert hardware.cpu_features() is None and hardware.bf16_units() is None
    assert hardware.cpu_dtype_advice("bfloat16") is None and hardware.cpu_dtype_advice("float16") is None
    assert "kernels" in hardware.describe()


@pytest.mark.parametrize("dtype, features, level, words", [
    ("bfloat16", {}, "error", "leave --dtype at auto"),  # AVX2 only: emulated, many times slower
    ("bfloat16", {"avx512": True}, "warning", "AVX-512 but no bf16 units"),  # oneDNN's emulation
    ("bfloat16", {"avx512": True, "avx512_bf16": True}, None, ""),
    ("bfloat16", {"amx": True}, None, ""),
    ("float16", {}, "warning", "use --dtype auto (float32)"),
    ("float16", {"avx512": True, "amx": True}, "warning", "use --dtype bfloat16 (this CPU has bf16 units)"),
    ("float16", {"amx": True, "amx_fp16": True}, None, ""),
    ("float32", {}, None, ""),
])
def test_reduced_precision_advice(monkeypatch, dtype, features, level, words):
    monkeypatch.setattr(hardware, "cpu_features", lambda: {**NONE, **features})
    advice = hardware.cpu_dtype_advice(dtype)
    assert (advice[0] if advice else None) == level
    assert words in (advice[1] if advice else "")
