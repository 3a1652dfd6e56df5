"""`neuron serve`: start device workers and the gRPC server; register with cortex if asked."""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

import structlog

from common.config import SERVER_SETTINGS, Setting, add_settings, listen_setting, resolve
from common.logs import configure_logging
from common.security.settings import ServerSecurity, cluster_settings
from common.server import ServingServer

from .comm_tcp import Rendezvous
from .device import parse_devices, system_memory_bytes
from .registration import keep_registered
from .server import ACCESS, NeuronService
from common.proto.neuron.v1 import neuron_pb2_grpc
from .worker import DeviceWorker

log = structlog.get_logger("neuron")

STOP_GRACE_SECONDS = 2.0    # after the drain: time for the final statuses to reach callers
WORKER_STOP_SECONDS = 20.0  # a worker that takes longer to stop makes the neuron exit non-zero

SETTINGS = [
    listen_setting("0.0.0.0:50061"),
    Setting("devices", "", "devices: cpu | cpu:0,cpu:1,... | 0,1,... (GPU indices); empty: all GPUs, else cpu"),
    Setting("model_root", ["models"], "directory that checkpoints must live under (repeatable)", multiple=True),
    Setting("cortex", "", "cortex address to register with and heartbeat to (HOST:PORT)"),
    Setting("advertise", "", "address cortex should use to reach this neuron; default: the listen host if specific, else HOSTNAME, with the bound port"),
    Setting("cpu_memory_gb", 0.0, "memory budget per CPU device in GB; 0: system memory / CPU devices", type=float),
    Setting("heartbeat_seconds", 2.0, "heartbeat interval towards cortex", type=float),
    *cluster_settings(require_client_cert_default=True),  # with --tls-ca: only cortex and peer neurons get in
    *SERVER_SETTINGS,
]


def build_parser() -> argparse.ArgumentParser:
    """The `neuron` command line (also inspected by tests that check the Docker/compose files)."""
    parser = argparse.ArgumentParser(prog="neuron", description="neuron: GPU node agent of the cortex/neuron service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the node agent")
    serve.add_argument("--config", help="TOML file with settings (flags and NEURON_* env override it)")
    add_settings(serve, SETTINGS, "NEURON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve(args, SETTINGS, "NEURON", args.config)
    configure_logging(settings["log_level"], settings["log_format"])
    try:
        return asyncio.run(serve_forever(settings))
    except KeyboardInterrupt:
        return 0
    except OSError as err:  # e.g. the port is taken: one line, not a traceback
        print(f"neuron: {err}", file=sys.stderr)
        return 1


def build_workers(settings: dict) -> list[DeviceWorker]:
    try:
        specs = parse_devices(settings["devices"])
    except ValueError as err:
        raise SystemExit(f"neuron: --devices: {err}") from None
    cpu_count = sum(1 for s in specs if s.kind == "cpu") or 1
    budget = int(settings["cpu_memory_gb"] * 1e9) or system_memory_bytes() // cpu_count
    workers = [DeviceWorker(spec, budget) for spec in specs]
    for w in workers:
        w.start()
    return workers


def _specific_host(listen: str) -> str:
    host = listen.rsplit(":", 1)[0].strip("[]")
    return "" if host in ("", "0.0.0.0", "::", "*") else host


def default_advertise(listen: str, port: int) -> str:
    """The listen host when it is a specific address, else this host's name."""
    return f"{_specific_host(listen) or socket.gethostname()}:{port}"


def rendezvous(security: ServerSecurity) -> Rendezvous:
    """The CPU collectives' trust: the cluster token, and TLS with the same files as gRPC."""
    tls = security.tls
    return Rendezvous(security.cluster_token,
                      tls.ssl_server_context(security.require_client_cert) if tls.serves_tls else None,
                      tls.ssl_client_context() if tls.dials_tls else None)


async def serve_forever(settings: dict) -> int:
    security = ServerSecurity.from_settings(settings, "neuron")
    workers = build_workers(settings)
    roots = [Path(r).resolve() for r in settings["model_root"]]
    # Describe stays answerable while draining, so cortex and operators can still see the node.
    server = ServingServer(settings["listen"], allow_while_draining=("/neuron.v1.Neuron/Describe",),
                           credentials=security.server_credentials(), interceptors=(security.interceptor(ACCESS),))
    service = NeuronService(workers, roots, peer_channels=security.peer_channels(), rendezvous=rendezvous(security))
    service.group_bind_host = _specific_host(settings["listen"])
    server.add(neuron_pb2_grpc.add_NeuronServicer_to_server, service, "neuron.v1.Neuron")
    port = await server.start()
    service.advertise = settings["advertise"] or default_advertise(settings["listen"], port)
    if settings["port_file"]:
        Path(settings["port_file"]).write_text(str(port))
    log.info("neuron serving", listen=settings["listen"], port=port, devices=[w.spec.id for w in workers],
             model_roots=[str(r) for r in roots], advertise=service.advertise)
    security.warn_if_open("neuron", takes_api_keys=False)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registration = None
    if settings["cortex"]:
        registration = asyncio.create_task(
            keep_registered(settings["cortex"], service.advertise, stop, settings["heartbeat_seconds"],
                            security.peer_channels()))
    await stop.wait()
    return await shut_down(server, workers, registration, settings["drain_seconds"])


async def shut_down(server: ServingServer, workers: list[DeviceWorker], registration, drain_seconds: float) -> int:
    """SIGTERM: health NOT_SERVING and new calls refused with UNAVAILABLE at once; calls in flight
    get up to `drain_seconds` to finish; what still runs then ends with UNAVAILABLE; the workers
    release their device memory; exit 0 (1 if a worker would not stop, so a supervisor restarts)."""
    log.info("draining", seconds=drain_seconds, inflight=server.inflight)
    left = await server.drain(drain_seconds, "this neuron is shutting down (draining): it takes no new requests; "
                                             "retry on another node")
    if left:
        log.warning("drain time is over: ending the requests still in flight", inflight=left, seconds=drain_seconds)
    if registration:
        registration.cancel()
    # Stopping the workers ends running generations with UNAVAILABLE; the short grace lets those
    # final statuses reach the callers before the server closes.
    stopping = asyncio.gather(*(asyncio.to_thread(w.stop, WORKER_STOP_SECONDS) for w in workers),
                              return_exceptions=True)
    await server.stop(STOP_GRACE_SECONDS)
    failed = [(w.spec.id, repr(r)) for w, r in zip(workers, await stopping) if isinstance(r, BaseException)]
    if registration:
        await asyncio.gather(registration, return_exceptions=True)
    if failed:
        log.error("device workers did not stop; exiting non-zero so the supervisor restarts the neuron", failed=failed)
        return 1
    log.info("neuron stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
