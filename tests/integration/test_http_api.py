"""cortex's OpenAI-compatible HTTP API, driven by the official `openai` client against a real cortex
and CPU neurons: listings, completions and chats (streamed or not) that equal what gRPC Generate
returns, stop strings, exact usage, request ids, every error status, and a client that disconnects
mid-stream freeing the neuron at once."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from cortex.client import CortexClient
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
from neuron.tokenizer import Tokenizer
from tests.helpers import MODELS, logged_port, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

# A small model with a long context: its steps are short (the device admits queued requests between
# steps), and a generation of most of the context runs for tens of seconds.
LONG = LlamaShape(max_position_embeddings=32768)
LONG_TOKENS = 30000
PROMPT = "The cortex places models on"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
MAX_WAITING = 256  # the neuron's --max-waiting in this fleet: the queue a shard keeps before refusing


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """cortex (HTTP on) with neuron `a` holding llama3 and a slow model with one KV slot, and neuron
    `b` holding a model that a test takes down."""
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "slow", LONG)
    a = start_neuron("cpu", [MODELS, root], extra=["--metrics-listen", "127.0.0.1:0",
                                                   "--max-waiting", str(MAX_WAITING)])
    b = start_neuron("cpu", [MODELS])
    cortex = start_cortex([a.address, b.address], extra=["--http-listen", "127.0.0.1:0", "--poll-seconds", "0.3"])
    try:
        http_port = logged_port(cortex, "http serving")
        with CortexClient(cortex.address, timeout=60) as grpc_client:
            wait_until(lambda: sum(n.state == cpb.NODE_STATE_UP for n in grpc_client.nodes()) == 2,
                       what="both neurons UP")
            grpc_client.load_wait("llama3", name="llama3", node=a.address)
            grpc_client.load_wait("slow", name="slow", node=a.address, kv_slots=1, max_context=32768)
            grpc_client.load_wait("llama2", name="victim", node=b.address)
            yield dict(cortex=cortex, a=a, b=b, grpc=grpc_client, base=f"http://127.0.0.1:{http_port}",
                       metrics=f"http://127.0.0.1:{logged_port(a, 'metrics serving')}/metrics")
    finally:
        for server in (cortex, a, b):
            server.kill()


@pytest.fixture(scope="module")
def client(fleet):
    with openai.OpenAI(base_url=fleet["base"] + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def grpc_greedy(fleet, model: str, **kwargs) -> tuple[str, list[int], cpb.GenerateRequest]:
    chunks = list(fleet["grpc"].generate(model, temperature=0, timeout=60, **kwargs))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def neuron_gauge(fleet, name: str, **labels) -> float:
    """The sum of a neuron metric's samples whose labels include `labels` (0 when there are none)."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(fleet["metrics"], timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    family = families.get(name)
    return sum(s.value for s in family.samples if s.name == name or s.name == name + "_total"
               if labels.items() <= s.labels.items()) if family else 0.0


def settled_count(fleet, name: str, **labels) -> float:
    """A counter once it has not moved for half a second (at most 10 s): calls that ended just before
    are in it."""
    value, deadline = neuron_gauge(fleet, name, **labels), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = neuron_gauge(fleet, name, **labels)
        if again == value:
            break
        value = again
    return value


def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_dir(MODELS / name)


# ---------------------------------------------------------------- listings and health

def test_models_lists_the_ready_models_in_openai_shape(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"llama3", "slow", "victim"}
    assert models["llama3"].object == "model" and models["llama3"].owned_by == "cortex"
    assert client.models.retrieve("llama3").id == "llama3"
    assert isinstance(status_error(lambda: client.models.retrieve("nope")), openai.NotFoundError)


def test_health_is_ok_with_a_neuron_up(fleet):
    status, body = http_get(fleet["base"] + "/health")
    assert status == 200 and body == {"status": "ok", "nodes_up": 2}


def test_health_is_503_with_the_reason_when_no_neuron_is_up():
    cortex = start_cortex(["127.0.0.1:1"], extra=["--http-listen", "127.0.0.1:0", "--poll-seconds", "0.2"])
    try:
        status, body = http_get(f"http://127.0.0.1:{logged_port(cortex, 'http serving')}/health")
        assert status == 503 and body["error"]["code"] == "not_serving"
        assert "no neurons are up" in body["error"]["message"] and "127.0.0.1:1" in body["error"]["message"]
    finally:
        cortex.kill()


# ---------------------------------------------------------------- completions

def test_greedy_completion_equals_grpc_generate_with_exact_usage(fleet, client):
    text, ids, final = grpc_greedy(fleet, "llama3", prompt=PROMPT, max_tokens=12, ignore_eos=True)
    reply = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.object == "text_completion" and reply.model == "llama3"
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer("llama3").encode(PROMPT))
    assert final.usage.prompt_tokens == prompt_tokens
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)


