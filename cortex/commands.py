"""The client subcommands of `cortex`: talk to a running cortex and print what came back, as text
for people or as JSON (`--json`) for scripts. Results go to stdout, progress and statistics to
stderr, so `cortex generate ... > out.txt` captures only the text."""
from __future__ import annotations

import argparse
import json
import sys
import time

import grpc
import numpy as np
from google.protobuf import json_format

from common.dtypes import DTYPES
from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.units import human_bytes

from .client import CortexClient, check_health, finish_reason, model_state, node_state


def add_subcommands(sub, client_options: argparse.ArgumentParser) -> None:
    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[client_options])

    add("nodes", "list the neurons: state, devices, memory, shards")
    add("models", "list the models: state, placement, context")

    load = add("load", "load a checkpoint under a name (shows progress)")
    load.add_argument("path", help="checkpoint directory, as the neurons see it (relative: under their model root)")
    load.add_argument("--name", required=True, help="the name clients will use")
    load.add_argument("--dtype", default="", choices=["", *DTYPES],
                      help="weights dtype (default: the checkpoint's on GPUs, float32 on CPU)")
    load.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (devices)")
    load.add_argument("--max-context", type=int, default=0, help="longest sequence (default: the neuron's)")
    load.add_argument("--kv-slots", type=int, default=0,
                      help="requests the model runs at once (default: the neuron's --max-seqs, 256)")
    load.add_argument("--node", default="", help="load on this neuron only")
    load.add_argument("--device", default="", help="load on this device of --node")

    unload = add("unload", "unload a model from every device that holds it")
    unload.add_argument("name")

    generate = add("generate", "generate text, streamed to the terminal as it arrives")
    generate.add_argument("name", help="model name")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--chat", help="a user message, rendered with the model's chat template")
    prompt.add_argument("--tokens", help="prompt token ids, comma-separated")
    generate.add_argument("--max-tokens", type=int)
    generate.add_argument("--temperature", type=float, help="0: greedy")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--min-p", type=float)
    generate.add_argument("--repetition-penalty", type=float, help="1: off")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--stop-token-ids", help="stop token ids besides EOS, comma-separated")
    generate.add_argument("--request-id", default="", help="id for the logs and the replies (default: cortex makes one)")
    generate.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")

    forward = add("forward", "logits for token ids (scoring, diagnostics)")
    forward.add_argument("name", help="model name")
    forward.add_argument("--tokens", required=True, help="token ids, comma-separated")
    forward.add_argument("--output", help="write the logits to this .npy file")
    forward.add_argument("--all-positions", action="store_true", help="logits of every position, not only the last")

    health = add("health", "exit 0 when the server's gRPC health is SERVING (cortex or neuron)")
    health.add_argument("address", nargs="?", help="server address (default: --cortex)")


def run_command(args: argparse.Namespace) -> int:
    handler = COMMANDS[args.command]
    try:
        with CortexClient(args.cortex, timeout=args.timeout, api_key=args.client_api_key, tls_ca=args.client_tls_ca,
                          tls_cert=args.client_tls_cert, tls_key=args.client_tls_key) as client:
            return handler(client, args) or 0
    except grpc.RpcError as err:
        _progress_done()
        if args.json:
            print(json.dumps({"error": {"code": err.code().name, "message": err.details()}}))
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except ValueError as err:  # a malformed flag value the parser could not check (token lists)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _progress_done()
        return 130
    except BrokenPipeError:  # `cortex generate ... | head`
        return 0


# ---------------------------------------------------------------- output helpers

def to_dict(message) -> dict:
    # Proto3 JSON mapping, as grpcurl prints it: 64-bit integers are strings.
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def emit_json(value) -> None:
    print(json.dumps(value), flush=True)


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated token ids, e.g. 1,2,3 (got {text!r})") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"{flag} must list at least one non-negative token id (got {text!r})")
    return ids


class ProgressBar:
    """A load progress bar on stderr: redrawn in place on a terminal, one line per step otherwise."""

    WIDTH = 30

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.drawn = False
        self.last_line = ""
        self.started = time.perf_counter()

    def note(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream, flush=True)

    def update(self, p: cpb.LoadModelProgress) -> None:
        fraction = p.bytes_done / p.bytes_total if p.bytes_total else 0.0
        filled = int(fraction * self.WIDTH)
        where = f"rank {p.rank} {p.node} {p.device}" if p.node else ""
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%} "
                f"{human_bytes(p.bytes_done)} / {human_bytes(p.bytes_total)}  {p.shard.stage}  {where}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.drawn = True
        else:
            # Lines: at each stage change and every 10%, not at every tensor.
            key = f"{p.shard.stage} {int(fraction * 10)}"
            if key != self.last_line:
                self.last_line = key
                print(line, file=self.stream, flush=True)

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False


_active_bar: ProgressBar | None = None


def _progress_done() -> None:
    if _active_bar is not None:
        _active_bar.clear()


# ---------------------------------------------------------------- commands

