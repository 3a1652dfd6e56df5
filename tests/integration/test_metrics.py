"""Both /metrics endpoints, scraped with prometheus_client's own parser before and after a known
amount of traffic through cortex's gRPC and HTTP fronts: the counters move by exactly the requests
and tokens sent, histograms by the requests, and the fleet and device gauges show what is there."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.proto.cortex.v1 import cortex_pb2 as cpb
from cortex.client import CortexClient
from neuron.tokenizer import Tokenizer
from tests.helpers import MODELS, logged_port, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

PROMPT = "Metrics count what was sent"


@pytest.fixture(scope="module")
def fleet():
    neuron = start_neuron("cpu", [MODELS], extra=["--metrics-listen", "127.0.0.1:0"])
    cortex = start_cortex([neuron.address], extra=["--http-listen", "127.0.0.1:0", "--poll-seconds", "0.3"])
    try:
        with CortexClient(cortex.address, timeout=60) as client:
            wait_until(lambda: any(n.state == cpb.NODE_STATE_UP for n in client.nodes()), what="the neuron UP")
            client.load_wait("llama3", name="llama3")
            yield dict(client=client, cortex=f"http://127.0.0.1:{logged_port(cortex, 'http serving')}",
                       neuron=f"http://127.0.0.1:{logged_port(neuron, 'metrics serving')}/metrics")
    finally:
        cortex.kill()
        neuron.kill()


class Scrape:
    """One scrape, parsed; value() sums the samples of a name whose labels include the given ones."""

    def __init__(self, url: str):
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            self.samples = [s for f in text_string_to_metric_families(reply.read().decode()) for s in f.samples]

    def value(self, name: str, **labels) -> float:
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def http_completion(base: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_counters_move_by_the_requests_and_tokens_sent(fleet):
    client, prompt_len = fleet["client"], len(Tokenizer.from_dir(MODELS / "llama3").encode(PROMPT))
    before_c, before_n = Scrape(fleet["cortex"] + "/metrics"), Scrape(fleet["neuron"])

    http_tokens = [3, 5]
    for n in http_tokens:
        status, body = http_completion(fleet["cortex"], {"model": "llama3", "prompt": PROMPT, "max_tokens": n,
                                                         "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == n
    grpc_tokens = [4]
    for n in grpc_tokens:
        assert sum(len(c.token_ids) for c in client.generate("llama3", PROMPT, max_tokens=n, ignore_eos=True)) == n
    assert http_completion(fleet["cortex"], {"model": "missing", "prompt": PROMPT})[0] == 404
    client.forward("llama3", [1, 2, 3])

    after_c, after_n = Scrape(fleet["cortex"] + "/metrics"), Scrape(fleet["neuron"])

    def moved(after, before, name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    ok = dict(model="llama3", endpoint="generate", code="OK")
    assert moved(after_c, before_c, "cortex_requests_total", front="http", **ok) == len(http_tokens)
    assert moved(after_c, before_c, "cortex_requests_total", front="grpc", **ok) == len(grpc_tokens)
    assert moved(after_c, before_c, "cortex_requests_total", model="", front="http", code="NOT_FOUND") == 1
    assert moved(after_c, before_c, "cortex_requests_total", model="llama3", endpoint="forward", code="OK") == 1
    generations = len(http_tokens) + len(grpc_tokens)
    tokens = sum(http_tokens) + sum(grpc_tokens)
    assert moved(after_c, before_c, "cortex_generation_tokens_total", model="llama3") == tokens
    assert moved(after_c, before_c, "cortex_prompt_tokens_total", model="llama3") == generations * prompt_len
    assert moved(after_c, before_c, "cortex_time_to_first_token_seconds_count", model="llama3") == generations
    assert moved(after_c, before_c, "cortex_request_duration_seconds_count", model="llama3") == generations
    # One gap per token after each generation's first.
    assert moved(after_c, before_c, "cortex_inter_token_latency_seconds_count", model="llama3") == tokens - generations
    assert after_c.value("cortex_requests_running", model="llama3") == 0

    assert moved(after_n, before_n, "neuron_requests_total", model="llama3", code="OK") == generations
    assert moved(after_n, before_n, "neuron_generation_tokens_total", model="llama3") == tokens
    assert moved(after_n, before_n, "neuron_prompt_tokens_total", model="llama3") == generations * prompt_len
    assert moved(after_n, before_n, "neuron_time_to_first_token_seconds_count", model="llama3") == generations
    # Every request's tokens are looked up in the prefix cache when it is first scheduled (the Forward's 3 too).
    queries = moved(after_n, before_n, "neuron_prefix_cache_queries_total", model="llama3")
    assert queries == generations * prompt_len + 3
    assert 0 <= moved(after_n, before_n, "neuron_prefix_cache_hits_total", model="llama3") <= queries


def test_fleet_and_device_gauges_show_what_is_there(fleet):
    cortex = Scrape(fleet["cortex"] + "/metrics")
    assert cortex.value("cortex_nodes", state="up") == 1 and cortex.value("cortex_nodes", state="down") == 0
    assert cortex.value("cortex_model_state", model="llama3", state="ready") == 1
    assert cortex.value("cortex_model_state", model="llama3") == 1  # one state at a time
    assert cortex.value("cortex_model_load_duration_seconds_count", model="llama3") == 1
    assert "cortex_stream_interval" in cortex.names()
    # the stream interval in force: the base (1) once cortex's event loop is idle (stream_pacing.py)
    wait_until(lambda: Scrape(fleet["cortex"] + "/metrics").value("cortex_stream_interval") == 1,
               what="the stream interval back at its base")

    info = next(m for m in fleet["client"].models() if m.name == "llama3")
    neuron = Scrape(fleet["neuron"])
    assert neuron.value("neuron_kv_cache_bytes", device="cpu", model="llama3") == info.kv_bytes
    total = neuron.value("neuron_device_memory_total_bytes", device="cpu")
    used = neuron.value("neuron_device_memory_used_bytes", device="cpu")
    assert total > 0 and info.weight_bytes + info.kv_bytes <= used <= total
    assert neuron.value("neuron_kv_blocks", model="llama3") >= 1
    assert neuron.value("neuron_kv_blocks_used", model="llama3") == 0
    assert neuron.value("neuron_requests_running") == 0 and neuron.value("neuron_requests_waiting") == 0
    assert neuron.value("neuron_kv_cache_usage_ratio", device="cpu") == 0
    assert not any(name.endswith("_created") for name in neuron.names() | cortex.names())
