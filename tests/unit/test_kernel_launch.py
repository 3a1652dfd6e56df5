"""kernels/launch.py without a GPU: arguments packed as CuPy passes them, and the thread-local switch."""
from __future__ import annotations

import ctypes
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from neuron.kernels.launch import pack_argument, programmatic, programmatic_launches


def test_arguments_pack_to_the_bytes_of_their_parameters():
    assert bytes(pack_argument(np.int32(-2))) == np.int32(-2).tobytes()
    assert bytes(pack_argument(np.float32(0.5))) == np.float32(0.5).tobytes()
    assert bytes(pack_argument(np.int64(7))) == np.int64(7).tobytes()
    assert pack_argument(123).value == 123 and ctypes.sizeof(pack_argument(123)) == 8   # a pointer, or 0
    device_array = SimpleNamespace(data=SimpleNamespace(ptr=0xDEAD00))
    assert pack_argument(device_array).value == 0xDEAD00
    for ambiguous in (1.5, True):
        with pytest.raises(TypeError):
            pack_argument(ambiguous)


def test_programmatic_launches_hold_for_the_block_and_thread_only():
    seen = []
    with programmatic_launches():
        assert programmatic()
        other = threading.Thread(target=lambda: seen.append(programmatic()))
        other.start()
        other.join()
        with programmatic_launches(False):
            assert not programmatic()
        assert programmatic()
    assert not programmatic() and seen == [False]