def cmd_nodes(client: CortexClient, args) -> int:
    nodes = client.nodes()
    if args.json:
        emit_json({"nodes": [to_dict(n) for n in nodes]})
        return 0
    if not nodes:
        print("no neurons known: start one with `neuron serve --cortex ADDRESS` or give cortex --neuron")
        return 0
    rows = []
    for n in nodes:
        devices = ", ".join(f"{d.id} {human_bytes(d.free_bytes)}/{human_bytes(d.total_bytes)} free" for d in n.devices)
        shards = sum(len(d.shards) for d in n.devices)
        seen = f"{n.last_seen_seconds_ago:.1f}s ago" if n.last_seen_seconds_ago >= 0 else "never"
        rows.append([n.address, node_state(n), n.source, devices or "-", str(shards), seen,
                     n.reason])
    print(table(rows, ["ADDRESS", "STATE", "SOURCE", "DEVICES", "SHARDS", "SEEN", "REASON"]))
    return 0


def cmd_models(client: CortexClient, args) -> int:
    models = client.models()
    if args.json:
        emit_json({"models": [to_dict(m) for m in models]})
        return 0
    if not models:
        print("no models loaded: load one with `cortex load PATH --name NAME`")
        return 0
    rows = [[m.name, model_state(m), m.architecture, m.dtype, str(m.tp), str(m.max_context),
             human_bytes(m.weight_bytes), ", ".join(f"{p.node}/{p.device}" for p in m.placement) or "-", m.reason]
            for m in models]
    print(table(rows, ["NAME", "STATE", "ARCHITECTURE", "DTYPE", "TP", "CONTEXT", "WEIGHTS", "PLACEMENT", "REASON"]))
    return 0


def cmd_load(client: CortexClient, args) -> int:
    global _active_bar
    bar = _active_bar = ProgressBar()
    info = None
    for event in client.load_stream(args.path, args.name, dtype=args.dtype, tp=args.tp, max_context=args.max_context,
                             kv_slots=args.kv_slots, node=args.node, device=args.device, timeout=args.timeout):
        if isinstance(event, cpb.ModelInfo):
            info = event
        elif args.json:
            emit_json({"progress": to_dict(event)})
        elif event.message:
            bar.note(event.message)
        else:
            bar.update(event)
    bar.clear()
    if args.json:
        emit_json({"model": to_dict(info)})
        return 0
    where = ", ".join(f"rank {p.rank} on {p.node} device {p.device} (handle {p.handle})" for p in info.placement)
    print(f"{info.name}: {model_state(info)} - {info.architecture} {info.dtype}, "
          f"{human_bytes(info.weight_bytes)} weights + {human_bytes(info.kv_bytes)} KV cache, context "
          f"{info.max_context}; {where}; {time.perf_counter() - bar.started:.2f}s")
    return 0


def cmd_unload(client: CortexClient, args) -> int:
    freed = client.unload(args.name)
    if args.json:
        emit_json({"name": args.name, "freed_bytes": freed})
    else:
        print(f"unloaded {args.name}: freed {human_bytes(freed)}")
    return 0


def cmd_generate(client: CortexClient, args) -> int:
    prompt = dict(prompt=args.prompt) if args.prompt is not None else (
        dict(messages=[{"role": "user", "content": args.chat}]) if args.chat is not None
        else dict(token_ids=parse_ids(args.tokens, "--tokens")))
    final = None
    for chunk in client.generate(args.name, **prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                 repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                                 stop_token_ids=parse_ids(args.stop_token_ids, "--stop-token-ids")
                                 if args.stop_token_ids else None,
                                 ignore_eos=args.ignore_eos, request_id=args.request_id, timeout=args.timeout):
        if args.json:
            emit_json(to_dict(chunk))
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.finish_reason:
            final = chunk
    if not args.json:
        sys.stdout.write("\n")
        if final is not None:
            finish = finish_reason(final)
            t = final.timing
            print(f"[{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} generated tokens, "
                  f"finish: {finish} ({final.stop_reason}), first token {t.time_to_first_token_ms:.1f} ms, "
                  f"{t.decode_tokens_per_second:.1f} tokens/s, request {final.request_id}]", file=sys.stderr)
    return 0


def cmd_forward(client: CortexClient, args) -> int:
    ids = parse_ids(args.tokens, "--tokens")
    logits = client.forward(args.name, ids, all_positions=args.all_positions, timeout=args.timeout)
    if args.output:
        np.save(args.output, logits)
    last = logits if logits.ndim == 1 else logits[-1]
    top = np.argsort(-last)[:5]
    if args.json:
        emit_json({"shape": list(logits.shape), "dtype": str(logits.dtype), "output": args.output,
                   "top": [{"token_id": int(i), "logit": float(last[i])} for i in top]})
        return 0
    print(f"logits {list(logits.shape)} float32" + (f" written to {args.output}" if args.output else ""))
    print("top tokens at the last position: " + ", ".join(f"{int(i)} ({last[i]:.3f})" for i in top))
    return 0


def cmd_health(client: CortexClient, args) -> int:
    address = args.address or args.cortex
    try:
        status = check_health(address, timeout=args.timeout or 3.0, security=client.security)
        message = ""
    except grpc.RpcError as err:
        status, message = "UNREACHABLE", f"{err.code().name}: {err.details()}"
    if args.json:
        emit_json({"address": address, "status": status, **({"error": message} if message else {})})
    else:
        print(f"{address}: {status}" + (f" ({message})" if message else ""))
    return 0 if status == "SERVING" else 1


COMMANDS = {"nodes": cmd_nodes, "models": cmd_models, "load": cmd_load, "unload": cmd_unload,
            "generate": cmd_generate, "forward": cmd_forward, "health": cmd_health}
