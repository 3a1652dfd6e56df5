"""cortex's per-node generation stream: updates that queued up for one generation go out as one
response with the same ids, text and final fields."""
from __future__ import annotations

from common.proto.neuron.v1 import neuron_pb2 as npb
from cortex.node_streams import merge


def test_merged_responses_keep_every_id_and_the_text_in_order_and_the_last_ones_finish():
    parts = [npb.GenerateResponse(token_ids=[5], text="he", request_id="r"),
             npb.GenerateResponse(token_ids=[6, 7], text="llo", request_id="r"),
             npb.GenerateResponse(token_ids=[8], text="!", request_id="r", finish_reason=npb.FINISH_REASON_STOP,
                                  stop_reason="eos", usage=npb.Usage(prompt_tokens=3, completion_tokens=4))]
    merged = merge(parts)
    assert list(merged.token_ids) == [5, 6, 7, 8] and merged.text == "hello!"
    assert (merged.finish_reason, merged.stop_reason, merged.usage.completion_tokens) == (
        npb.FINISH_REASON_STOP, "eos", 4)
    assert merged.request_id == "r"
    assert list(parts[-1].token_ids) == [8]  # the inputs are left as they were


def test_a_single_response_passes_unchanged():
    one = npb.GenerateResponse(token_ids=[1, 2], text="ab")
    assert merge([one]) is one
