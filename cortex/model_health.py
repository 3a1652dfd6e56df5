"""Per-model health on cortex's health service: `model/<name>` is SERVING while the model is READY
and NOT_SERVING otherwise (loading, a node or device down, failed), so a probe or load balancer can
watch one model (`grpcurl -d '{"service": "model/NAME"}' HOST:PORT grpc.health.v1.Health/Check`).
A model that leaves the table turns SERVICE_UNKNOWN."""
from __future__ import annotations

from grpc_health.v1 import health_pb2

from common.proto.cortex.v1 import cortex_pb2 as cpb

PREFIX = "model/"
_Status = health_pb2.HealthCheckResponse


class ModelHealth:
    def __init__(self, health_servicer):
        self.health = health_servicer
        self.published: dict[str, int] = {}

    async def publish(self, states: dict[str, int]) -> None:
        """Set every model's status from {name: model state}; only changes are written."""
        wanted = {name: _Status.SERVING if state == cpb.MODEL_STATE_READY else _Status.NOT_SERVING
                  for name, state in states.items()}
        wanted.update({name: _Status.SERVICE_UNKNOWN for name in set(self.published) - set(wanted)})
        for name, status in wanted.items():
            if self.published.get(name) != status:
                result = self.health.set(PREFIX + name, status)
                if hasattr(result, "__await__"):
                    await result
        self.published = {n: s for n, s in wanted.items() if s != _Status.SERVICE_UNKNOWN}