def test_completion_from_token_ids_equals_grpc_generate(fleet, client):
    prompt = [1, 5, 9, 42, 7]
    text, _, _ = grpc_greedy(fleet, "llama3", token_ids=prompt, max_tokens=8, ignore_eos=True)
    reply = client.completions.create(model="llama3", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == text and reply.usage.prompt_tokens == len(prompt)


def test_streamed_completion_joins_to_the_same_text_and_ends_with_usage(fleet, client):
    text, _, _ = grpc_greedy(fleet, "llama3", prompt=PROMPT, max_tokens=10, ignore_eos=True)
    chunks = list(client.completions.create(model="llama3", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(tokenizer("llama3").encode(PROMPT))
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_line(fleet):
    request = urllib.request.Request(fleet["base"] + "/v1/completions", json.dumps(
        {"model": "llama3", "prompt": PROMPT, "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Type"] == "text/event-stream"
        events = [line for line in reply.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_chat_equals_grpc_generate_with_the_template_applied(fleet, client):
    text, _, _ = grpc_greedy(fleet, "llama3", messages=CHAT, max_tokens=9, ignore_eos=True)
    reply = client.chat.completions.create(model="llama3", messages=CHAT, max_completion_tokens=9, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(tokenizer("llama3").encode_chat(CHAT))
    assert reply.usage.completion_tokens == 9


def test_streamed_chat_starts_with_the_role_and_joins_to_the_same_text(fleet, client):
    text, _, _ = grpc_greedy(fleet, "llama3", messages=CHAT, max_tokens=9, ignore_eos=True)
    chunks = list(client.chat.completions.create(model="llama3", messages=CHAT, max_tokens=9, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.object == "chat.completion.chunk"
                                                                   for c in chunks)


def test_stop_string_cuts_the_text_and_finishes_with_stop(fleet, client):
    full, _, _ = grpc_greedy(fleet, "llama3", prompt=PROMPT, max_tokens=24, ignore_eos=True)
    stop = full[6:9]
    assert stop.strip(), f"the greedy text {full!r} has no usable stop string at [6:9]"
    reply = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=24, temperature=0,
                                      stop=[stop, "never-generated"], extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[:full.index(stop)] and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 24


def test_request_id_header_is_echoed_and_reaches_the_log(fleet, client):
    raw = client.completions.with_raw_response.create(model="llama3", prompt=PROMPT, max_tokens=2,
                                                      extra_headers={"X-Request-Id": "http-test-7"})
    assert raw.headers["x-request-id"] == "http-test-7" and raw.parse().id == "cmpl-http-test-7"
    wait_until(lambda: '"request_id": "http-test-7"' in fleet["cortex"].log(), what="the request id in cortex's log")
    unnamed = client.completions.with_raw_response.create(model="llama3", prompt=PROMPT, max_tokens=1)
    assert len(unnamed.headers["x-request-id"]) == 16


# ---------------------------------------------------------------- errors

def status_error(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as err:
        fn()
    return err.value


@pytest.mark.parametrize("body, param", [
    (dict(n=2), "n"),
    (dict(logprobs=2), "logprobs"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(prompt=["a", "b"]), "prompt"),
])
def test_unsupported_or_invalid_fields_are_400_naming_the_field(client, body, param):
    args = dict(model="llama3", prompt=PROMPT, max_tokens=2) | body
    err = status_error(lambda: client.completions.create(**args))
    assert err.status_code == 400 and err.body["param"] == param and err.body["type"] == "invalid_request_error"


def test_chat_logprobs_are_refused(client):
    err = status_error(lambda: client.chat.completions.create(model="llama3", messages=CHAT, logprobs=True))
    assert err.status_code == 400 and "log-probabilities" in err.message


def test_invalid_sampling_from_the_neuron_is_400(client):
    err = status_error(lambda: client.completions.create(model="llama3", prompt=PROMPT, temperature=-1))
    assert isinstance(err, openai.BadRequestError) and "temperature" in err.message


def test_unknown_model_is_404(client):
    err = status_error(lambda: client.completions.create(model="no-such-model", prompt=PROMPT))
    assert isinstance(err, openai.NotFoundError) and err.body["code"] == "model_not_found"
    assert "llama3" in err.message  # it lists what is loaded


def test_deadline_is_504(client):
    err = status_error(lambda: client.completions.create(model="slow", prompt=PROMPT, max_tokens=500,
                                                         extra_headers={"X-Request-Timeout": "0.05"}))
    assert err.status_code == 504 and err.body["code"] == "deadline_exceeded"


def test_an_error_after_the_stream_started_is_a_last_error_event(fleet):
    request = urllib.request.Request(fleet["base"] + "/v1/completions", json.dumps(
        {"model": "slow", "prompt": PROMPT, "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}).encode(),
        {"X-Request-Timeout": "2"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
        events = [e for e in reply.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) > 2
    assert json.loads(events[-2][6:])["error"]["code"] == "deadline_exceeded"
    assert all("choices" in json.loads(e[6:]) for e in events[:-2])


def test_full_queue_is_429_and_disconnect_frees_the_neuron(fleet, client):
    """The slow model has one KV slot. A stream holds it; the HTTP client disconnects mid-stream and
    the slot is free again at once (the neuron stopped). Then the slot is held again and 256
    requests wait behind it: the next one is refused with 429."""
    # the earlier tests' abandoned slow generations (deadlines) may still be stopping: count from after
    wait_until(lambda: neuron_gauge(fleet, "neuron_requests_running") == 0, timeout=30,
               what="the earlier tests' generations to end")
    cancelled = settled_count(fleet, "neuron_requests", model="slow", code="CANCELLED")
    stream = client.completions.create(model="slow", prompt=PROMPT, max_tokens=LONG_TOKENS, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    wait_until(lambda: neuron_gauge(fleet, "neuron_requests_running") == 1, what="the one running place held")
    stream.close()
    wait_until(lambda: neuron_gauge(fleet, "neuron_requests_running") == 0, timeout=10,
               what="the neuron to stop the abandoned generation")
    assert neuron_gauge(fleet, "neuron_requests", model="slow", code="CANCELLED") == cancelled + 1
    reply = client.completions.create(model="slow", prompt=PROMPT, max_tokens=2, extra_headers={
        "X-Request-Timeout": "10"})  # behind the abandoned one it would wait for tens of seconds
    assert reply.usage.completion_tokens == 2
    wait_until(lambda: '"front": "http"' in fleet["cortex"].log() and '"code": "CANCELLED"' in fleet["cortex"].log(),
               what="the disconnected request logged as CANCELLED")

    stub = cortex_pb2_grpc.CortexStub(channel := grpc.insecure_channel(fleet["cortex"].address))
    request = cpb.GenerateRequest(model="slow")
    request.prompt.tokens.ids.extend([1, 2, 3])
    request.sampling.max_tokens, request.sampling.ignore_eos = LONG_TOKENS, True
    calls = [stub.Generate(request, timeout=120) for _ in range(MAX_WAITING + 1)]
    try:
        wait_until(lambda: neuron_gauge(fleet, "neuron_requests_waiting") == MAX_WAITING, timeout=60,
                   what="the device queue full")
        refused = neuron_gauge(fleet, "neuron_requests", model="slow", code="RESOURCE_EXHAUSTED")
        err = status_error(lambda: client.completions.create(model="slow", prompt=PROMPT, max_tokens=2))
        assert isinstance(err, openai.RateLimitError) and err.body["code"] == "resource_exhausted"
        assert "already waiting on this shard" in err.message
        assert neuron_gauge(fleet, "neuron_requests", model="slow", code="RESOURCE_EXHAUSTED") == refused + 1
    finally:
        for call in calls:
            call.cancel()
        channel.close()
    wait_until(lambda: neuron_gauge(fleet, "neuron_requests_waiting") + neuron_gauge(
        fleet, "neuron_requests_running") == 0, timeout=30, what="the cancelled requests gone")


def test_model_on_a_down_node_is_503_and_health_stays_ok(fleet, client):
    fleet["b"].kill()
    wait_until(lambda: http_get(fleet["base"] + "/health")[1].get("nodes_up") == 1, what="b seen down")
    err = status_error(lambda: client.completions.create(model="victim", prompt=[1, 2, 3], max_tokens=2))
    assert err.status_code == 503 and "unavailable" in err.message
    assert http_get(fleet["base"] + "/health")[0] == 200
    assert "victim" not in {m.id for m in client.models.list().data}
    assert client.completions.create(model="llama3", prompt=PROMPT, max_tokens=1).usage.completion_tokens == 1


# ---------------------------------------------------------------- the guide's curl commands

def guide_curl_commands() -> list[list[str]]:
    from tests.unit.test_operations_doc import DOC, shell_commands
    return [words for words in shell_commands(DOC.read_text()) if words[0] == "curl"
            and any("localhost:8000" in w for w in words)]


def test_the_guides_curl_commands_work_streaming_included(fleet):
    """Every `curl localhost:8000...` line of docs/operations.md, against this cortex (model "llama")."""
    import shutil
    import subprocess
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    fleet["grpc"].load_wait("llama3", name="llama", node=fleet["a"].address)
    commands = guide_curl_commands()
    assert any("-N" in c for c in commands), "the guide shows streaming with curl -N"
    port = fleet["base"].rsplit(":", 1)[1]
    for words in commands:
        argv = [w.replace("localhost:8000", f"127.0.0.1:{port}") for w in words] + ["--fail-with-body",
                                                                                     "--max-time", "60"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stdout}\n{result.stderr}"
        if "-N" in words:
            events = [e for e in result.stdout.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["total_tokens"] > 0
        else:
            assert "error" not in json.loads(result.stdout)


def test_sigterm_drains_http_streams_finish_new_requests_get_503(fleet, client):
    """Last: it stops this module's cortex."""
    import signal
    stream = client.completions.create(model="slow", prompt=PROMPT, max_tokens=600, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    fleet["cortex"].proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http_get(fleet["base"] + "/health")[0] == 503, what="health 503 while draining")
    err = status_error(lambda: client.completions.create(model="llama3", prompt=PROMPT, max_tokens=1))
    assert err.status_code == 503 and err.body["code"] == "draining"
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 600 and chunks[-2].choices[0].finish_reason == "length"
    assert fleet["cortex"].proc.wait(30) == 0
