"""GPU parity through the real neuron code (DeviceWorker jobs): every fixture in float32, bfloat16
and float16 through the serving engine; two models at once; load/drop without leaking device memory.
The same checks, with a JSON record, run as `python bench/gpu_checks.py --devices 0`."""
from __future__ import annotations

import pytest

from bench.gpu_checks import (DTYPES, FIXTURE_NAMES, FP32_REL_L2, HALF_COSINE, load_drop, make_leak_checkpoint,
                              parity, start_worker, two_models)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def worker():
    w = start_worker(0)
    yield w
    w.stop()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_parity(worker, name, dtype):
    # The serving engine runs the plain path over the paged KV cache (the fused engine works on
    # the slot-based cache only and is checked on its own by test_gpu_kernels / tests/unit/test_fused_*).
    row = parity(worker, [name], [dtype])[0]
    assert row["engine"] == "plain", row
    if dtype == "float32":
        assert row["plain_rel_l2"] < FP32_REL_L2, row
        assert row["plain_greedy_eq_ref"], row
    else:
        assert row["plain_min_cosine"] > HALF_COSINE, row


def test_two_models_on_one_gpu(worker):
    assert two_models([worker])["pass"]


def test_load_drop_keeps_device_memory(worker, tmp_path_factory):
    path = make_leak_checkpoint(tmp_path_factory.mktemp("leak"))
    assert load_drop(worker, path, cycles=20)["pass"]
