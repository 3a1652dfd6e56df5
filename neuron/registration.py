"""Self-registration with cortex: Register once, then Heartbeat; register again whenever cortex
forgets us (restart) or cannot be reached for a while."""
from __future__ import annotations

import asyncio
import socket
import time

import grpc
import structlog

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.rpc.channels import PLAINTEXT, ChannelSecurity, aio_channel

from . import __version__

log = structlog.get_logger(__name__)

UNREACHABLE_LOG_SECONDS = 60.0  # while cortex stays unreachable, how often the warning repeats


async def keep_registered(cortex_address: str, advertise: str, stop: asyncio.Event, interval: float = 2.0,
                          channels: ChannelSecurity = PLAINTEXT) -> None:
    """Until stop is set: register, then heartbeat every interval (as cortex asks). While cortex
    cannot be reached, retry every interval, logging the first failure and then once a minute."""
    async with aio_channel(cortex_address, channels) as channel:
        fleet = cortex_pb2_grpc.FleetStub(channel)
        registered = False
        failing_since = logged_at = None
        while not stop.is_set():
            try:
                if not registered:
                    reply = await fleet.Register(cpb.RegisterRequest(address=advertise, host=socket.gethostname(),
                                                                     version=__version__), timeout=5)
                    interval = reply.heartbeat_interval_s or interval
                    registered = True
                    log.info("registered with cortex", cortex=cortex_address, address=advertise)
                else:
                    reply = await fleet.Heartbeat(cpb.HeartbeatRequest(address=advertise), timeout=5)
                    registered = reply.known
                failing_since = None
            except grpc.aio.AioRpcError as err:
                now = time.monotonic()
                failing_since = failing_since or now
                if logged_at is None or logged_at < failing_since or now - logged_at >= UNREACHABLE_LOG_SECONDS:
                    logged_at = now
                    log.warning("cortex unreachable; retrying", cortex=cortex_address, code=err.code().name,
                                error=err.details(), retry_seconds=interval,
                                failing_seconds=round(now - failing_since, 1))
                registered = False
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
