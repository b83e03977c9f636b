# -*- test-case-name: tests.test_fakeserver -*-
"""
The fake server's Anthropic Messages API: C{/v1/messages} (streamed as
Anthropic's named events when asked) and C{/v1/messages/count_tokens}.
"""

from __future__ import annotations

from twisted.web.server import Request

from llamaswap.testing.fakeserver.base import (
    Endpoint,
    JSONObject,
    RenderResult,
    Routes,
    Stream,
    json_response,
    model_of,
    read_json,
    sse_json,
)
from llamaswap.testing.fakeserver.helpers import full_text, token_text, words


class AnthropicRoutes(Routes):
    """Anthropic's Messages API."""

    def table(self) -> dict[str, Endpoint]:
        return {
            "v1/messages": self.post(self.messages),
            "v1/messages/count_tokens": self.post(self.count_tokens),
        }

    def messages(self, request: Request) -> RenderResult:
        body, raw = read_json(request)
        gen = self.generation(request, body)
        mid = self.fake.next_id("msg")
        stop_reason = "max_tokens" if gen.finish_reason == "length" else "end_turn"
        message: JSONObject = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": gen.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0},
        }

        def produce() -> bytes | Stream:
            if not body.get("stream"):
                done = {
                    **message,
                    "content": [{"type": "text", "text": full_text(self.name, gen.tokens)}],
                    "stop_reason": stop_reason,
                    "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.tokens},
                }
                return json_response(request, {**done, **self.identity(request, raw, gen.model)})
            head = [
                _event("message_start", {"type": "message_start", "message": message}),
                _event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                _event("ping", {"type": "ping"}),
            ]
            deltas = (
                _event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": token_text(self.name, i)},
                    },
                )
                for i in range(gen.tokens)
            )
            tail = [
                _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": {"output_tokens": gen.tokens},
                    },
                ),
                _event("message_stop", {"type": "message_stop"}),
            ]
            return Stream(head, deltas, tail, gen.token_delay)

        return self.deliver(request, gen.wait, produce)

    def count_tokens(self, request: Request) -> bytes:
        body, raw = read_json(request)
        model = model_of(body, self.name)
        self.check_model(model)
        count = max(words(body.get("messages")) + words(body.get("system")), 1)
        return json_response(request, {"input_tokens": count, **self.identity(request, raw, model)})


def _event(kind: str, obj: JSONObject) -> bytes:
    """One of Anthropic's named stream events."""
    return sse_json(obj, kind)
