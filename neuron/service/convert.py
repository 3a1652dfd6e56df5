"""neuron.v1 messages <-> the neuron's domain types. The only place below the handlers that reads
protobuf, so the engine, sampler and tokenizer never depend on the wire format."""
from __future__ import annotations

import numpy as np

from common.proto.neuron.v1 import neuron_pb2 as pb
from neuron.sampling import SamplingRequest


def _as_written(value: float) -> float:
    """A proto float (float32 on the wire) as the number the client wrote: 0.7, not
    0.699999988079071. Resolution and error messages then show the caller's own value."""
    return float(str(np.float32(value)))


def sampling_request(params: pb.SamplingParams) -> SamplingRequest:
    """The request's sampling fields, None where the caller left an optional field unset."""
    def optional(field: str, as_float: bool = False):
        if not params.HasField(field):
            return None
        value = getattr(params, field)
        return _as_written(value) if as_float else int(value)

    return SamplingRequest(
        max_tokens=optional("max_tokens"),
        temperature=optional("temperature", as_float=True),
        top_k=optional("top_k"),
        top_p=optional("top_p", as_float=True),
        min_p=optional("min_p", as_float=True),
        repetition_penalty=optional("repetition_penalty", as_float=True),
        seed=optional("seed"),
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )


def graph_fields(graphs) -> dict:
    """ShardInfo's CUDA-graph fields from the runner's DecodeGraphs (None: decode turns run eagerly)."""
    if graphs is None or not graphs.capture_graphs:
        return {}
    report = graphs.report
    fields = {"cuda_graph_batch_sizes": sorted(report.sizes), "cuda_graph_seconds": report.seconds,
              "cuda_graph_pool_bytes": report.pool_bytes}
    if report.mixed_sizes:
        fields.update(cuda_graph_mixed_batch_sizes=sorted(report.mixed_sizes), cuda_graph_mixed_chunk=graphs.mixed_chunk)
    return fields
