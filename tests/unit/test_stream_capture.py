"""A stream assembled into a completion object, and a completion object replayed as a stream."""

from __future__ import annotations

import json
from typing import Any

from server.generation.stream_capture import StreamCapture, replay_events


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode()


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def chat_stream() -> list[bytes]:
    return [
        event({**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        event({**HEAD, "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
        event({**HEAD, "choices": [{"index": 0, "delta": {"content": "lo"}, "logprobs": None}]}),
        event({**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        event({**HEAD, "choices": [], "usage": USAGE}),
        b"data: [DONE]",
    ]


def capture(events: list[bytes], chat: bool = True) -> bytes | None:
    c = StreamCapture(chat)
    for e in events:
        c.feed(e)
    return c.result()


def test_a_chat_stream_becomes_a_chat_completion() -> None:
    result = capture(chat_stream())
    assert result is not None
    completion = json.loads(result)
    assert completion["object"] == "chat.completion"
    assert completion["id"] == "chatcmpl-1"
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert completion["usage"] == USAGE


def test_a_text_stream_with_logprobs_becomes_a_text_completion() -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m"}
    last = {"finish_reason": "x"}
    lp = [{"tokens": ["a"], "token_logprobs": [-0.1]}, {"tokens": ["b"], "token_logprobs": [-0.2]}]
    events = [
        event({**head, "choices": [{"index": 0, "text": "a", "logprobs": lp[0]}]}),
        event({**head, "choices": [{"index": 0, "text": "b", "logprobs": lp[1], **last}]}),
        b"data: [DONE]",
    ]
    result = capture(events, chat=False)
    assert result is not None
    choice = json.loads(result)["choices"][0]
    assert choice["text"] == "ab"
    assert choice["finish_reason"] == "x"
    assert choice["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2]}


def test_incomplete_or_failed_streams_are_not_captured() -> None:
    events = chat_stream()
    assert capture(events[:-1]) is None  # no [DONE]: cut short
    assert capture([*events[:2], events[-1]]) is None  # no finish_reason
    error = event({"error": {"message": "boom", "type": "api_error"}})
    assert capture([*events[:2], error, events[-1]]) is None
    assert capture([*events[:2], b"data: {not json", events[-1]]) is None
    tool = event({**HEAD, "choices": [{"index": 0, "delta": {"tool_calls": [{"id": "t"}]}}]})
    assert capture([tool, *events]) is None


def test_replay_is_a_stream_that_captures_back_to_the_same_result() -> None:
    original = capture(chat_stream())
    assert original is not None
    replayed = replay_events(original, chat=True, include_usage=True)
    assert replayed[-1] == b"data: [DONE]\n\n"
    assert all(e.endswith(b"\n\n") for e in replayed)
    chunks = [json.loads(e[len(b"data: ") :]) for e in replayed[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[-1]["usage"] == USAGE
    assert capture([e.removesuffix(b"\n\n") for e in replayed]) == original


def test_replay_leaves_usage_out_unless_asked() -> None:
    original = capture(chat_stream())
    assert original is not None
    replayed = replay_events(original, chat=True, include_usage=False)
    assert not any(b'"usage"' in e for e in replayed)
