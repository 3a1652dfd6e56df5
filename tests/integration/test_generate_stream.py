"""GenerateStream on a real neuron: many generations over one call give each exactly what Generate
gives it alone; a bad request fails alone with its status; a cancel ends one generation and the
others go on; the neuron's metrics count the stream's generations as they count Generate calls; a
draining neuron ends cortex's idle stream instead of waiting out its drain time for it."""
from __future__ import annotations

import queue
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, free_port, start_cortex, start_neuron, wait_until

PROMPTS = [[1, 45, 97, 143, 200], [1, 7, 8], [1, 300, 301, 302, 303, 304, 305], [1, 99]]


@pytest.fixture(scope="module")
def neuron():
    metrics_port = free_port()
    server = start_neuron(devices="cpu:0", model_roots=[MODELS],
                          extra=["--cpu-memory-gb", "1", "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    channel = server.channel()
    stub = neuron_pb2_grpc.NeuronStub(channel)
    loaded = list(stub.LoadShard(pb.LoadShardRequest(path="llama2", max_context=128, max_seqs=8)))
    yield stub, loaded[-1].loaded.handle, metrics_port
    channel.close()
    server.kill()


def request(handle: int, ids: list[int], max_tokens: int = 12) -> pb.GenerateRequest:
    return pb.GenerateRequest(handle=handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=ids)),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


class Call:
    """A GenerateStream call driven from the test: send starts and cancels, collect updates by id."""

    def __init__(self, stub):
        self._up: queue.Queue = queue.Queue()
        self._call = stub.GenerateStream(iter(self._up.get, None), timeout=60)
        self.updates: dict[int, list[pb.GenerateUpdate]] = {}
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for message in self._call:
            with self._changed:
                for update in message.updates:
                    self.updates.setdefault(update.id, []).append(update)
                self._changed.notify_all()

    def send(self, message: pb.GenerateStreamRequest) -> None:
        self._up.put(message)

    def ended(self, key: int) -> bool:
        got = self.updates.get(key, [])
        return bool(got) and (got[-1].error_code != 0 or got[-1].response.finish_reason != 0)

    def wait(self, keys, timeout: float = 60) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: all(self.ended(k) for k in keys), timeout), self.updates

    def close(self) -> None:
        self._up.put(None)
        self._reader.join(timeout=30)


def ids_of(updates: list[pb.GenerateUpdate]) -> list[int]:
    return [t for u in updates for t in u.response.token_ids]


def test_each_generation_gets_what_generate_gives_it_alone(neuron):
    stub, handle, _ = neuron
    alone = [[t for m in stub.Generate(request(handle, p), timeout=60) for t in m.token_ids] for p in PROMPTS]
    call = Call(stub)
    try:
        for key, prompt in enumerate(PROMPTS, start=1):
            call.send(pb.GenerateStreamRequest(id=key, start=request(handle, prompt)))
        call.wait(range(1, len(PROMPTS) + 1))
        for key, expected in enumerate(alone, start=1):
            got = call.updates[key]
            assert ids_of(got) == expected and len(expected) == 12
            final = got[-1].response
            assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 12
    finally:
        call.close()


def test_a_bad_request_fails_alone_and_a_cancel_ends_only_its_generation(neuron):
    stub, handle, _ = neuron
    call = Call(stub)
    try:
        call.send(pb.GenerateStreamRequest(id=1, start=request(handle, PROMPTS[0], max_tokens=100)))
        call.send(pb.GenerateStreamRequest(id=2, start=request(handle + 1, PROMPTS[1])))    # no such shard
        call.send(pb.GenerateStreamRequest(id=3, start=request(handle, [], max_tokens=4)))  # empty prompt
        call.send(pb.GenerateStreamRequest(id=4, start=request(handle, PROMPTS[2], max_tokens=6)))
        call.wait([2, 3, 4])
        assert call.updates[2][-1].error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert call.updates[3][-1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "prompt" in call.updates[3][-1].error_message
        assert len(ids_of(call.updates[4])) == 6
        wait_until(lambda: len(ids_of(call.updates.get(1, []))) >= 2, what="generation 1 streaming")
        call.send(pb.GenerateStreamRequest(id=1, cancel=True))
        # After the cancel generation 1 gets no more updates, and the call serves new generations.
        call.send(pb.GenerateStreamRequest(id=5, start=request(handle, PROMPTS[3], max_tokens=3)))
        call.wait([5])
        seen = len(call.updates[1])
        call.send(pb.GenerateStreamRequest(id=6, start=request(handle, PROMPTS[3], max_tokens=3)))
        call.wait([6])
        assert len(call.updates[1]) == seen and not call.ended(1)
    finally:
        call.close()


def test_the_metrics_count_the_streams_generations(neuron):
    stub, handle, metrics_port = neuron

    def counted(code: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        line = next((x for x in text.splitlines()
                     if x.startswith("neuron_requests_total{") and f'code="{code}"' in x), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    ok_before = counted("OK")
    call = Call(stub)
    try:
        for key in (1, 2):
            call.send(pb.GenerateStreamRequest(id=key, start=request(handle, PROMPTS[key], max_tokens=3)))
        call.wait([1, 2])
    finally:
        call.close()
    wait_until(lambda: counted("OK") == ok_before + 2, what="two OK generations counted")


def test_a_draining_neuron_ends_cortexs_idle_stream_so_its_drain_does_not_wait_for_it():
    neuron = start_neuron(devices="cpu", model_roots=[MODELS], extra=["--drain-seconds", "30"])
    cortex = start_cortex([neuron.address])
    try:
        stub = cortex_pb2_grpc.CortexStub(cortex.channel())
        wait_until(lambda: stub.ListNodes(cpb.ListNodesRequest()).nodes[0].state == cpb.NODE_STATE_UP,
                   timeout=30, what="the neuron UP")
        list(stub.LoadModel(cpb.LoadModelRequest(name="m", path="llama2", max_context=64), timeout=60))
        done = cpb.GenerateRequest(model="m", prompt=cpb.Prompt(tokens=cpb.TokenIds(ids=[1, 5, 9])),
                                   sampling=cpb.SamplingParams(max_tokens=4, ignore_eos=True))
        assert sum(len(m.token_ids) for m in stub.Generate(done, timeout=30)) == 4  # the node stream is open
        started = time.monotonic()
        neuron.proc.send_signal(signal.SIGTERM)
        neuron.proc.wait(60)
        # Well inside the 30 s drain: the idle stream ended as soon as the drain began.
        assert neuron.proc.returncode == 0 and time.monotonic() - started < 15
    finally:
        cortex.kill()
        neuron.kill()
