"""`neuron serve`: start device workers and the gRPC server; register with cortex if asked."""
from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import structlog

from common.config import EXIT_USAGE, SERVER_SETTINGS, ConfigError, Setting, add_settings, listen_setting, resolve
from common.heap import freeze_heap
from common.logs import configure_logging
from common.security.settings import ServerSecurity, cluster_settings
from common.server import ServingServer, stop_on_signals

from common.metrics import listen_or_off, serve_metrics

from .comm_tcp import Rendezvous
from .device import parse_devices, system_memory_bytes
from .engine.settings import EngineSettings
from .health import DeviceWatch
from .limits import LIMIT_SETTINGS, Limits
from .metrics import NeuronMetrics
from .registration import keep_registered
from .server import ACCESS, NeuronService
from common.proto.neuron.v1 import neuron_pb2_grpc
from .worker import DeviceWorker

log = structlog.get_logger("neuron")

DEFAULT_ENGINE = EngineSettings()

STOP_GRACE_SECONDS = 2.0    # after the drain: time for the final statuses to reach callers
WORKER_STOP_SECONDS = 20.0  # a worker that takes longer to stop makes the neuron exit non-zero

SETTINGS = [
    listen_setting("127.0.0.1:50061"),  # loopback until told otherwise: an open server stays on this machine
    Setting("devices", "", "devices: cpu | cpu:0,cpu:1,... | 0,1,... (GPU indices); empty: all GPUs, else cpu"),
    Setting("model_root", ["models"], "directory that checkpoints must live under (repeatable)", multiple=True),
    Setting("cortex", "", "cortex address to register with and heartbeat to (HOST:PORT)"),
    Setting("advertise", "", "address cortex should use to reach this neuron; default: the listen host if specific, else HOSTNAME, with the bound port"),
    Setting("cpu_memory_gb", 0.0, "memory budget per CPU device in GB; 0: system memory / CPU devices", type=float,
            minimum=0.0),
    Setting("heartbeat_seconds", 2.0, "heartbeat interval towards cortex", type=float),
    Setting("metrics_listen", "127.0.0.1:9400", "address of the Prometheus /metrics endpoint (HOST:PORT; port 0 "
            "picks a free one; empty or off: none)"),
    Setting("kv_memory_fraction", DEFAULT_ENGINE.kv_memory_fraction,
            "share of a device's memory left after weights and workspace that becomes KV cache blocks "
            "(at most max_seqs x max_context tokens on a CPU, 4x that on a GPU)", type=float),
    Setting("block_size", DEFAULT_ENGINE.block_size, "tokens per KV cache block", type=int),
    Setting("max_batched_tokens", DEFAULT_ENGINE.max_batched_tokens,
            "tokens one engine turn computes over all requests (prefills are chunked to fit)", type=int),
    Setting("max_seqs", DEFAULT_ENGINE.max_seqs, "requests running at once per shard (a load may ask fewer)", type=int),
    Setting("max_waiting", DEFAULT_ENGINE.max_waiting,
            "requests per shard waiting to start (not yet running); more are refused with RESOURCE_EXHAUSTED", type=int),
    Setting("prefix_caching", DEFAULT_ENGINE.prefix_caching,
            "keep full KV blocks by content so a repeated prompt prefix is not recomputed; "
            "--no-prefix-caching (or NEURON_PREFIX_CACHING=0) turns it off", type=bool),
    Setting("max_prefill_chunk", DEFAULT_ENGINE.max_prefill_chunk,
            "while requests are decoding, prompt tokens one request computes per turn (a long prompt then "
            "delays each running stream's next token by one such chunk, not a whole turn budget); 0: no cap",
            type=int, minimum=0),
    Setting("cuda_graphs", DEFAULT_ENGINE.cuda_graphs,
            "on GPUs, capture decode turns as CUDA graphs per batch-size bucket at load (single-device shards; "
            "a capture that fails is logged and those turns run eagerly); --no-cuda-graphs turns it off",
            type=bool),
    Setting("mixed_graphs", DEFAULT_ENGINE.mixed_graphs,
            "with cuda_graphs and max_prefill_chunk > 0, also capture turns of decode rows (or none) plus one prompt "
            "chunk of up to max_prefill_chunk tokens (a long prompt's admission while others decode, a short prompt "
            "alone), so those turns replay a graph instead of launching eagerly; --no-mixed-graphs turns it off",
            type=bool),
    Setting("async_scheduling", DEFAULT_ENGINE.async_scheduling,
            "while a decode turn runs on the device, plan the next one and queue it behind, its tokens taken "
            "from the running turn's samples on the device, so a turn's host work overlaps the next turn "
            "(single-device shards); --no-async-scheduling turns it off", type=bool),
    Setting("one_row_gemv", DEFAULT_ENGINE.one_row_gemv,
            "on GPUs, a turn of one token (one stream decoding) runs its products through GEMV kernels that take "
            "the norm into their input and the silu or the residual add into their output, replayed with "
            "programmatic launches (single-device shards); --no-one-row-gemv runs it "
            "through cuBLAS and separate kernels, as larger turns", type=bool),
    Setting("watchdog_seconds", 60.0, "a device that holds work but finishes no turn for this long is reported "
            "stalled (health NOT_SERVING, Describe's device error); 0: off", type=float),
    Setting("worker_failure_exit_seconds", 5.0, "after a device worker died (a bug), exit non-zero this much "
            "later so the supervisor restarts the neuron", type=float),
    *LIMIT_SETTINGS,
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
    try:
        settings = resolve(args, SETTINGS, "NEURON", args.config)
        check_model_roots(settings["model_root"])
        security = ServerSecurity.from_settings(settings)
    except ConfigError as err:
        print(f"neuron: {err}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings["log_level"], settings["log_format"])
    try:
        return asyncio.run(serve_forever(settings, security))
    except KeyboardInterrupt:
        return 0
    except OSError as err:  # e.g. the port is taken: one line, not a traceback
        print(f"neuron: {err}", file=sys.stderr)
        return 1


def check_model_roots(roots: list[str]) -> None:
    """Refuse to start with a model root that is not a directory: every load would be NOT_FOUND."""
    for root in roots:
        if not Path(root).is_dir():
            what = "is not a directory" if Path(root).exists() else "does not exist"
            raise ConfigError(f"model root {root!r} {what} (--model-root / NEURON_MODEL_ROOT): give the directory "
                              "that holds the checkpoints")


def build_workers(settings: dict) -> list[DeviceWorker]:
    try:
        specs = parse_devices(settings["devices"])
    except ValueError as err:
        raise SystemExit(f"neuron: --devices: {err}") from None
    cpu_count = sum(1 for s in specs if s.kind == "cpu") or 1
    budget = int(settings["cpu_memory_gb"] * 1e9) or system_memory_bytes() // cpu_count
    engine = EngineSettings(kv_memory_fraction=settings["kv_memory_fraction"], block_size=settings["block_size"],
                            max_batched_tokens=settings["max_batched_tokens"], max_seqs=settings["max_seqs"],
                            max_waiting=settings["max_waiting"], prefix_caching=settings["prefix_caching"],
                            cuda_graphs=settings["cuda_graphs"], max_prefill_chunk=settings["max_prefill_chunk"],
                            async_scheduling=settings["async_scheduling"], one_row_gemv=settings["one_row_gemv"],
                            mixed_graphs=settings["mixed_graphs"])
    try:
        engine.check()
    except ValueError as err:
        raise SystemExit(f"neuron: {err}") from None
    workers = [DeviceWorker(spec, budget, engine) for spec in specs]
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


async def serve_forever(settings: dict, security: ServerSecurity) -> int:
    workers = build_workers(settings)
    roots = [Path(r).resolve() for r in settings["model_root"]]
    # Describe stays answerable while draining, so cortex and operators can still see the node.
    service = NeuronService(workers, roots, peer_channels=security.peer_channels(), rendezvous=rendezvous(security))
    service.group_bind_host = _specific_host(settings["listen"])
    service.stall_seconds = settings["watchdog_seconds"]
    service.limits = Limits.from_settings(settings)
    metrics = NeuronMetrics(workers, service.model_of)
    service.metrics = metrics
    server = ServingServer(settings["listen"], allow_while_draining=("/neuron.v1.Neuron/Describe",),
                           interceptors=(security.interceptor(ACCESS), metrics.interceptor),
                           max_inflight=settings["max_inflight_calls"], credentials=security.server_credentials())
    server.add(neuron_pb2_grpc.add_NeuronServicer_to_server, service, "neuron.v1.Neuron")
    service.drain_message = lambda: server.drain_message if server.draining else ""
    port = await server.start()
    metrics_runner, metrics_listen = None, listen_or_off(settings["metrics_listen"])
    if metrics_listen:
        try:
            metrics_runner, metrics_port = await serve_metrics(metrics.registry, metrics_listen)
        except OSError as err:
            await server.stop(0)
            raise OSError(f"--metrics-listen: {err}") from None
        log.info("metrics serving", listen=metrics_listen, port=metrics_port)
    service.advertise = settings["advertise"] or default_advertise(settings["listen"], port)
    stop = stop_on_signals()   # before the port file says the server is up
    if settings["port_file"]:
        Path(settings["port_file"]).write_text(str(port))
    freeze_heap()   # what startup built lives as long as the process: out of the collector's walks
    log.info("neuron serving", listen=settings["listen"], port=port, devices=[w.spec.id for w in workers],
             model_roots=[str(r) for r in roots], advertise=service.advertise)
    security.warn_if_open("neuron", takes_api_keys=False)

    exit_code = 0

    def exit_for_dead_worker() -> None:
        nonlocal exit_code
        exit_code = 1
        stop.set()

    watch = DeviceWatch(workers, server.set_serving, lambda: server.draining, exit_for_dead_worker,
                        settings["watchdog_seconds"], settings["worker_failure_exit_seconds"])
    watching = asyncio.create_task(watch.run(), name="device-watch")
    registration = None
    if settings["cortex"]:
        registration = asyncio.create_task(
            keep_registered(settings["cortex"], service.advertise, stop, settings["heartbeat_seconds"],
                            security.peer_channels()))
    await stop.wait()
    watching.cancel()
    try:
        code = await shut_down(server, workers, registration, settings["drain_seconds"])
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    return max(code, exit_code)


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
