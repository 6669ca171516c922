"""simfeatup.hardware: what the CPU's reduced-precision units are, and when bf16 is refused."""
import platform

from simfeatup import hardware


def test_features_are_pytorchs_probes_on_x86():
    features = hardware.cpu_features()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert features is None
        return
    import torch

    probes = torch.cpu
    assert features == {"avx512": probes._is_avx512_supported(), "avx512_bf16": probes._is_avx512_bf16_supported(),
                        "amx": probes._is_amx_tile_supported(), "vnni": probes._is_vnni_supported()}
    assert hardware.bf16_units() == (features["avx512_bf16"] or features["amx"])
    line = hardware.describe()
    assert f"{torch.backends.cpu.get_cpu_capability()} kernels" in line and "bf16 units " in line


def test_bf16_is_refused_only_where_the_cpu_is_known_to_lack_the_units(monkeypatch):
    for units, refused in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(hardware, "bf16_units", lambda units=units: units)
        reason = hardware.bf16_refusal()
        assert (reason is not None) == refused
    monkeypatch.setattr(hardware, "bf16_units", lambda: False)
    assert "no bf16 units" in hardware.bf16_refusal() and "--dtype" in hardware.bf16_refusal()
