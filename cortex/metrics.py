"""cortex's Prometheus metrics: what every request through cortex did (gRPC and HTTP alike), and
the fleet's state read from the registry and the model table when scraped.

Requests are labelled with the model they named when it is in the model table, else with ""
(so that unknown names sent by clients cannot grow the label set without bound).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.metrics import LATENCY_BUCKETS
from common.proto.cortex.v1 import cortex_pb2 as cpb

MODEL_STATES = [cpb.ModelState.Name(v).removeprefix("MODEL_STATE_").lower() for v in cpb.ModelState.values()
                if v != cpb.MODEL_STATE_UNSPECIFIED]


class CortexMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("cortex_requests", "Generate and Forward requests that ended, by front "
                                "(grpc or http), endpoint and gRPC status code", ["model", "front", "endpoint", "code"],
                                registry=r)
        self.running = Gauge("cortex_requests_running", "requests in flight to the neurons (cortex queues none "
                             "itself: see neuron_requests_waiting)", ["model"], registry=r)
        self.prompt_tokens = Counter("cortex_prompt_tokens", "prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("cortex_generation_tokens", "tokens generated (streamed to clients, "
                                         "finished or not)", ["model"], registry=r)
        self.ttft = Histogram("cortex_time_to_first_token_seconds", "from the request reaching cortex to its first "
                              "token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("cortex_inter_token_latency_seconds", "gap between consecutive tokens of a "
                                     "generation as cortex receives them, once per token after the first", ["model"], buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.e2e = Histogram("cortex_request_duration_seconds", "end-to-end time of generations that finished",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.load = Histogram("cortex_model_load_duration_seconds", "LoadModel calls that loaded a model, from the "
                              "call to READY", ["model"], buckets=LATENCY_BUCKETS, registry=r)

    def watch_pacer(self, pacer) -> None:
        """Publish the stream interval in force (stream_pacing.StreamPacer), read at each scrape."""
        gauge = Gauge("cortex_stream_interval", "tokens a streamed message carries after a generation's first, as "
                      "chosen now: --stream-interval, raised up to --max-stream-interval while cortex is saturated",
                      registry=self.registry)
        gauge.set_function(lambda: pacer.interval)

    def watch_fleet(self, registry, models) -> None:
        """Publish node and model states, read from cortex's registry and model table at each scrape."""
        self.registry.register(_FleetCollector(registry, models))

    def generation(self, model: str, front: str) -> "GenerationTimer":
        return GenerationTimer(self, model, front)

    def forward_done(self, model: str, front: str, code: str) -> None:
        self.requests.labels(model, front, "forward", code).inc()


@dataclass
class GenerationTimer:
    """Follows one generation from arrival to its end and records it."""
    metrics: CortexMetrics
    model: str
    front: str
    started: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    running: bool = False
    _tokens: object = field(default=None, init=False, repr=False)        # this model's labelled series
    _inter_token: object = field(default=None, init=False, repr=False)

    def begin(self) -> None:
        self.metrics.running.labels(self.model).inc()
        self.running = True

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.perf_counter()
        gaps, gap = count, 0.0
        if self.last_token_at is None:
            # The labelled series are looked up once per generation, not once per message.
            self._tokens = self.metrics.generation_tokens.labels(self.model)
            self._inter_token = self.metrics.inter_token.labels(self.model)
            self.metrics.ttft.labels(self.model).observe(now - self.started)
            gaps -= 1  # the first token has no gap before it; those that came with it have none either
        else:
            gap = (now - self.last_token_at) / count  # tokens in one message share its gap
        self._tokens.inc(count)
        for _ in range(gaps):
            self._inter_token.observe(gap)
        self.last_token_at = now

    def end(self, code: str, prompt_tokens: int | None) -> None:
        m = self.metrics
        if self.running:
            m.running.labels(self.model).dec()
        m.requests.labels(self.model, self.front, "generate", code).inc()
        if code == "OK":
            m.e2e.labels(self.model).observe(time.perf_counter() - self.started)
        if prompt_tokens:
            m.prompt_tokens.labels(self.model).inc(prompt_tokens)


class _FleetCollector(Collector):
    def __init__(self, registry, models):
        self.nodes, self.models = registry, models

    def collect(self):
        nodes = GaugeMetricFamily("cortex_nodes", "neurons known to cortex, by state", labels=["state"])
        listed = self.nodes.nodes()
        up = sum(1 for n in listed if n.up)
        nodes.add_metric(["up"], up)
        nodes.add_metric(["down"], len(listed) - up)
        yield nodes
        states = GaugeMetricFamily("cortex_model_state", "1 for the state each model is in, 0 for the others",
                                   labels=["model", "state"])
        for info in self.models.list():
            current = cpb.ModelState.Name(info.state).removeprefix("MODEL_STATE_").lower()
            for state in MODEL_STATES:
                states.add_metric([info.name, state], 1.0 if state == current else 0.0)
        yield states
