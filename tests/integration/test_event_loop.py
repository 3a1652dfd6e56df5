"""The neuron's event loop never blocks on a prompt: long text is tokenized and chat templates are
rendered off the loop, so health answers while they run; prompts past the size bounds and templates
past their limits (huge numbers, ranges, include/import) are INVALID_ARGUMENT, and the neuron
serves the next request."""
from __future__ import annotations

import json
import shutil
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, start_neuron

TEMPLATES = {
    "pow": "{{ 10 ** 10000000 }}",
    "repeat": "{{ 'x' * 100000000 }}",
    "range": "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "include": "{% include 'secrets.txt' %}",
    "import": "{% import 'macros.j2' as m %}{{ m.x() }}",
    "macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
}
# Big enough that tokenizing it takes a noticeable time, under the raised byte limit below.
LONG_TEXT = "the cortex places models on the neurons, " * 40_000  # 1.6 MB
CHAT = pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")]))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, template in TEMPLATES.items():
        model = shutil.copytree(MODELS / "llama2", root / name)
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(MODELS / "llama2", root / "plain")
    return root


@pytest.fixture(scope="module")
def neuron(root):
    srv = start_neuron(model_roots=[root], extra=["--max-prompt-bytes", "4000000", "--template-seconds", "2"])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def channel(neuron):
    ch = neuron.channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def handles(channel):
    stub = neuron_pb2_grpc.NeuronStub(channel)
    return {name: list(stub.LoadShard(pb.LoadShardRequest(path=name, model=name, max_seqs=2)))[-1].loaded.handle
            for name in [*TEMPLATES, "plain"]}


def _generate(stub, handle, prompt, timeout=60):
    return list(stub.Generate(pb.GenerateRequest(handle=handle, prompt=prompt,
                                                 sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True)),
                              timeout=timeout))


def _health_answers_while(channel, work) -> list:
    """Run work() on a thread; meanwhile health must answer, each time within 1 s."""
    outcome: list = []

    def run():
        try:
            outcome.append(work())
        except grpc.RpcError as err:
            outcome.append(err)
    thread = threading.Thread(target=run)
    thread.start()
    health = health_pb2_grpc.HealthStub(channel)
    checks = 0
    while thread.is_alive() or checks == 0:
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        checks += 1
        thread.join(0.1)
    return outcome


def test_health_answers_while_a_long_prompt_is_tokenized(channel, handles):
    stub = neuron_pb2_grpc.NeuronStub(channel)
    (result,) = _health_answers_while(channel, lambda: _generate(stub, handles["plain"], pb.Prompt(text=LONG_TEXT)))
    # Tokenized (off the loop), then refused: far more tokens than the context.
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens" in result.details()


def test_a_prompt_over_the_byte_limit_is_refused_before_tokenizing(channel, handles):
    stub = neuron_pb2_grpc.NeuronStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, handles["plain"], pb.Prompt(text="x" * 5_000_000), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-bytes" in err.value.details()
    assert len(err.value.details()) < 1000


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_template_past_its_limits_is_invalid_argument_and_health_answers(channel, handles, name):
    stub = neuron_pb2_grpc.NeuronStub(channel)
    (result,) = _health_answers_while(channel, lambda: _generate(stub, handles[name], CHAT))
    assert isinstance(result, grpc.RpcError), result
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, (result.code(), result.details())
    chunks = _generate(stub, handles["plain"], CHAT)
    assert sum(len(c.token_ids) for c in chunks) == 2
