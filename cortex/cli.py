"""`cortex`: the coordinator server (`cortex serve`), client subcommands for a running cortex, and
`cortex demo`.

    cortex serve --listen 0.0.0.0:50051 --neuron gpu-host-1:50061
    cortex [--cortex ADDR] [--json] nodes | models | load PATH --name NAME | unload NAME |
           generate NAME --prompt TEXT | forward NAME --tokens 1,2,3 --output FILE.npy | health [ADDR]
    cortex demo
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import structlog

from common.config import EXIT_USAGE, SERVER_SETTINGS, ConfigError, Setting, add_settings, listen_setting, resolve
from common.errors import ServiceError
from common.heap import freeze_heap
from common.logs import configure_logging
from common.security.settings import API_KEYS_SETTING, ServerSecurity, cluster_settings
from common.server import ServingServer, stop_on_signals

log = structlog.get_logger("cortex")

DEFAULT_ADDRESS = "127.0.0.1:50051"
STOP_GRACE_SECONDS = 1.0  # after the drain: lets final statuses reach the callers before the server closes

SETTINGS = [
    listen_setting("127.0.0.1:50051"),  # loopback until told otherwise: an open server stays on this machine
    Setting("http_listen", "127.0.0.1:8000", "address of the OpenAI-compatible HTTP API and /metrics (HOST:PORT; "
            "port 0 picks a free one; empty or off: no HTTP); HTTPS with --tls-cert, the same API keys"),
    Setting("neuron", [], "neuron to manage besides those that register themselves (HOST:PORT, repeatable)",
            multiple=True),
    Setting("poll_seconds", 2.0, "how often every neuron's Describe is polled", type=float),
    Setting("heartbeat_timeout_seconds", 6.0,
            "a registered neuron without a heartbeat for this long is down (it is asked to send one "
            "every third of it)", type=float),
    Setting("down_expiry_seconds", 600.0, "a registered neuron that stays down this long is forgotten (it is listed "
            "again when it registers again); 0: never", type=float, minimum=0.0),
    Setting("group_timeout_seconds", 30.0, "deadline for all ranks of a tensor-parallel group to join", type=float),
    Setting("max_prompt_bytes", 1 << 20, "largest text or chat prompt in bytes cortex forwards; larger ones are "
            "INVALID_ARGUMENT", type=int),
    Setting("stream_interval", 1, "tokens a generation's streamed messages carry, after its first token (sent at "
            "once) and before its last: 1 sends each token as it comes; n > 1 holds later tokens up to n - 1 "
            "turns, for fewer messages (cortex's CPU under load goes mostly to per-message work)", type=int,
            minimum=1),
    Setting("max_stream_interval", 4, "the most tokens a streamed message carries while cortex's event loop is "
            "saturated: the interval rises one step at a time from stream_interval while the loop uses >= 80% of a "
            "core and falls back below 50%; at or below stream_interval the interval is fixed", type=int,
            minimum=1),
    Setting("max_logits_bytes", 64 << 20, "largest float32 logits one Forward may return (positions x vocab x 4); "
            "larger asks are RESOURCE_EXHAUSTED", type=int),
    API_KEYS_SETTING,
    *cluster_settings(require_client_cert_default=False),  # clients without a certificate use API keys
    *SERVER_SETTINGS,
]


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(prog="cortex", description="cortex: coordinator of the cortex/neuron "
                                     "inference service, and its command-line client")
    # Client options are accepted before or after the subcommand. The subcommands' copies default
    # to SUPPRESS, so that they do not overwrite a value given before the subcommand.
    _add_client_options(parser, suppress=False)
    client_options = argparse.ArgumentParser(add_help=False)
    _add_client_options(client_options, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the coordinator")
    serve.add_argument("--config", help="TOML file with settings (flags and CORTEX_* env override it)")
    add_settings(serve, SETTINGS, "CORTEX")

    commands.add_subcommands(sub, client_options)

    demo = sub.add_parser("demo", help="start a cortex and two CPU neurons locally, load a model, generate")
    demo.add_argument("--model", help="checkpoint directory to use (default: write a small random-weight Llama)")
    demo.add_argument("--prompt", default="The cortex places models on", help="prompt to generate from")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--keep-running", action="store_true",
                      help="after the demo, keep the servers running until Ctrl-C, to try the CLI against them")
    return parser


def _add_client_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--cortex", default=default(os.environ.get("CORTEX_ADDRESS", DEFAULT_ADDRESS)),
                        help=f"cortex address (env CORTEX_ADDRESS; default {DEFAULT_ADDRESS})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output: JSON (one object per line for streams)")
    parser.add_argument("--timeout", type=float, default=default(None),
                        help="deadline of the call in seconds (default: none)")
    # dest client_*: `cortex serve` has server settings of the same flag names.
    parser.add_argument("--api-key", dest="client_api_key", default=default(os.environ.get("CORTEX_API_KEY", "")),
                        help="API key sent as `authorization: Bearer KEY` (env CORTEX_API_KEY)")
    for name, what in (("ca", "CA bundle (PEM) that verifies the server; turns TLS on"),
                       ("cert", "client certificate (PEM) to present, with --tls-key"),
                       ("key", "private key (PEM) of --tls-cert")):
        env = f"CORTEX_TLS_{name.upper()}"
        parser.add_argument(f"--tls-{name}", dest=f"client_tls_{name}", default=default(os.environ.get(env, "")),
                            help=f"{what} (env {env})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = resolve(args, SETTINGS, "CORTEX", args.config)
            security = ServerSecurity.from_settings(settings)
        except ConfigError as err:
            print(f"cortex: {err}", file=sys.stderr)
            return EXIT_USAGE
        configure_logging(settings["log_level"], settings["log_format"])
        try:
            return asyncio.run(serve_forever(settings, security))
        except KeyboardInterrupt:
            return 0
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(model=args.model, prompt=args.prompt, max_tokens=args.max_tokens,
                        keep_running=args.keep_running)
    from .commands import run_command
    return run_command(args)


async def serve_forever(settings: dict, security: ServerSecurity) -> int:
    from .model_health import ModelHealth
    from .models import ModelTable
    from .placement import Placer
    from .registry import Registry
    from .http.app import HttpFront
    from .metrics import CortexMetrics
    from .server import ACCESS, CortexService, FleetService
    from .stream_pacing import StreamPacer
    from common.metrics import listen_or_off
    from common.proto.cortex.v1 import cortex_pb2_grpc

    try:
        registry = Registry(settings["neuron"], settings["poll_seconds"], settings["heartbeat_timeout_seconds"],
                            settings["down_expiry_seconds"], channels=security.peer_channels())
    except ServiceError as err:  # a malformed --neuron address
        print(f"cortex: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    models = ModelTable(registry, Placer(), settings["group_timeout_seconds"])
    # Listings and the neurons' own calls stay answerable while draining.
    server = ServingServer(settings["listen"], allow_while_draining=(
        "/cortex.v1.Cortex/ListNodes", "/cortex.v1.Cortex/ListModels", "/cortex.v1.Fleet/Register",
        "/cortex.v1.Fleet/Heartbeat"), max_inflight=settings["max_inflight_calls"],
        credentials=security.server_credentials(), interceptors=(security.interceptor(ACCESS),))
    model_health = ModelHealth(server.health)

    async def after_poll() -> None:
        models.adopt()  # models still on the neurons after a cortex restart
        await model_health.publish(models.states())  # health service `model/<name>`
    registry.after_poll = after_poll
    publishing: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references)

    def publish_model_health() -> None:
        task = asyncio.ensure_future(model_health.publish(models.states()))
        publishing.add(task)
        task.add_done_callback(publishing.discard)
    models.on_change = publish_model_health
    metrics = CortexMetrics()
    metrics.watch_fleet(registry, models)
    service = CortexService(registry, models, metrics)
    service.max_prompt_bytes, service.max_logits_bytes = settings["max_prompt_bytes"], settings["max_logits_bytes"]
    service.pacer = StreamPacer(settings["stream_interval"], max(settings["stream_interval"],
                                                                 settings["max_stream_interval"]))
    metrics.watch_pacer(service.pacer)
    pacing = asyncio.create_task(service.pacer.run()) if service.pacer.adaptive else None
    server.add(cortex_pb2_grpc.add_CortexServicer_to_server, service, "cortex.v1.Cortex")
    server.add(cortex_pb2_grpc.add_FleetServicer_to_server, FleetService(registry), "cortex.v1.Fleet")
    await registry.start()
    try:
        port = await server.start()
    except (OSError, RuntimeError):  # grpc raises RuntimeError when it cannot bind
        await registry.close()
        raise SystemExit(f"cortex: cannot listen on {settings['listen']}: the address is in use or invalid") from None
    http, http_listen = HttpFront(service, security.authenticator()), listen_or_off(settings["http_listen"])
    if http_listen:
        try:
            http_port = await http.start(http_listen, security.https_context())
        except OSError as err:
            await server.stop(0)
            await registry.close()
            raise SystemExit(f"cortex: --http-listen: {err}") from None
        log.info("http serving", listen=http_listen, port=http_port)
    stop = stop_on_signals()   # before the port file says the server is up
    if settings["port_file"]:
        Path(settings["port_file"]).write_text(str(port))
    freeze_heap()   # what startup built lives as long as the process: out of the collector's walks
    log.info("cortex serving", listen=settings["listen"], port=port, static_neurons=settings["neuron"],
             poll_seconds=settings["poll_seconds"], heartbeat_timeout_seconds=settings["heartbeat_timeout_seconds"])
    security.warn_if_open("cortex", takes_api_keys=True)

    await stop.wait()

    # SIGTERM: health NOT_SERVING and new calls refused with UNAVAILABLE at once; streams in flight
    # get drain_seconds to finish; what still runs then is cancelled, which cancels its neuron calls.
    log.info("draining", seconds=settings["drain_seconds"], inflight=server.inflight)
    left, http_left = await asyncio.gather(
        server.drain(settings["drain_seconds"], "cortex is shutting down (draining): it takes no new "
                                                "requests; retry against another cortex or once it is back"),
        http.drain(settings["drain_seconds"]))
    left += http_left
    if left:
        log.warning("drain time is over: cancelling the requests still in flight", inflight=left)
    await asyncio.gather(server.stop(STOP_GRACE_SECONDS), http.stop())
    if pacing is not None:
        pacing.cancel()
    await registry.close()
    log.info("cortex stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
