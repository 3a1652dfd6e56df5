"""docs/operations.md's grpcurl commands name real services and methods, and their JSON bodies parse
into the request messages (grpcurl uses the same protobuf JSON mapping: proto field names or their
lowerCamelCase forms; unknown fields are an error). The cortex CLI commands it shows parse too."""
from __future__ import annotations

import re
import shlex

import pytest
from google.protobuf import descriptor_pool, json_format, message_factory

import common.proto.cortex.v1.cortex_pb2  # noqa: F401 - registers the descriptors
import common.proto.neuron.v1.neuron_pb2  # noqa: F401
from grpc_health.v1 import health_pb2  # noqa: F401
from tests.helpers import ROOT

DOC = ROOT / "docs" / "operations.md"
GRPCURL_VALUE_FLAGS = {"-max-time", "-H", "-cacert", "-cert", "-key", "-authority", "-servername",
                       "-rpc-header", "-reflect-header", "-connect-timeout"}
REFLECTION = {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}


def shell_commands(text: str) -> list[list[str]]:
    """Every command in the ```sh blocks, split like a shell would (continuations, quotes, comments)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        buffer = ""
        for line in block.splitlines():
            buffer += line + "\n"
            if buffer.rstrip().endswith("\\"):
                continue
            try:
                words = shlex.split(buffer.replace("\\\n", " "), comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if words:
                commands.append(words)
            buffer = ""
        assert not buffer.strip(), f"unterminated command in docs/operations.md: {buffer}"
    return commands


def grpcurl_calls() -> list[tuple[str, str | None, list[str]]]:
    """(method or verb, JSON body, the command) for every grpcurl command."""
    calls = []
    for words in shell_commands(DOC.read_text()):
        if not words or words[0] != "grpcurl":
            continue
        body = None
        rest = []
        i = 1
        while i < len(words):
            if words[i] == "-d":
                body = words[i + 1]
                i += 2
            elif words[i] in GRPCURL_VALUE_FLAGS:
                i += 2
            elif words[i].startswith("-"):
                i += 1
            else:
                rest.append(words[i])
                i += 1
        # rest: ADDRESS then list | describe X | Service/Method
        calls.append((" ".join(rest[1:]), body, words))
    return calls


def method_descriptor(full_method: str):
    service_name, method_name = full_method.split("/")
    service = descriptor_pool.Default().FindServiceByName(service_name)
    return service.methods_by_name[method_name]


def test_the_guide_has_a_grpcurl_command_for_every_diagnostic():
    methods = {m for m, _, _ in grpcurl_calls()}
    for needed in ("list", "grpc.health.v1.Health/Check", "cortex.v1.Cortex/ListNodes", "cortex.v1.Cortex/ListModels",
                   "cortex.v1.Cortex/LoadModel", "cortex.v1.Cortex/Generate", "neuron.v1.Neuron/Describe"):
        assert needed in methods, f"docs/operations.md has no grpcurl command for {needed}"
    assert any(m.startswith("describe") for m in methods)


@pytest.mark.parametrize("method,body,words", grpcurl_calls(), ids=lambda v: v if isinstance(v, str) else None)
def test_grpcurl_command(method, body, words):
    if method == "list":
        return
    if method.startswith("describe "):
        symbol = method.split()[1]
        pool = descriptor_pool.Default()
        try:
            pool.FindServiceByName(symbol)
        except KeyError:
            pool.FindMessageTypeByName(symbol)
        return
    descriptor = method_descriptor(method)
    if body is not None:
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        try:
            json_format.Parse(body, request_class())
        except json_format.ParseError as err:
            pytest.fail(f"{shlex.join(words)}\n  body does not fit {descriptor.input_type.full_name}: {err}")


def test_cortex_cli_commands_in_the_guide_parse():
    from cortex.cli import build_parser
    from neuron.cli import build_parser as neuron_parser
    for words in shell_commands(DOC.read_text()):
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=value prefixes
        if not words or words[0] not in ("cortex", "neuron"):
            continue
        argv = [w for w in words[1:] if w != "&"]
        parser = build_parser() if words[0] == "cortex" else neuron_parser()
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`{shlex.join(words)}` in docs/operations.md does not parse")
