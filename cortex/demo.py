"""`cortex demo`: the whole system on one machine with no GPU and no checkpoint.

Starts two neurons (one CPU device each) and a cortex that manages them, as local processes on
loopback ports they pick themselves; writes a small random-weight Llama with a tokenizer unless a
checkpoint is given; loads it through cortex, streams a generation, asks for logits, unloads, and
shuts everything down with SIGTERM, checking that every process exits cleanly.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from common.units import human_bytes

from .client import CortexClient, model_state, node_state
from .commands import ProgressBar
from .local import LocalServer, ServerFailed, cortex_args, neuron_args, start_server
from .tiny_checkpoint import SHAPES, write_checkpoint
from common.proto.cortex.v1 import cortex_pb2 as cpb

NEURONS = 2
STARTUP_TIMEOUT_S = 60.0


def say(step: str, text: str) -> None:
    print(f"  {step:<10} {text}", flush=True)


def run_demo(model: str | None = None, prompt: str = "The cortex places models on", max_tokens: int = 48,
             keep_running: bool = False) -> int:
    # SIGTERM (docker stop, timeout) shuts down as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="cortex-demo-"))
    logs = work / "logs"
    servers: list[LocalServer] = []
    ok = False
    print("cortex demo: a cortex and two neurons on this machine, CPU only")
    try:
        root, path = _checkpoint(work, model)
        servers += _start_fleet(root, logs)
        cortex = servers[-1]
        with CortexClient(cortex.address, timeout=30) as client:
            _wait_for_fleet(client)
            name = Path(path).name
            _load(client, path, name)
            _generate(client, name, prompt, max_tokens)
            logits = client.forward(name, [1, 2, 3])
            say("forward", f"logits for token ids [1, 2, 3]: shape {list(logits.shape)}, "
                           f"top token {int(logits.argmax())}")
            if keep_running:
                _wait_for_interrupt(cortex, name)
            freed = client.unload(name)
            say("unload", f"{name}: freed {human_bytes(freed)}")
        ok = True
    except grpc.RpcError as err:
        print(f"\ndemo failed: {err.code().name}: {err.details()}", file=sys.stderr)
    except ServerFailed as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        ok = _shutdown(servers) and ok
    if ok:
        shutil.rmtree(work, ignore_errors=True)
        print("done: every process exited cleanly")
        return 0
    for server in servers:
        print(f"\n--- last lines of {server.name}'s log ({server.log_path}):\n{server.logs(20)}", file=sys.stderr)
    print(f"\nlogs kept in {logs}", file=sys.stderr)
    return 1


def _checkpoint(work: Path, model: str | None) -> tuple[Path, str]:
    """(model root for the neurons, checkpoint path to load)."""
    if model:
        directory = Path(model).expanduser().resolve()
        if not (directory / "config.json").exists() and not (directory / "snapshots").is_dir():
            raise SystemExit(f"cortex demo: {model} is not a checkpoint directory (no config.json)")
        say("checkpoint", f"{directory}")
        return directory.parent, str(directory)
    written = write_checkpoint(work / "models" / "tiny-llama", SHAPES["tiny"], dtype="float32", readable=True)
    say("checkpoint", f"wrote a {written.describe()} to {written.path} in {written.seconds:.2f}s")
    return work / "models", str(written.path)


def _start_fleet(root: Path, logs: Path) -> list[LocalServer]:
    servers = []
    # The neurons share this machine's memory: each gets its share as its CPU device's budget,
    # rather than each advertising all of it.
    share_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / NEURONS / 1e9, 3)
    for i in range(1, NEURONS + 1):
        started = time.perf_counter()
        neuron = start_server(f"neuron-{i}", "neuron.cli", neuron_args("cpu:0", [root], cpu_memory_gb=share_gb),
                              logs, STARTUP_TIMEOUT_S)
        servers.append(neuron)
        say(f"neuron {i}", f"{neuron.address}  device cpu:0  pid {neuron.pid}  "
                           f"serving after {time.perf_counter() - started:.2f}s")
    started = time.perf_counter()
    cortex = start_server("cortex", "cortex.cli", cortex_args([n.address for n in servers], poll_seconds=0.5),
                          logs, STARTUP_TIMEOUT_S)
    servers.append(cortex)
    say("cortex", f"{cortex.address}  pid {cortex.pid}  serving after {time.perf_counter() - started:.2f}s, "
                  f"managing {', '.join(n.address for n in servers[:-1])}")
    return servers


def _wait_for_fleet(client: CortexClient) -> None:
    deadline = time.monotonic() + 10
    while True:
        nodes = client.nodes()
        if sum(n.state == cpb.NODE_STATE_UP for n in nodes) == NEURONS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for n in nodes:
        devices = ", ".join(f"{d.id} ({human_bytes(d.free_bytes)} free)" for d in n.devices)
        say("fleet", f"{n.address} {node_state(n)} {n.reason} devices: {devices}")


def _load(client: CortexClient, path: str, name: str) -> None:
    started = time.perf_counter()
    bar = ProgressBar(sys.stdout)
    info = None
    for event in client.load_stream(path, name):
        if isinstance(event, cpb.ModelInfo):
            info = event
        elif event.message:
            bar.note(f"  {'load':<10} {event.message}")
        else:
            bar.update(event)
    bar.clear()
    where = ", ".join(f"node {p.node} device {p.device} (handle {p.handle})" for p in info.placement)
    say("load", f"{name} {model_state(info)} on {where}: {human_bytes(info.weight_bytes)} weights + "
                f"{human_bytes(info.kv_bytes)} KV cache, context {info.max_context}, "
                f"in {time.perf_counter() - started:.2f}s")


def _generate(client: CortexClient, name: str, prompt: str, max_tokens: int) -> None:
    say("generate", f"prompt {prompt!r}, up to {max_tokens} tokens, temperature 0.8, repetition penalty 1.3, seed 0 "
                    "(random weights: expect letter salad)")
    print("\n    " + prompt, end="", flush=True)
    final = None
    for chunk in client.generate(name, prompt, max_tokens=max_tokens, temperature=0.8, seed=0,
                                 repetition_penalty=1.3, ignore_eos=True):
        print(chunk.text.replace("\n", "\n    "), end="", flush=True)
        final = chunk if chunk.finish_reason else final
    print("\n")
    t = final.timing
    say("generate", f"{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} generated tokens; first "
                    f"token after {t.time_to_first_token_ms:.1f} ms, {t.decode_tokens_per_second:.0f} tokens/s, "
                    f"stopped by {final.stop_reason}")


def _wait_for_interrupt(cortex: LocalServer, name: str) -> None:
    # The servers run in sessions of their own (local.py): Ctrl-C reaches only this process, so
    # the model is unloaded and the servers stopped in order, while they are still serving.
    try:
        print(f"\nservers keep running; try, in another terminal:\n"
              f"    cortex --cortex {cortex.address} nodes\n"
              f"    cortex --cortex {cortex.address} models\n"
              f"    cortex --cortex {cortex.address} generate {name} --prompt 'Hello'\n"
              f"press Ctrl-C to unload and shut down", flush=True)
        while cortex.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ninterrupted: unloading and shutting down", flush=True)


def _shutdown(servers: list[LocalServer]) -> bool:
    """SIGTERM in reverse start order (cortex first), wait, and report every exit code."""
    codes = [(s, s.stop()) for s in reversed(servers)]
    if codes:
        say("shutdown", "SIGTERM -> " + ", ".join(f"{s.name} exited {code}" for s, code in codes))
    return all(code == 0 for _, code in codes)
