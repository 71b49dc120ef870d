"""The HTTP layer: routes, OpenAI-shaped responses and errors, and per-request metrics.

Every failure a client can cause is answered with an OpenAI error body and a 4xx, and nothing a
request does stops the server: errors are caught in one middleware, which also counts every answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmtrain.logs import Logger
from llmtrain.serve.chat import parse_chat, render_prompt
from llmtrain.serve.errors import ApiError, invalid, not_ready
from llmtrain.serve.logprobs import TokenLogprob
from llmtrain.serve.metrics import ServingMetrics
from llmtrain.serve.protocol import SamplingParams, check_context, parse_completion
from llmtrain.serve.text import Delta
from llmtrain.serve.views import ChatView, Choice, CompletionView, View, finished_delta

if TYPE_CHECKING:  # the engine imports torch; the server answers probes before that import finishes
    from llmtrain.serve.engine import Engine

MAX_BODY_BYTES = 1 << 20  # a 64-prompt request of long prompts fits; anything bigger is not a prompt


@dataclass
class ServerState:
    model_name: str
    max_tokens_limit: int
    metrics: ServingMetrics
    log: Logger = field(default_factory=lambda: Logger(rank=0))
    engine: Engine | None = None
    context_length: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0
    """Completion requests being answered (drain waits for them)."""
    energy_poll: asyncio.Task[None] | None = None
    """Reads the energy counter between scrapes (cli._measure_energy), when there is one."""

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining


STATE = web.AppKey("state", ServerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[_observe], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def _error_response(err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response(err.body(), status=err.status, headers=headers)
    response["error_type"], response["error_message"] = err.type, err.message
    return response


def _from_http(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own refusals (no route, wrong method, body too large) in OpenAI's shape."""
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, f"Unknown request URL: {request.method} {request.path}", code="unknown_url")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(
            405,
            f"Method {request.method} is not allowed for {request.path}; use {allowed}",
            code="method_not_allowed",
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    return ApiError(
        exc.status, exc.reason, type_="invalid_request_error" if exc.status < 500 else "server_error"
    )


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    start = time.monotonic()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except ApiError as err:
        response = _error_response(err)
    except web.HTTPException as exc:
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = _error_response(_from_http(exc, request), allow)
    except Exception as exc:  # a bug answers 500 and is logged; the server keeps serving
        state.log.event("request_failed", route=route, error=f"{type(exc).__name__}: {exc}")
        response = _error_response(ApiError(500, "internal server error", type_="server_error"))
    state.metrics.requests.labels(route, str(response.status)).inc()
    state.metrics.latency.labels(route).observe(time.monotonic() - start)
    if "error_type" in response:  # an error body; /readyz's 503 while loading is a state, not an error
        state.metrics.errors.labels(response["error_type"]).inc()
        state.log.event(
            "request_error",
            route=route,
            method=request.method,
            status=response.status,
            message=response["error_message"],
        )
    return response


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object.",
            code="invalid_json",
        ) from None


def _engine(request: web.Request) -> Engine:
    """The engine, if the server takes work now; the body must be JSON."""
    state = request.app[STATE]
    if state.draining:
        raise not_ready("the server is shutting down; retry on another replica")
    engine = state.engine
    if engine is None:
        raise not_ready("the model is still loading; retry when /readyz answers 200")
    if request.content_type != "application/json":
        raise ApiError(
            415,
            f"Content-Type must be application/json, got {request.content_type}",
            code="unsupported_media_type",
        )
    return engine


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = _engine(request)
    body = _decode_json(await request.read())
    req = parse_completion(body, state.model_name, state.max_tokens_limit, engine.vocab_size)
    prompts = [list(p) if isinstance(p, tuple) else engine.tokenize(p) for p in req.prompts]
    for i, ids in enumerate(prompts):
        check_context(len(ids), req.params.max_tokens, state.context_length, i)
    texts = [p if isinstance(p, str) else engine.decode(prompts[i]) for i, p in enumerate(req.prompts)]
    scores: list[list[TokenLogprob | None]] | None = None
    if req.echo and req.params.logprobs is not None:
        scores = await engine.score(prompts, req.params.logprobs)
    view = CompletionView(state.model_name, engine.token_text, req, prompts, texts, scores)
    return await _serve(request, state, engine, view, [p for p in prompts for _ in range(req.n)], req.params)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = _engine(request)
    req = parse_chat(
        _decode_json(await request.read()), state.model_name, state.max_tokens_limit, engine.vocab_size
    )
    prompt = engine.tokenize(render_prompt(engine.tokenizer, req.messages), special=False)
    params = req.params
    if req.max_tokens is None:  # OpenAI's chat default: as much as the context leaves
        params = replace(
            params, max_tokens=max(1, min(state.max_tokens_limit, state.context_length - len(prompt)))
        )
    check_context(len(prompt), params.max_tokens, state.context_length, -1)
    view = ChatView(state.model_name, engine.token_text, req, len(prompt))
    return await _serve(request, state, engine, view, [prompt] * req.n, params)


async def _serve(
    request: web.Request,
    state: ServerState,
    engine: Engine,
    view: View,
    prompts: list[list[int]],
    params: SamplingParams,
) -> web.StreamResponse:
    """Generate one sequence per prompt (choice), and answer in the view's format."""
    sink: asyncio.Queue[Delta]
    seqs: list[Any] = []
    if params.max_tokens == 0:  # echo scoring only: every choice is finished before it starts
        sink = asyncio.Queue()
        for i in range(len(prompts)):
            sink.put_nowait(finished_delta(i))
    else:
        sink, seqs = engine.submit(prompts, params)
    state.inflight += 1
    try:
        if view.stream:
            return await _stream(request, view, sink, len(prompts))
        return await _complete(view, sink, len(prompts))
    finally:
        state.inflight -= 1
        for seq in seqs:  # client gone or request failed: free the rows
            seq.cancelled = not seq.finished


def _generation_error(delta: Delta) -> ApiError:
    return ApiError(500, f"generation failed: {delta.error}", type_="server_error")


async def _complete(view: View, sink: asyncio.Queue[Delta], n: int) -> web.Response:
    choices = [Choice() for _ in range(n)]
    done = 0
    while done < n:
        delta = await sink.get()
        if delta.error:
            raise _generation_error(delta)
        choices[delta.index].add(delta)
        done += delta.finish_reason is not None
    return web.json_response(view.response(choices))


async def _stream(request: web.Request, view: View, sink: asyncio.Queue[Delta], n: int) -> web.StreamResponse:
    """Server-sent events: one ``data: {chunk}`` per text delta, then ``data: [DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    choices = [Choice() for _ in range(n)]
    done = 0
    try:
        for chunk in view.first_chunks(n):
            await _event(response, chunk)
        while done < n:
            delta = await sink.get()
            if delta.error:
                await _event(response, _generation_error(delta).body())
                return response
            choices[delta.index].add(delta)
            done += delta.finish_reason is not None
            await _event(response, view.chunk(delta))
        if view.include_usage:
            await _event(response, view.usage_chunk(choices))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client went away; _serve frees its rows
    return response


async def _event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card: dict[str, Any] = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "llmop",
    }
    if state.context_length:
        card["max_model_len"] = state.context_length
    return web.json_response({"object": "list", "data": [card]})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers (loading or not)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 once the model is loaded and warmed up, 503 while loading or draining."""
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ready", "model": state.model_name})
    status = "draining" if state.draining else "loading"
    return web.json_response({"status": status}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
