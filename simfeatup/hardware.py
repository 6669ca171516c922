"""Which reduced-precision units this CPU has, so that a bf16 or int8 path is chosen knowingly.

bf16 is fast only where the CPU multiplies bf16 in hardware (x86: AVX512-BF16 or AMX); elsewhere
PyTorch emulates it and ``--dtype bfloat16`` runs slower than float32 (docs/method.md section 8).
int8 matmuls use VNNI where it exists; the int8 export's 7-bit weights keep CPUs without it from
overflowing (:mod:`simfeatup.export.quantize`). PyTorch's own CPU probes answer (the ones its
kernels dispatch on); on other architectures than x86 nothing is claimed.
"""
from __future__ import annotations

import platform

_X86 = ("x86_64", "amd64", "i386", "i686")
# PyTorch's probes (torch.cpu, private but present since 2.1), by the name this module reports
_PROBES = {"avx512": "_is_avx512_supported", "avx512_bf16": "_is_avx512_bf16_supported",
           "amx": "_is_amx_tile_supported", "vnni": "_is_vnni_supported"}


def cpu_features() -> dict[str, bool] | None:
    """{"avx512", "avx512_bf16", "amx", "vnni"} -> present, from PyTorch's probes; None off x86 or
    when this PyTorch lacks them."""
    if platform.machine().lower() not in _X86:
        return None
    import torch

    probes = {name: getattr(torch.cpu, attr, None) for name, attr in _PROBES.items()}
    if any(probe is None for probe in probes.values()):
        return None
    return {name: bool(probe()) for name, probe in probes.items()}


def bf16_units() -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); None when that cannot be told."""
    features = cpu_features()
    return None if features is None else features["avx512_bf16"] or features["amx"]


def describe() -> str:
    """One line for benchmark headers, e.g. "x86_64, AVX2 kernels, AVX512-VNNI no, bf16 units no (AMX no)"
    (PyTorch's VNNI probe sees AVX512-VNNI only, not the AVX-VNNI of client CPUs)."""
    import torch

    line = f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels"
    features = cpu_features()
    if features is None:
        return line
    yes = {True: "yes", False: "no"}
    units = f"bf16 units {yes[features['avx512_bf16'] or features['amx']]} (AMX {yes[features['amx']]})"
    return f"{line}, AVX512-VNNI {yes[features['vnni']]}, {units}"


def bf16_refusal() -> str | None:
    """Why bf16 should not run on this CPU (no bf16 units: PyTorch emulates it, a 1024^2 GEMM 135x
    slower than float32 on an AVX2 CPU, bench/e2e.py), or None when it has them or that cannot be told."""
    if bf16_units() is not False:
        return None
    return ("this CPU has no bf16 units (AVX512-BF16 or AMX), so PyTorch would emulate bfloat16, "
            "many times slower than float32: leave --dtype at auto (float32 on CPU)")
