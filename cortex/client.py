"""A small synchronous Python client for cortex.

    from cortex.client import CortexClient, model_state

    with CortexClient("127.0.0.1:50051") as cortex:
        info = cortex.load("llama-3.2-1b", name="llama")   # loads now; returns the ModelInfo
        print(model_state(info))                           # "READY"
        for event in cortex.load_stream("llama-3.2-1b", name="llama"):
            ...                                   # LoadModelProgress..., then ModelInfo (last)
        for chunk in cortex.generate("llama", prompt="Hello", max_tokens=32):
            print(chunk.text, end="", flush=True)
        logits = cortex.forward("llama", [1, 2, 3])   # numpy array [vocab]

Replies are the public cortex.v1 messages (common/proto/cortex/v1); `node_state`, `model_state`
and `finish_reason` give their enums by name. Errors are grpc.RpcError with the server's status
code (`err.code()`) and message (`err.details()`). Streams stop the server-side work when the
iterator is closed or dropped early.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.rpc.channels import PLAINTEXT, ChannelSecurity, sync_channel


def check_health(address: str, timeout: float = 3.0, service: str = "", security: ChannelSecurity = PLAINTEXT) -> str:
    """The gRPC health status name of any server (cortex or neuron): "SERVING", "NOT_SERVING", ...
    Raises grpc.RpcError when it cannot be reached. Health needs no credentials, but a TLS server
    needs TLS (and a neuron with mutual TLS, a client certificate)."""
    with sync_channel(address, security) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def tensor_to_numpy(tensor: cpb.Tensor) -> np.ndarray:
    if tensor.dtype != "float32":
        raise ValueError(f"unexpected tensor dtype {tensor.dtype!r}")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape)).copy()


def _enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:  # a value this client's stubs predate
        return str(value)


def node_state(node: cpb.Node) -> str:
    """The node's state by name: "UP" or "DOWN" ("UNSPECIFIED" if unset)."""
    return _enum_name(cpb.NodeState, node.state, "NODE_STATE_")


def model_state(model: cpb.ModelInfo) -> str:
    """The model's state by name: "LOADING", "READY", "UNAVAILABLE" or "FAILED"."""
    return _enum_name(cpb.ModelState, model.state, "MODEL_STATE_")


def finish_reason(chunk: cpb.GenerateResponse) -> str:
    """Why the generation ended, by name: "stop" or "length" on the last chunk; "" on the others."""
    if not chunk.finish_reason:
        return ""
    return _enum_name(cpb.FinishReason, chunk.finish_reason, "FINISH_REASON_").lower()


