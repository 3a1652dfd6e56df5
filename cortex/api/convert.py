"""Conversions at cortex's edge between the public API (cortex.v1, what clients compile) and the
internal node API (neuron.v1, what neurons speak).

The public messages started as copies of the internal ones, with the same names and numbers. Each
field is copied by name here, on purpose: a field the neuron gains does not reach clients until it
is added to cortex.v1 and to this module, and a field renamed on the neuron side fails here, in
tests, rather than silently vanishing from the public replies.
"""
from __future__ import annotations

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb

# The proto3 `optional` fields of SamplingParams: copied only when the client set them, so that an
# unset field still means "the model's generation_config.json value".
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_SHARD_FIELDS = ("handle", "model", "dtype", "weight_bytes", "kv_bytes", "tp_rank", "tp_size", "group_id", "error",
                 "path", "architecture", "max_context", "vocab_size",
                 "kv_block_size", "kv_blocks_total", "kv_tokens", "max_seqs", "running", "waiting", "kv_blocks_used",
                 "prefix_cache_queries", "prefix_cache_hits", "cuda_graph_batch_sizes", "cuda_graph_seconds",
                 "cuda_graph_pool_bytes", "warm_up_seconds", "cuda_graph_mixed_batch_sizes", "cuda_graph_mixed_chunk")
_PROGRESS_FIELDS = ("stage", "bytes_done", "bytes_total", "tensors_done", "tensors_total", "gb_per_s")


# ---------------------------------------------------------------- public -> node

def prompt(p: cpb.Prompt) -> npb.Prompt:
    kind = p.WhichOneof("kind")
    if kind == "text":
        return npb.Prompt(text=p.text)
    if kind == "tokens":
        return npb.Prompt(tokens=npb.TokenIds(ids=p.tokens.ids))
    if kind == "chat":
        return npb.Prompt(chat=npb.Chat(messages=[npb.ChatMessage(role=m.role, content=m.content)
                                                  for m in p.chat.messages]))
    return npb.Prompt()


def sampling(s: cpb.SamplingParams) -> npb.SamplingParams:
    given = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING if s.HasField(name)}
    return npb.SamplingParams(**given, stop=s.stop, stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos)


def generate_request(request: cpb.GenerateRequest, handle: int, request_id: str) -> npb.GenerateRequest:
    return npb.GenerateRequest(handle=handle, prompt=prompt(request.prompt), sampling=sampling(request.sampling),
                               request_id=request_id)


def forward_request(request: cpb.ForwardRequest, handle: int) -> npb.ForwardRequest:
    return npb.ForwardRequest(handle=handle, token_ids=request.token_ids, all_positions=request.all_positions)


# ---------------------------------------------------------------- node -> public

def generate_response(chunk: npb.GenerateResponse, request_id: str) -> cpb.GenerateResponse:
    """The neuron's message as cortex's. The two GenerateResponse types are the same on the wire
    (tests/unit/test_public_api.py holds their fields equal; a finish reason the neuron gains before
    cortex.v1 does passes as its number, proto3 enums being open), so one parse of its bytes is the
    conversion: half the CPU of copying field by field, paid once per message per client stream."""
    reply = cpb.GenerateResponse.FromString(chunk.SerializeToString())
    if reply.request_id != request_id:
        reply.request_id = request_id
    return reply


def forward_response(reply: npb.ForwardResponse) -> cpb.ForwardResponse:
    t = reply.logits
    return cpb.ForwardResponse(logits=cpb.Tensor(shape=t.shape, dtype=t.dtype, data=t.data))


def shard_summary(s: npb.ShardSummary) -> cpb.ShardSummary:
    return cpb.ShardSummary(**{name: getattr(s, name) for name in _SHARD_FIELDS})


def device(d: npb.Device) -> cpb.Device:
    return cpb.Device(id=d.id, kind=d.kind, name=d.name, total_bytes=d.total_bytes, free_bytes=d.free_bytes,
                      shards=[shard_summary(s) for s in d.shards], busy=d.busy, error=d.error)


def load_progress(p: npb.LoadProgress) -> cpb.LoadProgress:
    return cpb.LoadProgress(**{name: getattr(p, name) for name in _PROGRESS_FIELDS})


def node(n, now: float) -> cpb.Node:
    """A registry Node (cortex/registry.py) as the public listing shows it."""
    return cpb.Node(address=n.address, state=cpb.NODE_STATE_UP if n.up else cpb.NODE_STATE_DOWN,
                    reason="" if n.up else n.reason, source=n.source, host=n.host, version=n.version,
                    devices=[device(d) for d in n.devices],
                    last_seen_seconds_ago=(now - n.last_seen) if n.last_seen is not None else -1.0)
