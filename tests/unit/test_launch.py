"""The ctypes mirror of the driver's launch structures (neuron/model/launch.py) and its argument
packing; the launch itself runs in tests/gpu (test_gpu_kernels.py: pdl variants)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from neuron.model.launch import LaunchAttribute, LaunchConfig, kernel_arg


def test_structures_match_cuda_h_layout():
    # sizeof/offsetof of CUlaunchAttribute and CUlaunchConfig on x86_64 (CUDA 12.x and 13.0 cuda.h)
    assert ctypes.sizeof(LaunchAttribute) == 72
    assert LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(LaunchConfig) == 56
    assert (LaunchConfig.hStream.offset, LaunchConfig.attrs.offset, LaunchConfig.numAttrs.offset) == (32, 40, 48)


class FakeArray:
    class data:  # noqa: N801 - mimics cupy.ndarray.data.ptr
        ptr = 0x7F0000001000


def test_kernel_arguments_keep_their_c_types():
    assert isinstance(kernel_arg(np.int32(-3)), ctypes.c_int32) and kernel_arg(np.int32(-3)).value == -3
    assert isinstance(kernel_arg(np.float32(0.5)), ctypes.c_float) and kernel_arg(np.float32(0.5)).value == 0.5
    assert kernel_arg(0).value == 0 and isinstance(kernel_arg(0), ctypes.c_uint64)  # a null pointer
    assert kernel_arg(FakeArray()).value == 0x7F0000001000
    with pytest.raises(TypeError, match="float"):
        kernel_arg(1.5)  # a Python float has no fixed C type: refused, not guessed
