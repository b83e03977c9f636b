# -*- test-case-name: tests.test_fakeserver -*-
"""
The fake server's OpenAI-compatible API, and llama-server's own routes beside
it: models, chat and text completions (and llama-server's native
C{/completion} and C{/infill}), embeddings, rerank, the Responses API, audio
and images. Each generation answers "Hello from <name> (token i)" tokens,
streamed as server-sent events when the body asks for C{"stream": true}.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from itertools import count
from typing import Any

from twisted.web.server import Request

from llamaswap.testing.fakeserver.base import (
    Endpoint,
    Generation,
    HTTPError,
    JSONObject,
    RenderResult,
    Routes,
    Stream,
    first_arg,
    header,
    include_usage,
    json_response,
    model_of,
    query,
    read_json,
    sse_json,
)
from llamaswap.testing.fakeserver.helpers import (
    PNG_1X1,
    embedding,
    embedding_base64,
    full_text,
    relevance,
    token_text,
    words,
)
from llamaswap.web.sse import DONE


class OpenAIRoutes(Routes):
    """OpenAI's API as llama-server serves it."""

    def table(self) -> dict[str, Endpoint]:
        return {
            "completion": self.post(self.native_completion),
            "completions": self.post(self.native_completion),
            "infill": self.post(self.native_completion),
            "rerank": self.post(self.rerank),
            "reranking": self.post(self.rerank),
            "embedding": self.post(self.embeddings),
            "embeddings": self.post(self.embeddings),
            "v1/models": self.get(self.models),
            "v1/chat/completions": self.post(self.chat),
            "v1/completions": self.post(self.completions),
            "v1/embeddings": self.post(self.embeddings),
            "v1/rerank": self.post(self.rerank),
            "v1/reranking": self.post(self.rerank),
            "v1/responses": self.post(self.responses),
            "v1/audio/transcriptions": self.post(self.transcriptions),
            "v1/audio/speech": self.post(self.speech),
            "v1/audio/voices": self.get(self.voices),
            "v1/images/generations": self.post(self.image_generations),
            "v1/images/edits": self.post(self.image_edits),
        }

    def models(self, request: Request) -> bytes:
        entry = {
            "id": self.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "fakeserver",
        }
        if request.postpath and request.postpath != [b""]:
            wanted = b"/".join(request.postpath).decode("utf-8", "replace")
            if wanted != self.name:
                return self.error(request, 404, f"model not found: {wanted}", "not_found_error")
            return json_response(request, {**entry, "served_by": self.name})
        return json_response(request, {"object": "list", "data": [entry], "served_by": self.name})

    def chat(self, request: Request) -> RenderResult:
        body, raw = read_json(request)
        gen = self.generation(request, body)
        cid = self.fake.next_id("chatcmpl")
        created = int(time.time())

        def produce() -> bytes | Stream:
            if not body.get("stream"):
                return json_response(
                    request,
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": gen.model,
                        "system_fingerprint": "fakeserver",
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": full_text(self.name, gen.tokens),
                                },
                                "logprobs": None,
                                "finish_reason": gen.finish_reason,
                            }
                        ],
                        "usage": self.usage(gen),
                        "timings": self.timings(gen),
                        **self.identity(request, raw, gen.model),
                    },
                )
            base = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": gen.model,
                "system_fingerprint": "fakeserver",
                "served_by": self.name,
            }

            def chunk(delta: JSONObject, finish: str | None = None) -> JSONObject:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**base, "choices": [choice]}

            tail = [sse_json({**chunk({}, gen.finish_reason), "timings": self.timings(gen)})]
            if include_usage(body):
                tail.append(sse_json({**base, "choices": [], "usage": self.usage(gen)}))
            tail.append(DONE)
            return Stream(
                [sse_json(chunk({"role": "assistant", "content": ""}))],
                (sse_json(chunk({"content": token_text(self.name, i)})) for i in range(gen.tokens)),
                tail,
                gen.token_delay,
            )

        return self.deliver(request, gen.wait, produce)

    def completions(self, request: Request) -> RenderResult:
        body, raw = read_json(request)
        gen = self.generation(request, body)
        cid = self.fake.next_id("cmpl")
        created = int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": gen.model}

        def choice(text: str, finish: str | None) -> JSONObject:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        def produce() -> bytes | Stream:
            if not body.get("stream"):
                return json_response(
                    request,
                    {
                        **base,
                        "choices": [choice(full_text(self.name, gen.tokens), gen.finish_reason)],
                        "usage": self.usage(gen),
                        "timings": self.timings(gen),
                        **self.identity(request, raw, gen.model),
                    },
                )
            tail = [sse_json({**base, "choices": [choice("", gen.finish_reason)]})]
            if include_usage(body):
                tail.append(sse_json({**base, "choices": [], "usage": self.usage(gen)}))
            tail.append(DONE)
            return Stream(
                (),
                (
                    sse_json({**base, "choices": [choice(token_text(self.name, i), None)]})
                    for i in range(gen.tokens)
                ),
                tail,
                gen.token_delay,
            )

        return self.deliver(request, gen.wait, produce)

    def native_completion(self, request: Request) -> RenderResult:
        """llama-server's own /completion and /infill."""
        body, raw = read_json(request)
        gen = self.generation(request, body)

        def produce() -> bytes | Stream:
            final = {
                "content": "",
                "stop": True,
                "model": gen.model,
                "tokens_predicted": gen.tokens,
                "tokens_evaluated": gen.prompt_tokens,
                "stop_type": "limit" if gen.finish_reason == "length" else "eos",
                "timings": self.timings(gen),
                "served_by": self.name,
            }
            if not body.get("stream"):
                return json_response(
                    request,
                    {
                        **final,
                        "content": full_text(self.name, gen.tokens),
                        **self.identity(request, raw, gen.model),
                    },
                )
            # llama-server's native stream has no [DONE] terminator.
            return Stream(
                (),
                (
                    sse_json({"content": token_text(self.name, i), "stop": False, "index": 0})
                    for i in range(gen.tokens)
                ),
                [sse_json(final)],
                gen.token_delay,
            )

        return self.deliver(request, gen.wait, produce)

    def embeddings(self, request: Request) -> bytes:
        body, raw = read_json(request)
        model = model_of(body, self.name)
        self.check_model(model)
        items = body.get("input", body.get("content"))
        if isinstance(items, str) or (
            isinstance(items, list) and items and all(isinstance(i, int) for i in items)
        ):
            items = [items]
        if not isinstance(items, list) or not items:
            raise HTTPError(400, "input must be a string or a non-empty list")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = embedding(item if isinstance(item, str) else json.dumps(item))
            value: object = embedding_base64(vector) if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        prompt = max(words(items), 1)
        return json_response(
            request,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
                **self.identity(request, raw, model),
            },
        )

    def rerank(self, request: Request) -> bytes:
        body, raw = read_json(request)
        model = model_of(body, self.name)
        self.check_model(model)
        query = body.get("query")
        documents = body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            raise HTTPError(400, "rerank needs a string 'query' and a list 'documents'")
        texts = [d.get("text", "") if isinstance(d, dict) else str(d) for d in documents]
        results = []
        for index, text in enumerate(texts):
            result: JSONObject = {"index": index, "relevance_score": relevance(query, text)}
            if body.get("return_documents"):
                result["document"] = {"text": text}
            results.append(result)
        results.sort(key=lambda r: -float(r["relevance_score"]))
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n >= 0:
            results = results[:top_n]
        tokens = max(words(query) + words(texts), 1)
        return json_response(
            request,
            {
                "object": "list",
                "model": model,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                **self.identity(request, raw, model),
            },
        )

    def responses(self, request: Request) -> RenderResult:
        """A minimal OpenAI Responses API: one assistant message of output_text."""
        body, raw = read_json(request)
        gen = self.generation(request, body)
        answer = _Response(self.name, gen, self.fake.next_id("resp"), self.fake.next_id("msg"))

        def produce() -> bytes | Stream:
            if not body.get("stream"):
                done = {**answer.completed(), **self.identity(request, raw, gen.model)}
                return json_response(request, done)
            return answer.stream()

        return self.deliver(request, gen.wait, produce)

    # -- audio and images ---------------------------------------------------

    def transcriptions(self, request: Request) -> bytes:
        files = request.args.get(b"file")
        models = request.args.get(b"model")
        if not files or not models:
            raise HTTPError(400, "multipart form needs 'model' and 'file' parts")
        model = models[0].decode("utf-8", "replace")
        self.check_model(model)
        return json_response(
            request,
            {
                "text": f"The length of the file is {len(files[0])} bytes",
                "model": model,
                "h_content_type": header(request, b"content-type"),
                **self.identity(request, None, model),
            },
        )

    def speech(self, request: Request) -> bytes:
        body, _ = read_json(request)
        model = model_of(body, self.name)
        self.check_model(model)
        text = str(body.get("input", ""))
        request.setHeader(b"content-type", b"audio/mpeg")
        # An ID3v2 header, then our signature: enough to look like an mp3 download.
        return b"ID3\x04\x00\x00\x00\x00\x00\x00" + f"{self.name}: {text}".encode()

    def voices(self, request: Request) -> bytes:
        model = query(request, b"model", self.name)
        return json_response(
            request, {"voices": ["voice1"], "model": model, "served_by": self.name}
        )

    def image_generations(self, request: Request) -> bytes:
        body, raw = read_json(request)
        model = model_of(body, self.name)
        self.check_model(model)
        return self._images(request, model, body.get("n"), str(body.get("prompt", "")), raw)

    def image_edits(self, request: Request) -> bytes:
        if not request.args.get(b"image") and not request.args.get(b"image[]"):
            raise HTTPError(400, "multipart form needs an 'image' part")
        model = first_arg(request, b"model") or self.name
        self.check_model(model)
        n = first_arg(request, b"n")
        prompt = first_arg(request, b"prompt") or ""
        return self._images(request, model, int(n) if n and n.isdigit() else 1, prompt, None)

    def _images(
        self, request: Request, model: str, n: object, prompt: str, raw: bytes | None
    ) -> bytes:
        count = n if isinstance(n, int) and 1 <= n <= 10 else 1
        b64 = base64.b64encode(PNG_1X1).decode("ascii")
        return json_response(
            request,
            {
                "created": int(time.time()),
                "data": [{"b64_json": b64, "revised_prompt": prompt} for _ in range(count)],
                "model": model,
                **self.identity(request, raw, model),
            },
        )


