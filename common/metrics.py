"""Prometheus exposition shared by both servers: the /metrics response, a small HTTP listener for
processes without another HTTP port (the neuron), and the "off" spelling of listen settings.

Each server builds its own CollectorRegistry (never prometheus_client's global one), so several
servers in one process (tests, the demo) keep separate figures.
"""
from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest

# No `*_created` series beside every counter and histogram: scrapers do not need them, and they
# double the exposition. (A process-wide switch of prometheus_client.)
disable_created_metrics()

OFF_VALUES = ("", "off", "none")  # an empty environment variable reads as unset, so "off" is accepted too

# Latency buckets in seconds: from a fast GPU's inter-token gap to a long CPU generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


def listen_or_off(value: str) -> str:
    """The address to listen on, or "" when the setting turns the listener off."""
    return "" if value.strip().lower() in OFF_VALUES else value.strip()


def split_host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise OSError(f"cannot listen on {listen!r}: give HOST:PORT (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_site(app: web.Application, listen: str, ssl_context=None, **runner_options
                     ) -> tuple[web.AppRunner, int]:
    """Serve `app` on `listen` inside the running event loop (HTTPS with ssl_context); returns the
    runner and the bound port."""
    host, port = split_host_port(listen)
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"cannot listen on {listen}: {err.strerror or err}") from None
    return runner, runner.addresses[0][1]


async def serve_metrics(registry: CollectorRegistry, listen: str) -> tuple[web.AppRunner, int]:
    """A listener that answers GET /metrics (and nothing else) from `registry`."""
    app = web.Application()
    app.router.add_get("/metrics", lambda request: metrics_response(registry))
    return await start_site(app, listen)
