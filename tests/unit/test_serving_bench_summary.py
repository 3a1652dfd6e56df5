"""serving_bench's latency summary: a message of several tokens shares its gap among them, so merged
messages do not pull the inter-token median towards zero."""
from __future__ import annotations

from bench.serving_bench import summarize


def test_a_message_of_several_tokens_shares_its_gap():
    streams = [{"submitted": 0.0, "arrivals": [(0.010, 1), (0.014, 2), (0.016, 1)], "error": None},
               {"submitted": 0.0, "arrivals": [(0.020, 1), (0.050, 3)], "error": None}]
    summary = summarize(streams, 4)
    # stream 1: 4 ms over 2 tokens, then 2 ms; stream 2: 30 ms over 3 tokens
    assert abs(summary["itl_p50_ms"] - 6.0) < 1e-9          # the median of 2, 2, 2, 10, 10, 10
    assert abs(summary["ttft_p50_ms"] - 15.0) < 1e-9
    assert summary["output_tokens"] == 8 and summary["messages"] == 5 and summary["short_streams"] == 0
    assert abs(summary["output_tok_s"] - 8 / 0.050) < 1e-6


def test_the_neurons_share_of_the_first_token_and_the_submission_spread():
    streams = [{"submitted": 0.000, "arrivals": [(0.030, 1)], "node_ttft_ms": 12.0, "error": None},
               {"submitted": 0.004, "arrivals": [(0.040, 1)], "node_ttft_ms": 20.0, "error": None},
               {"submitted": 0.002, "arrivals": [], "node_ttft_ms": None, "error": "UNAVAILABLE: gone"}]
    summary = summarize(streams, 1)
    assert abs(summary["node_ttft_p50_ms"] - 16.0) < 1e-9     # the two that returned a token
    assert abs(summary["submit_spread_ms"] - 4.0) < 1e-9       # every submission, failed ones too
    assert summary["errors"] == 1
