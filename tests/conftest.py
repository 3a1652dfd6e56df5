import pytest


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CuPy sees a GPU."""
    from neuron.device import cuda_device_count
    if cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (none visible here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
