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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the tail of every live server's log (tests/helpers.LIVE)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        from tests.helpers import LIVE
        for server in LIVE:
            tail = "\n".join(server.log().splitlines()[-40:])
            report.sections.append((f"log of {server.args[2]} at {server.address}", tail))
