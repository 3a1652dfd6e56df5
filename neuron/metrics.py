"""The neuron's Prometheus metrics: per device, what its worker holds (memory, KV cache, sequences
running and waiting), read from the worker's cached figures at each scrape; and per model, the
Generate calls served, counted by a gRPC interceptor around the handler.

Only measured figures are published. The batching engine adds its own (KV blocks, prefix-cache
queries and hits, step duration) as more families in `DeviceCollector.collect`, read from the
figures its worker caches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.metrics import LATENCY_BUCKETS
from common.server import rewrap_handler

GENERATE = "/neuron.v1.Neuron/Generate"


@dataclass(frozen=True)
class ShardFigures:
    model: str
    kv_bytes: int
    kv_slots: int
    kv_slots_used: int


@dataclass(frozen=True)
class DeviceFigures:
    device: str
    kind: str
    total_bytes: int
    free_bytes: int
    running: int
    waiting: int
    shards: list[ShardFigures]


def device_figures(worker) -> DeviceFigures:
    """A worker's figures without waiting for its thread: its cached memory, and the sizes of the
    structures the device thread updates (each read is atomic; together they may be a step apart)."""
    shards = [ShardFigures(s.request.model, s.kv.nbytes, s.kv.slots, s.kv.slots - s.kv.free_slots)
              for s in list(worker.slab.values())]
    return DeviceFigures(worker.spec.id, worker.spec.kind, worker.memory.total, worker.memory.free,
                         len(worker._running), len(worker._waiting), shards)


class DeviceCollector(Collector):
    def __init__(self, workers: list):
        self.workers = workers

    def collect(self):
        def family(name, doc, labels):
            return GaugeMetricFamily(name, doc, labels=labels)

        total = family("neuron_device_memory_total_bytes", "memory of the device (a CPU device: its budget)",
                       ["device", "kind"])
        used = family("neuron_device_memory_used_bytes", "memory in use on the device", ["device", "kind"])
        running = family("neuron_requests_running", "sequences generating on the device", ["device"])
        waiting = family("neuron_requests_waiting", "requests queued on the device for a KV slot", ["device"])
        kv_bytes = family("neuron_kv_cache_bytes", "KV cache allocated for a shard", ["device", "model"])
        slots = family("neuron_kv_slots", "KV cache slots of a shard (concurrent sequences it can hold)",
                       ["device", "model"])
        slots_used = family("neuron_kv_slots_used", "KV cache slots held by running sequences", ["device", "model"])
        usage = family("neuron_kv_cache_usage_ratio", "fraction of the device's KV cache slots in use (0 to 1; "
                       "0 with no shard)", ["device"])
        for f in (device_figures(w) for w in self.workers):
            total.add_metric([f.device, f.kind], f.total_bytes)
            used.add_metric([f.device, f.kind], f.total_bytes - f.free_bytes)
            running.add_metric([f.device], f.running)
            waiting.add_metric([f.device], f.waiting)
            for s in f.shards:
                kv_bytes.add_metric([f.device, s.model], s.kv_bytes)
                slots.add_metric([f.device, s.model], s.kv_slots)
                slots_used.add_metric([f.device, s.model], s.kv_slots_used)
            held, held_used = sum(s.kv_slots for s in f.shards), sum(s.kv_slots_used for s in f.shards)
            usage.add_metric([f.device], held_used / held if held else 0.0)
        yield from (total, used, running, waiting, kv_bytes, slots, slots_used, usage)


class NeuronMetrics:
    def __init__(self, workers: list, model_of: Callable[[int], str]):
        """model_of(handle): the model name of a shard handle ("" if unknown)."""
        self.registry = CollectorRegistry()
        self.model_of = model_of
        r = self.registry
        r.register(DeviceCollector(workers))
        self.requests = Counter("neuron_requests", "Generate calls that ended, by gRPC status code",
                                ["model", "code"], registry=r)
        self.prompt_tokens = Counter("neuron_prompt_tokens", "prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("neuron_generation_tokens", "tokens generated (finished or not)", ["model"],
                                         registry=r)
        self.ttft = Histogram("neuron_time_to_first_token_seconds", "from the Generate call reaching the neuron to "
                              "its first token (queue and prefill)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.interceptor = _GenerateInterceptor(self)


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
                        m.generation_tokens.labels(model).inc(len(reply.token_ids))
                        if first:
                            m.ttft.labels(model).observe(time.perf_counter() - started)
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
                m.requests.labels(model, code).inc()
                if prompt:
                    m.prompt_tokens.labels(model).inc(prompt)
        return observed
