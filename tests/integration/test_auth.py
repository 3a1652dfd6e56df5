"""API keys with roles on cortex, the cluster token on every neuron RPC and on cortex's Fleet
service, verified registration; health and reflection stay open. One plaintext fleet: a cortex
with --api-keys and --cluster-token-file, and a neuron with the token that registers itself."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from common.rpc.channels import PLAINTEXT, sync_channel
from cortex.client import CortexClient
from tests.helpers import MODELS, logged_port, make_secrets, start_cortex, start_neuron, wait_until
from tests.security_calls import code_of, methods_of

pytestmark = pytest.mark.slow

UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
USER_RPCS = {"Generate", "Forward", "ListModels"}
MODEL = "served"


@pytest.fixture(scope="module")
def fleet():
    secrets = make_secrets()
    cortex = start_cortex(extra=["--poll-seconds", "0.5", "--http-listen", "127.0.0.1:0",
                                 *secrets.server_flags(tls=False, api_keys=True)])
    neuron = start_neuron("cpu:0", [MODELS], extra=["--cortex", cortex.address, "--heartbeat-seconds", "0.5",
                                                    *secrets.server_flags(tls=False)])
    try:
        with CortexClient(cortex.address, timeout=10, api_key=secrets.api_key("admin")) as admin:
            wait_until(lambda: [n.state for n in admin.nodes()] == [cpb.NODE_STATE_UP], what="the neuron registered")
            admin.load_wait("llama2", MODEL)
        yield cortex, neuron, secrets
    finally:
        cortex.kill()
        neuron.kill()


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def cortex_bodies(model: str) -> dict[str, dict]:
    """A valid request for every Cortex RPC (the admin-only ones aim at names that do not exist,
    so an allowed call answers NOT_FOUND/INVALID_ARGUMENT without changing the fleet)."""
    return {"ListNodes": {}, "ListModels": {},
            "LoadModel": {"name": "never", "path": "no-such-checkpoint"},
            "UnloadModel": {"name": "no-such-model"},
            "Generate": {"model": model, "prompt": {"tokens": {"ids": [1, 2, 3]}}, "sampling": {"max_tokens": 2}},
            "Forward": {"model": model, "token_ids": [1, 2, 3]}}


def test_every_cortex_rpc_needs_a_key_and_the_role_for_it(fleet):
    cortex, _, secrets = fleet
    bodies = cortex_bodies(MODEL)
    assert set(bodies) == set(methods_of("cortex.v1.Cortex")), "a Cortex RPC has no case here: add it"
    with sync_channel(cortex.address) as channel:
        for method, body in bodies.items():
            assert code_of(channel, "cortex.v1.Cortex", method, body) == UNAUTHENTICATED, method
            wrong = bearer("x" * 48)
            assert code_of(channel, "cortex.v1.Cortex", method, body, wrong) == UNAUTHENTICATED, method
            # The cluster token is not an API key.
            assert code_of(channel, "cortex.v1.Cortex", method, body, bearer(secrets.token())) == UNAUTHENTICATED
            user = code_of(channel, "cortex.v1.Cortex", method, body, bearer(secrets.api_key("user")))
            admin = code_of(channel, "cortex.v1.Cortex", method, body, bearer(secrets.api_key("admin")))
            if method in USER_RPCS:
                assert user == grpc.StatusCode.OK, method
            else:
                assert user == PERMISSION_DENIED, method
            assert admin not in (UNAUTHENTICATED, PERMISSION_DENIED), method
            assert admin in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), method


def test_the_refusals_say_what_to_send(fleet):
    cortex, _, secrets = fleet
    with CortexClient(cortex.address, timeout=10) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.models()
        assert err.value.code() == UNAUTHENTICATED and "authorization: Bearer KEY" in err.value.details()
    with CortexClient(cortex.address, timeout=10, api_key=secrets.api_key("user")) as user:
        with pytest.raises(grpc.RpcError) as err:
            user.unload(MODEL)
        assert err.value.code() == PERMISSION_DENIED and "admin" in err.value.details()
        assert "Generate" in err.value.details()
    with CortexClient(cortex.address, timeout=10, api_key=secrets.api_key("admin")) as admin:
        assert admin.model(MODEL).state == cpb.MODEL_STATE_READY  # the refused unload changed nothing


def test_a_user_sees_models_but_not_their_shard_handles(fleet):
    cortex, _, secrets = fleet
    with CortexClient(cortex.address, timeout=10, api_key=secrets.api_key("user")) as user:
        (model,) = user.models()
        assert model.name == MODEL and model.placement and all(p.handle == 0 for p in model.placement)
        assert [p.node for p in model.placement] and user.generate_text(MODEL, "Hello", max_tokens=3) is not None
        assert user.forward(MODEL, [1, 2, 3]).shape[-1] > 0
    with CortexClient(cortex.address, timeout=10, api_key=secrets.api_key("admin")) as admin:
        assert all(p.handle != 0 for p in admin.model(MODEL).placement)


def test_health_and_reflection_need_no_credentials(fleet):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    cortex, neuron, _ = fleet
    for server, service in ((cortex, "cortex.v1.Cortex"), (neuron, "neuron.v1.Neuron")):
        with sync_channel(server.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert service in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_a_stranger_gets_unauthenticated_from_every_neuron_rpc(fleet):
    _, neuron, secrets = fleet
    methods = methods_of("neuron.v1.Neuron")
    assert {"Describe", "LoadShard", "DropShard", "InitGroup", "FollowSteps", "CreateGroupId"} <= set(methods)
    credentials = {"none": (), "wrong token": (("x-cluster-token", "y" * 64),),
                   "an admin API key": bearer(secrets.api_key("admin"))}
    with sync_channel(neuron.address) as channel:
        for method in methods:
            for what, metadata in credentials.items():
                code = code_of(channel, "neuron.v1.Neuron", method, {}, metadata)
                assert code == UNAUTHENTICATED, f"{method} with {what}: {code}"
    # With the token the same channel works: the refusals were about the credential only.
    with sync_channel(neuron.address, secrets.peer(tls=False)) as ch:
        assert neuron_pb2_grpc.NeuronStub(ch).Describe(npb.DescribeRequest(), timeout=5).devices


def test_the_fleet_service_needs_the_cluster_token(fleet):
    cortex, neuron, secrets = fleet
    with sync_channel(cortex.address) as channel:
        for method, body in (("Register", {"address": neuron.address}), ("Heartbeat", {"address": neuron.address})):
            for metadata in ((), (("x-cluster-token", "z" * 64),), bearer(secrets.api_key("admin"))):
                assert code_of(channel, "cortex.v1.Fleet", method, body, metadata) == UNAUTHENTICATED, method


class FakeNeuron(neuron_pb2_grpc.NeuronServicer):
    """Answers Describe like a neuron, but for another address than the one it registers."""

    def Describe(self, request, context):
        return npb.DescribeResponse(host="fake", address="10.9.9.9:50061",
                                    devices=[npb.Device(id="cpu:0", kind="cpu", total_bytes=1 << 40,
                                                        free_bytes=1 << 40)])


def test_a_fake_neuron_cannot_register(fleet):
    from concurrent import futures
    cortex, neuron, secrets = fleet
    fake = grpc.server(futures.ThreadPoolExecutor(2))
    neuron_pb2_grpc.add_NeuronServicer_to_server(FakeNeuron(), fake)
    fake_address = f"127.0.0.1:{fake.add_insecure_port('127.0.0.1:0')}"
    fake.start()
    try:
        token = (("x-cluster-token", secrets.token()),)
        with sync_channel(cortex.address, PLAINTEXT) as channel:
            register = {"address": fake_address, "host": "fake"}
            # Without the token: refused before anything happens.
            assert code_of(channel, "cortex.v1.Fleet", "Register", register) == UNAUTHENTICATED
            # With the token (a leaked one, a misconfigured host): cortex checks the address first.
            for address in (fake_address, cortex.address, "127.0.0.1:1"):
                body = {"address": address}
                assert code_of(channel, "cortex.v1.Fleet", "Register", body, token) == \
                    grpc.StatusCode.FAILED_PRECONDITION, address
        with CortexClient(cortex.address, timeout=10, api_key=secrets.api_key("admin")) as admin:
            assert [n.address for n in admin.nodes()] == [neuron.address], "a refused registration left a node"
            assert {p.node for p in admin.model(MODEL).placement} == {neuron.address}
    finally:
        fake.stop(0)


def test_keys_and_tokens_never_reach_the_logs(fleet):
    cortex, neuron, secrets = fleet
    logs = cortex.log() + neuron.log()
    assert "calls refused" in cortex.log() and "calls refused" in neuron.log()
    for secret in (secrets.api_key("admin"), secrets.api_key("user"), secrets.token()):
        assert secret not in logs


def test_a_server_without_tls_says_once_that_it_is_open(fleet):
    cortex, neuron, _ = fleet
    for server in (cortex, neuron):
        warnings = [line for line in server.log().splitlines() if "is OPEN" in line]
        assert len(warnings) == 1 and "no --tls-cert" in warnings[0], warnings
        assert "no --cluster-token-file" not in warnings[0] and "no --api-keys" not in warnings[0]


@pytest.mark.parametrize("component,flags,message", [
    ("cortex", ["--api-keys", "/nonexistent/keys"], "cannot read the API key file"),
    ("cortex", ["--api-keys", "{bad_keys}"], "line 2: role must be admin or user"),
    ("cortex", ["--cluster-token-file", "{short_token}"], "at least 16 characters"),
    ("neuron", ["--tls-ca", "{short_token}"], "--tls-ca without --tls-cert"),
    ("neuron", ["--tls-cert", "{short_token}"], "give --tls-cert and --tls-key together"),
], ids=["missing-keys", "bad-role", "short-token", "ca-without-cert", "cert-without-key"])
def test_unusable_credentials_stop_the_server_at_start(component, flags, message, tmp_path):
    import subprocess
    import sys
    from tests.helpers import ROOT
    bad_keys, short_token = tmp_path / "keys", tmp_path / "token"
    bad_keys.write_text(f"{'k' * 32} admin\n{'s' * 32} superuser\n")
    short_token.write_text("abc\n")
    flags = [f.format(bad_keys=bad_keys, short_token=short_token) for f in flags]
    extra = ["--model-root", str(MODELS)] if component == "neuron" else []
    run = subprocess.run([sys.executable, "-m", f"{component}.cli", "serve", "--listen", "127.0.0.1:0", *extra, *flags],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "s" * 32 not in run.stderr



# ---------------------------------------------------------------- the HTTP front

def http(cortex, method: str, path: str, key: str | None = None, body: dict | None = None):
    """(status, headers, JSON body) of one request to cortex's HTTP front."""
    import json
    import urllib.error
    import urllib.request
    port = logged_port(cortex, "http serving")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            text = reply.read().decode()
            return reply.status, reply.headers, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


