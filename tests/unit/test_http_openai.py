"""The HTTP front's pure parts: OpenAI bodies into GenerateRequests, and gRPC codes into HTTP errors."""
from __future__ import annotations

import grpc
import pytest

from common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, \
    Unavailable
from cortex.http import openai_api
from cortex.http.errors import ApiError, failed_model_error, from_service_error


def parse(body: dict, chat: bool = False):
    return openai_api.parse({"model": "m", **body}, chat)


def refused(body: dict, chat: bool = False) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse(body, chat)
    assert err.value.status == 400
    return err.value


def test_completion_body_sets_prompt_and_every_sampling_field():
    c = parse({"prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.1,
               "repetition_penalty": 1.1, "seed": 3, "stop": "\n", "stream": True,
               "stream_options": {"include_usage": True}})
    r = c.request
    assert r.model == "m" and r.prompt.text == "hi" and not c.chat and c.stream and c.include_usage
    s = r.sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop)) == (7, 40, 3, ["\n"])
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9) and s.min_p == pytest.approx(0.1)
    assert s.repetition_penalty == pytest.approx(1.1)


def test_unset_sampling_fields_stay_unset_so_the_model_defaults_apply():
    s = parse({"prompt": "hi"}).request.sampling
    assert not any(s.HasField(f) for f in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed"))


def test_token_prompts_batches_of_one_and_top_k_minus_one():
    assert list(parse({"prompt": [1, 2, 3]}).request.prompt.tokens.ids) == [1, 2, 3]
    assert parse({"prompt": ["only"]}).request.prompt.text == "only"
    assert parse({"prompt": "x", "top_k": -1}).request.sampling.top_k == 0


def test_chat_messages_with_text_parts_and_max_completion_tokens_first():
    c = parse({"messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
               "max_tokens": 5, "max_completion_tokens": 9}, chat=True)
    assert [(m.role, m.content) for m in c.request.prompt.chat.messages] == [("system", "be brief"), ("user", "ab")]
    assert c.request.sampling.max_tokens == 9


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_or_unsupported_fields_are_refused_naming_them(body, param):
    assert refused(body).param == param


def test_missing_model_and_non_text_chat_parts_are_refused():
    with pytest.raises(ApiError) as err:
        openai_api.parse({"prompt": "x"}, chat=False)
    assert err.value.param == "model"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "image_url" in refused({"messages": image}, chat=True).message


def test_off_values_of_unsupported_fields_are_accepted():
    parse({"prompt": "x", "logprobs": None, "echo": False, "n": 1, "presence_penalty": 0, "best_of": 1})


@pytest.mark.parametrize("error, status", [
    (InvalidArgument("x"), 400), (FailedPrecondition("x"), 400), (NotFound("x"), 404), (ResourceExhausted("x"), 429),
    (Unavailable("x"), 503), (DeadlineExceeded("x"), 504),
])
def test_grpc_codes_map_to_http_statuses(error, status):
    api = from_service_error(error)
    assert api.status == status and set(api.body()["error"]) == {"message", "type", "param", "code"}


def test_a_failed_model_is_503_and_unknown_codes_are_500():
    assert failed_model_error(FailedPrecondition("model m failed")).status == 503
    odd = InvalidArgument("x")
    odd.code = grpc.StatusCode.DATA_LOSS
    assert from_service_error(odd).status == 500
