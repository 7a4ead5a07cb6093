"""Convert between the two shapes of one result, so a streamed and a non-streamed request share
a cache entry: `StreamCapture` assembles a stream's events into the completion object a
non-streamed request would get, and `replay_events` turns a cached completion object back into a
proper SSE stream (role, content, finish, usage when asked, then `[DONE]`).

Only results whose every part is understood are captured; anything else (tool calls, an error
event, a stream cut short) is simply not cached.
"""

from __future__ import annotations

import json
from typing import Any

from server.generation.protocol import dump_json

DONE = b"data: [DONE]"
_CHAT_DELTA_KEYS = {"role", "content"}


class StreamCapture:
    def __init__(self, chat: bool) -> None:
        self._chat = chat
        self._head: dict[str, Any] | None = None
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: dict[str, Any] | None = None
        self._done = False
        self._broken = False

    def feed(self, event: bytes) -> None:
        """One SSE event (without its trailing blank line), as the client receives it."""
        if self._broken:
            return
        if event.strip() == DONE:
            self._done = True
            return
        try:
            chunk = json.loads(event.removeprefix(b"data: "))
            self._absorb(chunk)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._broken = True

    def _absorb(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            raise ValueError("error event")
        if self._head is None:
            self._head = {k: chunk[k] for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for part in chunk["choices"]:
            choice = self._choices.setdefault(
                int(part["index"]), {"text": [], "logprobs": [], "finish_reason": None}
            )
            if self._chat:
                delta = part.get("delta") or {}
                if set(k for k, v in delta.items() if v) - _CHAT_DELTA_KEYS:
                    raise ValueError("a delta with more than text (tool calls, ...)")
                choice["text"].append(delta.get("content") or "")
            else:
                choice["text"].append(part["text"])
            if part.get("logprobs"):
                choice["logprobs"].append(part["logprobs"])
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]

    def result(self) -> bytes | None:
        """The assembled completion object, or None unless the stream finished cleanly."""
        if self._broken or not self._done or self._head is None or not self._choices:
            return None
        choices = []
        for index in sorted(self._choices):
            part = self._choices[index]
            if part["finish_reason"] is None:
                return None
            text = "".join(part["text"])
            logprobs = _join_logprobs(part["logprobs"], self._chat)
            if self._chat:
                message = {"role": "assistant", "content": text}
                choices.append(
                    {"index": index, "message": message, "logprobs": logprobs,
                     "finish_reason": part["finish_reason"]}
                )  # fmt: skip
            else:
                choices.append(
                    {"index": index, "text": text, "logprobs": logprobs,
                     "finish_reason": part["finish_reason"]}
                )  # fmt: skip
        obj = "chat.completion" if self._chat else "text_completion"
        head = self._head
        return dump_json(
            {"id": head["id"], "object": obj, "created": head["created"], "model": head["model"],
             "choices": choices, "usage": self._usage}
        )  # fmt: skip


def _join_logprobs(parts: list[Any], chat: bool) -> Any:
    if not parts:
        return None
    if chat:  # {"content": [...]} per chunk
        return {"content": [item for p in parts for item in (p.get("content") or [])]}
    joined: dict[str, list[Any]] = {}  # {"tokens": [...], "token_logprobs": [...], ...}
    for p in parts:
        for name, values in p.items():
            joined.setdefault(name, []).extend(values or [])
    return joined


def replay_events(result: bytes, chat: bool, include_usage: bool) -> list[bytes]:
    """A cached completion object as the SSE events of a stream, `[DONE]` last."""
    completion = json.loads(result)
    head = {
        "id": completion["id"],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": completion["created"],
        "model": completion["model"],
    }
    chunks: list[dict[str, Any]] = []
    for choice in completion["choices"]:
        index, logprobs, finish = choice["index"], choice.get("logprobs"), choice["finish_reason"]
        if chat:
            text = choice["message"].get("content") or ""
            chunks.append({"index": index, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None})  # fmt: skip
            chunks.append({"index": index, "delta": {"content": text}, "logprobs": logprobs,
                           "finish_reason": None})  # fmt: skip
            chunks.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish})
        else:
            chunks.append({"index": index, "text": choice["text"], "logprobs": logprobs,
                           "finish_reason": finish})  # fmt: skip
    events = [b"data: " + dump_json({**head, "choices": [c]}) + b"\n\n" for c in chunks]
    if include_usage and completion.get("usage"):
        usage_chunk = {**head, "choices": [], "usage": completion["usage"]}
        events.append(b"data: " + dump_json(usage_chunk) + b"\n\n")
    events.append(DONE + b"\n\n")
    return events
