"""GraphInputs: a graph bucket's input arrays as views of one buffer, written on the host and sent
in one copy (here NumPy's: the CPU path the tests run)."""
from __future__ import annotations

import numpy as np

from neuron.runner.graph_inputs import ALIGN, GraphInputs, put


def test_arrays_are_aligned_views_of_one_buffer_that_change_only_on_upload():
    inputs = GraphInputs(np, {"tables": ((3, 5), np.int32), "slots": ((3,), np.int64), "ids": ((3,), np.int32)})
    device = inputs.device
    assert [device[k].shape for k in ("tables", "slots", "ids")] == [(3, 5), (3,), (3,)]
    assert [device[k].dtype for k in ("tables", "slots", "ids")] == [np.int32, np.int64, np.int32]
    base = device["tables"].ctypes.data
    assert all((device[k].ctypes.data - base) % ALIGN == 0 for k in device)
    assert inputs.nbytes == 64 + 32 + 16   # 60, 24 and 12 bytes, each rounded up to 16
    staged = inputs.stage()
    staged["tables"][:] = np.arange(15).reshape(3, 5)
    put(staged["slots"], np.array([7, 8]), -1)
    put(staged["ids"], np.array([4]), 0)
    assert not device["slots"].any()           # written on the host only
    inputs.upload()
    assert device["tables"].tolist() == np.arange(15).reshape(3, 5).tolist()
    assert device["slots"].tolist() == [7, 8, -1] and device["ids"].tolist() == [4, 0, 0]
    # the next turn's values replace every row, padding included
    put(inputs.stage()["ids"], np.array([1, 2, 3]), 0)
    inputs.upload()
    assert device["ids"].tolist() == [1, 2, 3] and device["slots"].tolist() == [7, 8, -1]
