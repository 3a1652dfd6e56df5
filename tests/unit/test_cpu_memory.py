"""CPU devices of one neuron share the host's RAM: none reports more free memory than its share of
what the host has available (neuron/device.py)."""
from __future__ import annotations

from neuron import device as device_module
from neuron.device import CpuBackend, DeviceSpec, available_memory_bytes

GB = 10**9


def test_cpu_devices_report_their_share_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(device_module, "available_memory_bytes", lambda: 10 * GB)
    alive_before = CpuBackend._alive
    assert alive_before == 0, "another test left a CPU backend open: the shares below would differ"
    first = CpuBackend(DeviceSpec("cpu:0", "cpu", 0), 8 * GB)
    second = CpuBackend(DeviceSpec("cpu:1", "cpu", 1), 8 * GB)
    try:
        assert first.memory() == (8 * GB, 5 * GB) and second.memory() == (8 * GB, 5 * GB)
        first.used = 6 * GB  # its own budget is the tighter bound now
        assert first.memory() == (8 * GB, 2 * GB)
        second.close()
        assert first.memory() == (8 * GB, 2 * GB)
        first.used = 0
        assert first.memory() == (8 * GB, 8 * GB), "alone, its budget bounds it"
    finally:
        first.close()
        second.close()  # closing twice counts once
    assert CpuBackend._alive == alive_before


def test_the_available_memory_is_a_plausible_figure():
    available = available_memory_bytes()
    assert 0 < available <= device_module.system_memory_bytes()