HTTP_ROUTES = [("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None),
               ("POST", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}),
               ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})]


def test_every_http_route_needs_a_key(fleet):
    cortex, _, secrets = fleet
    for method, path, body in HTTP_ROUTES:
        for key in (None, "x" * 48, secrets.token()):
            status, headers, answer = http(cortex, method, path, key, body)
            assert status == 401, (path, key is None, status, answer)
            assert answer["error"]["type"] == "authentication_error" and answer["error"]["code"] == "invalid_api_key"
            assert "Authorization: Bearer KEY".lower() in answer["error"]["message"].lower()
            assert headers["WWW-Authenticate"].startswith("Bearer")
        for role in ("user", "admin"):
            status, _, answer = http(cortex, method, path, secrets.api_key(role), body)
            assert status not in (401, 403), (path, role, status, answer)
            if path != "/v1/chat/completions":  # the fixture has no chat template: a 400 of its own
                assert status == 200, (path, role, status, answer)
    # Routes outside the OpenAI API are admin routes: a user key gets 403 (before any 404).
    status, _, answer = http(cortex, "GET", "/v1/something-else", secrets.api_key("user"))
    assert status == 403 and answer["error"]["type"] == "permission_error"
    # Probes and scrapers need no key.
    assert http(cortex, "GET", "/health")[0] == 200 and http(cortex, "GET", "/metrics")[0] == 200


def test_the_openai_client_with_an_api_key(fleet):
    openai = pytest.importorskip("openai")
    cortex, _, secrets = fleet
    base = f"http://127.0.0.1:{logged_port(cortex, 'http serving')}/v1"
    with openai.OpenAI(base_url=base, api_key=secrets.api_key("user"), max_retries=0, timeout=30) as client:
        reply = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
    with openai.OpenAI(base_url=base, api_key="not-a-key-" * 3, max_retries=0, timeout=30) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
