"""The neuron's Prometheus metrics: per shard and device, what its engine holds (KV blocks, requests
running and waiting, prefix-cache lookups) and the device's memory, read from the figures the device
thread caches after every turn; and per model, the Generate calls served, counted by a gRPC
interceptor around the handler.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.metrics import LATENCY_BUCKETS
from common.server import rewrap_handler

GENERATE = "/neuron.v1.Neuron/Generate"


@dataclass(frozen=True)
class ShardFigures:
    model: str
    kv_bytes: int
    kv_blocks: int
    kv_blocks_used: int
    running: int
    waiting: int
    prefix_queries: int      # prompt tokens looked up in the prefix cache
    prefix_hits: int         # of those, tokens found cached


@dataclass(frozen=True)
class DeviceFigures:
    device: str
    kind: str
    total_bytes: int
    free_bytes: int
    shards: list[ShardFigures]


def device_figures(worker) -> DeviceFigures:
    """A worker's figures without waiting for its thread: its cached memory and each shard engine's
    stats, which the device thread replaces after every turn (each read is of one whole snapshot)."""
    shards = []
    for shard in list(worker.slab.values()):
        stats = shard.engine.stats
        shards.append(ShardFigures(shard.request.model, shard.kv.nbytes, stats.kv.blocks_total, stats.kv.blocks_used,
                                   stats.running, stats.waiting, stats.kv.queries, stats.kv.hits))
    return DeviceFigures(worker.spec.id, worker.spec.kind, worker.memory.total, worker.memory.free, shards)


class DeviceCollector(Collector):
    def __init__(self, workers: list):
        self.workers = workers

    def collect(self):
        def gauge(name, doc, labels):
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name, doc, labels):
            return CounterMetricFamily(name, doc, labels=labels)

        total = gauge("neuron_device_memory_total_bytes", "memory of the device (a CPU device: its budget)",
                      ["device", "kind"])
        used = gauge("neuron_device_memory_used_bytes", "memory in use on the device", ["device", "kind"])
        running = gauge("neuron_requests_running", "requests the device's engines are running", ["device"])
        waiting = gauge("neuron_requests_waiting", "requests waiting to start on the device", ["device"])
        kv_bytes = gauge("neuron_kv_cache_bytes", "KV cache (block pool) allocated for a shard", ["device", "model"])
        blocks = gauge("neuron_kv_blocks", "KV cache blocks of a shard", ["device", "model"])
        blocks_used = gauge("neuron_kv_blocks_used", "KV cache blocks held by requests", ["device", "model"])
        usage = gauge("neuron_kv_cache_usage_ratio", "KV blocks held over KV blocks, all shards of the device "
                      "(0 to 1; 0 with no shard)", ["device"])
        queries = counter("neuron_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                          ["device", "model"])
        hits = counter("neuron_prefix_cache_hits", "looked-up prompt tokens found in the prefix cache (not "
                       "recomputed)", ["device", "model"])
        for f in (device_figures(w) for w in self.workers):
            total.add_metric([f.device, f.kind], f.total_bytes)
            used.add_metric([f.device, f.kind], f.total_bytes - f.free_bytes)
            running.add_metric([f.device], sum(s.running for s in f.shards))
            waiting.add_metric([f.device], sum(s.waiting for s in f.shards))
            for s in f.shards:
                kv_bytes.add_metric([f.device, s.model], s.kv_bytes)
                blocks.add_metric([f.device, s.model], s.kv_blocks)
                blocks_used.add_metric([f.device, s.model], s.kv_blocks_used)
                queries.add_metric([f.device, s.model], s.prefix_queries)
                hits.add_metric([f.device, s.model], s.prefix_hits)
            held, held_used = sum(s.kv_blocks for s in f.shards), sum(s.kv_blocks_used for s in f.shards)
            usage.add_metric([f.device], held_used / held if held else 0.0)
        yield from (total, used, running, waiting, kv_bytes, blocks, blocks_used, usage, queries, hits)


class NeuronMetrics:
    def __init__(self, workers: list, model_of: Callable[[int], str]):
        """model_of(handle): the model name of a shard handle ("" if unknown)."""
        self.registry = CollectorRegistry()
        self.model_of = model_of
        r = self.registry
        r.register(DeviceCollector(workers))
        self.requests = Counter("neuron_requests",
                                "generations that ended (Generate calls and GenerateStream's), by gRPC status code",
                                ["model", "code"], registry=r)
        self.prompt_tokens = Counter("neuron_prompt_tokens", "prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("neuron_generation_tokens", "tokens generated (finished or not)", ["model"],
                                         registry=r)
        self.ttft = Histogram("neuron_time_to_first_token_seconds", "from the Generate call reaching the neuron to "
                              "its first token (queue and prefill)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.interceptor = _GenerateInterceptor(self)

    # What one generation streamed and how it ended; Generate calls (through the interceptor) and
    # GenerateStream's generations report the same way.
    def tokens(self, model: str, count: int, first_after_s: float | None = None) -> None:
        if count:
            self.generation_tokens.labels(model).inc(count)
        if first_after_s is not None:
            self.ttft.labels(model).observe(first_after_s)

    def ended(self, model: str, code: str, prompt_tokens: int = 0) -> None:
        self.requests.labels(model, code).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)


class _GenerateInterceptor(grpc.aio.ServerInterceptor):
    """Counts what each Generate call streamed and how it ended, without touching the handler."""

    def __init__(self, metrics: NeuronMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method != GENERATE:
            return handler
        return rewrap_handler(handler, self._observe)

    def _observe(self, behavior):
        m = self.metrics

        async def observed(request, context):
            model, started, first, code, prompt = m.model_of(request.handle), time.perf_counter(), True, "CANCELLED", 0
            try:
                async for reply in behavior(request, context):
                    if reply.token_ids:
                        m.tokens(model, len(reply.token_ids), time.perf_counter() - started if first else None)
                        first = False
                    if reply.finish_reason:
                        prompt = reply.usage.prompt_tokens
                    yield reply
                code = "OK"
            except grpc.aio.AbortError:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                m.ended(model, code, prompt)
        return observed