class CortexClient:
    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None, api_key: str = "",
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = ""):
        """timeout: default deadline in seconds for unary calls (None: no deadline).
        api_key: sent as `authorization: Bearer KEY`. tls_ca: the CA that verifies cortex's
        certificate (turns TLS on); tls_cert/tls_key: a client certificate to present."""
        self.address = address
        self.timeout = timeout
        self.security = ChannelSecurity.for_client(api_key, tls_ca, tls_cert, tls_key)
        self._channel = sync_channel(address, self.security)
        self._stub = cortex_pb2_grpc.CortexStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CortexClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ fleet and models

    def nodes(self) -> list[cpb.Node]:
        return list(self._stub.ListNodes(cpb.ListNodesRequest(), timeout=self.timeout).nodes)

    def models(self) -> list[cpb.ModelInfo]:
        return list(self._stub.ListModels(cpb.ListModelsRequest(), timeout=self.timeout).models)

    def model(self, name: str) -> cpb.ModelInfo | None:
        return next((m for m in self.models() if m.name == name), None)

    def load(self, path: str, name: str, dtype: str = "", tp: int = 1, max_context: int = 0, kv_slots: int = 0,
             node: str = "", device: str = "", timeout: float | None = None) -> cpb.ModelInfo:
        """Load a checkpoint under a name and wait for it: returns the model's ModelInfo (READY).
        Raises grpc.RpcError with the reason when it cannot be loaded. load_stream() shows progress."""
        info = None
        for event in self.load_stream(path, name, dtype=dtype, tp=tp, max_context=max_context, kv_slots=kv_slots,
                                      node=node, device=device, timeout=timeout):
            if isinstance(event, cpb.ModelInfo):
                info = event
        if info is None:  # a server that ended the stream without the model's info
            raise RuntimeError(f"cortex ended the load of {name} without the model's info")
        return info

    load_wait = load  # the former name of the plain call

    def load_stream(self, path: str, name: str, dtype: str = "", tp: int = 1, max_context: int = 0,
                    kv_slots: int = 0, node: str = "", device: str = "", timeout: float | None = None
                    ) -> Iterator[cpb.LoadModelProgress | cpb.ModelInfo]:
        """Load as the caller iterates: yields LoadModelProgress events, then the model's ModelInfo
        (last). Nothing is sent before the first next(); closing the iterator early cancels the
        call, and a load whose every caller went away is cancelled by cortex."""
        request = cpb.LoadModelRequest(name=name, path=path, dtype=dtype, tp=tp, max_context=max_context,
                                       kv_slots=kv_slots, node=node, device=device)
        call = self._stub.LoadModel(request, timeout=timeout)
        try:
            for event in call:
                yield event.progress if event.HasField("progress") else event.model
        finally:
            call.cancel()

    def unload(self, name: str) -> int:
        """Returns the bytes freed on the devices."""
        return self._stub.UnloadModel(cpb.UnloadModelRequest(name=name), timeout=self.timeout).freed_bytes

    # ------------------------------------------------------------ inference

    def generate(self, model: str, prompt: str | None = None, *, token_ids: Iterable[int] | None = None,
                 messages: list[dict[str, str]] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                 request_id: str = "", timeout: float | None = None) -> Iterator[cpb.GenerateResponse]:
        """Streams GenerateResponse chunks (token ids + text delta, and the request id: request_id, or
        the one cortex made); the last has finish_reason, usage and timing. Give exactly one of prompt
        (text), token_ids or messages ([{role, content}])."""
        given = [p is not None for p in (prompt, token_ids, messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, token_ids or messages")
        if prompt is not None:
            p = cpb.Prompt(text=prompt)
        elif token_ids is not None:
            p = cpb.Prompt(tokens=cpb.TokenIds(ids=list(token_ids)))
        else:
            p = cpb.Prompt(chat=cpb.Chat(messages=[cpb.ChatMessage(role=m["role"], content=m["content"])
                                                  for m in messages]))
        optional = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed)
        sampling = cpb.SamplingParams(**{k: v for k, v in optional.items() if v is not None},
                                      stop=stop or [], stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos)
        call = self._stub.Generate(cpb.GenerateRequest(model=model, prompt=p, sampling=sampling,
                                                       request_id=request_id), timeout=timeout)
        try:
            yield from call
        finally:
            call.cancel()  # the consumer stopped early: stop the generation on the device too

    def generate_text(self, model: str, prompt: str, **kwargs) -> str:
        return "".join(chunk.text for chunk in self.generate(model, prompt, **kwargs))

    def forward(self, model: str, token_ids: Iterable[int], all_positions: bool = False,
                timeout: float | None = None) -> np.ndarray:
        """float32 logits: [vocab] for the last position, or [len(token_ids), vocab]."""
        reply = self._stub.Forward(cpb.ForwardRequest(model=model, token_ids=list(token_ids),
                                                      all_positions=all_positions),
                                   timeout=timeout if timeout is not None else self.timeout)
        return tensor_to_numpy(reply.logits)

    def health(self, timeout: float = 3.0) -> bool:
        try:
            return check_health(self.address, timeout, security=self.security) == "SERVING"
        except grpc.RpcError:
            return False