class _Response:
    """One answer of the Responses API: its JSON shapes, and its stream of numbered events."""

    def __init__(self, name: str, gen: Generation, rid: str, mid: str) -> None:
        self._name = name
        self._gen = gen
        self._rid = rid
        self._mid = mid
        self._created = int(time.time())
        self._seq = count()
        self.text = full_text(name, gen.tokens)
        self._usage = {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": gen.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.tokens,
        }

    def message(self, content: str, status: str) -> JSONObject:
        part = {"type": "output_text", "text": content, "annotations": []}
        return {
            "type": "message",
            "id": self._mid,
            "status": status,
            "role": "assistant",
            "content": [part] if status == "completed" else [],
        }

    def response(self, status: str, output: list[JSONObject], done: bool) -> JSONObject:
        return {
            "id": self._rid,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "model": self._gen.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": self._usage if done else None,
            "served_by": self._name,
        }

    def completed(self) -> JSONObject:
        return self.response("completed", [self.message(self.text, "completed")], True)

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": next(self._seq), **fields}
        return sse_json(payload, kind)

    def stream(self) -> Stream:
        event, text = self.event, self.text
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": self._mid, "output_index": 0, "content_index": 0}
        in_progress = self.message("", "in_progress")
        head = [
            event("response.created", response=self.response("in_progress", [], False)),
            event("response.in_progress", response=self.response("in_progress", [], False)),
            event("response.output_item.added", output_index=0, item=in_progress),
            event("response.content_part.added", part=part, **where),
        ]
        deltas = (
            event("response.output_text.delta", delta=token, logprobs=[], **where)
            for token in (token_text(self._name, i) for i in range(self._gen.tokens))
        )

        def tail() -> Iterator[bytes]:
            # A generator: runs after the deltas, so sequence numbers stay in order.
            yield event("response.output_text.done", text=text, logprobs=[], **where)
            yield event("response.content_part.done", part={**part, "text": text}, **where)
            final = self.message(text, "completed")
            yield event("response.output_item.done", output_index=0, item=final)
            yield event("response.completed", response=self.completed())

        return Stream(head, deltas, tail(), self._gen.token_delay)
