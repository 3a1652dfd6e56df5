"""Self-registration with cortex: Register once, then Heartbeat; register again whenever cortex
forgets us (restart) or cannot be reached for a while."""
from __future__ import annotations

import asyncio
import socket

import grpc
import structlog

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.rpc.channels import PLAINTEXT, ChannelSecurity, aio_channel

from . import __version__

log = structlog.get_logger(__name__)


async def keep_registered(cortex_address: str, advertise: str, stop: asyncio.Event, interval: float = 2.0,
                          channels: ChannelSecurity = PLAINTEXT) -> None:
    async with aio_channel(cortex_address, channels) as channel:
        fleet = cortex_pb2_grpc.FleetStub(channel)
        registered = False
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
            except grpc.aio.AioRpcError as err:
                if registered:
                    log.warning("cortex unreachable", cortex=cortex_address, error=err.details())
                registered = False
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
