"""Which reduced-precision units this CPU has, so that a bf16, float16 or int8 path is chosen knowingly.

bf16 is fast only where the CPU multiplies bf16 in hardware (x86: AVX512-BF16 or AMX); elsewhere
PyTorch emulates it: on AVX2-only CPUs many times slower than float32 (refused), on AVX-512 CPUs
through oneDNN's emulation (warned). float16 matmuls on CPU are fast only with AMX-FP16; elsewhere
they run at float32 speed or slower while rounding the whole model (warned). int8 matmuls use VNNI
where it exists; the int8 export's 7-bit weights keep CPUs without it from overflowing
(:mod:`simfeatup.export.quantize`). See docs/method.md section 8. PyTorch's own CPU probes answer
(the ones its kernels dispatch on); on other architectures than x86 nothing is claimed.
"""
from __future__ import annotations

import platform

_X86 = ("x86_64", "amd64", "i386", "i686")
# torch.cpu.get_capabilities() (PyTorch >= 2.8) keys, by the name this module reports; "vnni" is
# either AVX512-VNNI or the AVX-VNNI of client CPUs
_CAPABILITIES = {"avx512": ("avx512_f",), "avx512_bf16": ("avx512_bf16",), "amx": ("amx_bf16",),
                 "vnni": ("avx512_vnni", "avx_vnni"), "amx_fp16": ("amx_fp16",)}
# the older private probes (torch.cpu, present since 2.1): no AVX-VNNI, no AMX-FP16 before 2.5
_PROBES = {"avx512": "_is_avx512_supported", "avx512_bf16": "_is_avx512_bf16_supported",
           "amx": "_is_amx_tile_supported", "vnni": "_is_vnni_supported", "amx_fp16": "_is_amx_fp16_supported"}

Advice = tuple[str, str]  # ("error" | "warning", why)


def cpu_features() -> dict[str, bool] | None:
    """{"avx512", "avx512_bf16", "amx", "vnni", "amx_fp16"} -> present, from PyTorch's probes; None
    off x86 or when this PyTorch has none of them."""
    if platform.machine().lower() not in _X86:
        return None
    import torch

    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        found = get_capabilities()
        return {name: any(bool(found.get(key)) for key in keys) for name, keys in _CAPABILITIES.items()}
    probes = {name: getattr(torch.cpu, attr, None) for name, attr in _PROBES.items()}
    if any(probes[name] is None for name in ("avx512", "avx512_bf16", "amx", "vnni")):
        return None
    return {name: bool(probe()) if probe is not None else False for name, probe in probes.items()}


def bf16_units() -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); None when that cannot be told."""
    features = cpu_features()
    return None if features is None else _bf16(features)


def _bf16(features: dict[str, bool]) -> bool:
    return features["avx512_bf16"] or features["amx"]


def describe() -> str:
    """One line for benchmark headers, e.g. "x86_64, AVX2 kernels, VNNI no, bf16 units no (AMX no)"."""
    import torch

    line = f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels"
    features = cpu_features()
    if features is None:
        return line
    yes = {True: "yes", False: "no"}
    units = f"bf16 units {yes[_bf16(features)]} (AMX {yes[features['amx']]})"
    return f"{line}, VNNI {yes[features['vnni']]}, {units}, AMX-FP16 {yes[features['amx_fp16']]}"


def cpu_dtype_advice(dtype: str, fix: str = "leave --dtype at auto (float32 on CPU)") -> Advice | None:
    """Whether ``dtype`` ("bfloat16", "float16", anything else is fine) should run on this CPU:
    ("error", why) where PyTorch would emulate it many times slower than float32 (bf16 on a CPU with
    neither bf16 units nor AVX-512: a 1024^2 GEMM 135x slower on an AVX2 CPU, bench/e2e.py),
    ("warning", why) where it works but likely gains nothing, None where it is fast or nothing can be told.
    ``fix`` ends the error: what the caller's user should do instead."""
    features = cpu_features()
    if features is None or dtype not in ("bfloat16", "float16"):
        return None
    if dtype == "bfloat16":
        if _bf16(features):
            return None
        if features["avx512"]:
            return ("warning", "this CPU has AVX-512 but no bf16 units (AVX512-BF16 or AMX), so bfloat16 is "
                    "emulated and likely slower than float32: compare with bench/e2e.py --rows vit torch-bf16")
        return ("error", "this CPU has no bf16 units (AVX512-BF16 or AMX), so PyTorch would emulate bfloat16, "
                f"many times slower than float32: {fix}")
    if features["amx_fp16"]:
        return None
    better = "bfloat16 (this CPU has bf16 units)" if _bf16(features) else "auto (float32)"
    return ("warning", "float16 on a CPU without AMX-FP16 runs no faster than float32 and rounds the whole "
            f"model, text tower and upsampler too: use --dtype {better}")
