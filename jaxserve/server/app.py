"""The OpenAI-compatible HTTP server: `build_app(engine, ...)` -> a FastAPI app.

  POST /v1/completions, /v1/chat/completions   (generation.py; SSE streaming)
  GET  /v1/models                              the base model and every registered adapter
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   (vLLM's)
  GET  /health, /version, /metrics             (metrics.py)

`model` picks the adapter by name (the served model's name: no adapter). The tenant — the
fairness scheduler's client — is the `x-tenant-id` header, else the request's `user`, else the
adapter's name. The engine steps on its own thread (engine_thread.py) from start-up to shutdown.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import jaxserve
from jaxserve.lora.request import LoRARequest
from jaxserve.server import generation
from jaxserve.server.engine_thread import EngineThread
from jaxserve.server.logprobs import TokenTexts
from jaxserve.server.errors import OpenAIError, bad_value, error_body, install_handlers, model_not_found
from jaxserve.server.metrics import ServerMetrics, TenantService, snapshot
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest,
                                      UnloadLoRAAdapterRequest)

logger = logging.getLogger("jaxserve.server")

MAX_BODY_BYTES = 8 * 2**20
_OPEN_PATHS = ("/health",)  # answered without the API key (load balancers' probes)


class OpenAIServer:
    """What the routes share: the engine and its thread, the names served, the limits, the
    metrics. Handlers read the engine's registries (adapters, config); anything that changes it
    goes through the thread."""

    def __init__(self, engine, served_model_name: str, max_waiting_requests: int = 1024):
        if not isinstance(max_waiting_requests, int) or max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests={max_waiting_requests!r} is invalid; allowed: an integer >= 1")
        self.served_model_name = served_model_name
        self.max_waiting_requests = max_waiting_requests
        self.tokenizer = engine.tokenizer
        self.token_texts = TokenTexts(engine.tokenizer)
        self.max_model_len = engine.max_model_len
        w_p, w_q = getattr(engine.scheduler, "w_p", 1.0), getattr(engine.scheduler, "w_q", 2.0)
        self.service = TenantService(w_p, w_q)
        engine.batcher.add_charge_listener(self.service.charge)
        self.metrics = ServerMetrics(served_model_name, engine.config.max_loras)
        self.engine = engine
        self.thread = EngineThread(engine, observe=self.metrics.observe)  # the engine's only caller while serving
        self._lora_ids = itertools.count(1 + max((engine.adapters.request_of(n).lora_int_id
                                                  for n in engine.adapters.names()), default=0))
        self._submitting = 0  # requests on their way into the engine (not yet counted as waiting)
        self.started = time.time()

    # ---- helpers of the routes ------------------------------------------------------------
    def resolve_model(self, name: str) -> LoRARequest | None:
        if name == self.served_model_name:
            return None
        adapters = self.engine.adapters
        try:
            return adapters.request_of(name)
        except KeyError:
            raise model_not_found(name) from None

    def tokenizer_required(self):
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer: send prompts as token ids", param="prompt")
        return self.tokenizer

    def check_context(self, prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        limit = self.max_model_len
        if max_tokens is not None and max_tokens >= 1 and prompt_tokens + max_tokens > limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} "
                              f"in the completion). Please reduce the length of the {param} or completion.",
                              param=param, code="context_length_exceeded")
        if prompt_tokens >= limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, your {param} "
                              f"resulted in {prompt_tokens} tokens (at least one is needed for the completion). "
                              f"Please reduce the length of the {param}.", param=param,
                              code="context_length_exceeded")

    def admit(self, n: int) -> None:
        """Refuse (429) requests past the waiting-queue limit: the queue is never unbounded."""
        waiting = self.thread.num_waiting + self._submitting
        if waiting + n > self.max_waiting_requests:
            self.metrics.rejected.labels("queue_full").inc()
            raise OpenAIError(f"the server is at capacity: {waiting} requests are waiting (limit "
                              f"{self.max_waiting_requests}); retry later", 429, code="rate_limit_exceeded",
                              headers={"retry-after": "1"})
        self._submitting += n

    def admitted(self, n: int) -> None:
        self._submitting -= n

    def abort_all(self) -> None:
        """Shutdown's last word: abort every unfinished request (they end with finish_reason
        "abort")."""
        if self.thread.alive:
            self.thread.post(self.engine.abort_all)

    # ---- adapters -------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        engine = self.engine
        if name == self.served_model_name or name in engine.adapters:
            raise OpenAIError(f"lora_name {name!r} is already in use (the served model or a loaded adapter); "
                              f"unload it first or choose another name", param="lora_name")
        try:
            request = LoRARequest(name, next(self._lora_ids), path)
            loaded = await asyncio.to_thread(engine.load_loras, [request])  # file reads: off the engine thread
        except (ValueError, OSError) as e:
            raise bad_value(ValueError(f"adapter {name!r} at {path!r}: {e}")) from None
        await self.thread.call(engine.register_loras, loaded)

    async def unload_adapter(self, name: str) -> None:
        engine = self.engine
        if name not in engine.adapters:
            raise model_not_found(name)
        try:
            await self.thread.call(engine.remove_lora, name)
        except RuntimeError as e:  # in use
            raise OpenAIError(str(e), 400, param="lora_name") from None
        except KeyError:  # (removed meanwhile)
            raise model_not_found(name) from None

    def models(self) -> list[dict]:
        engine = self.engine
        base = {"id": self.served_model_name, "object": "model", "created": int(self.started), "owned_by": "jaxserve",
                "root": engine.config.model, "parent": None, "max_model_len": self.max_model_len}
        out = [base]
        for name in engine.adapters.names():
            req = engine.adapters.request_of(name)
            out.append({**base, "id": name, "root": str(req.lora_path), "parent": self.served_model_name})
        return out


def build_app(engine, served_model_name: str | None = None, api_key: str | None = None,
              max_waiting_requests: int = 1024, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server over an Engine (its thread starts with the app and stops with it: pending
    requests are aborted)."""
    server = OpenAIServer(engine, served_model_name or engine.config.model, max_waiting_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.thread.start()
        yield
        await asyncio.to_thread(server.thread.stop)

    app = FastAPI(title="jaxserve", version=jaxserve.__version__, lifespan=lifespan)
    app.state.server = server
    install_handlers(app)
    _add_routes(app, server)
    # The last added is the outermost: the body-size check, then the key check, then the routes.
    app.add_middleware(_Auth, api_key=api_key)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    return app


def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generation.run(server, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generation.run(server, body, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.models()}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        await server.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        await server.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health():
        if not server.thread.healthy:
            return JSONResponse(error_body("the engine is not running or its steps keep failing", 503),
                                status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": jaxserve.__version__}

    @app.get("/metrics")
    async def metrics():
        state = await server.thread.call(snapshot, server.engine, server.service)
        return Response(server.metrics.render(state), media_type="text/plain; version=0.0.4; charset=utf-8")


class _Auth:
    """With an API key, every path but /health needs `Authorization: Bearer <key>` (compared in
    constant time)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is None or scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        error = OpenAIError("Incorrect or missing API key: send the header `Authorization: Bearer <key>`.",
                            401, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """Refuses bodies over max_bytes with a 413 (by Content-Length, or while reading a chunked
    one), before anything parses them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        error = OpenAIError(f"the request body is larger than {self.max_bytes} bytes", 413)
        await error.response()(scope, receive, send)
