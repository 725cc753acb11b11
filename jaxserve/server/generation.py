"""POST /v1/completions and /v1/chat/completions: a request's choices (each prompt times n) run
as engine requests at once, and come back as one OpenAI response or as an SSE stream.

A client that goes away mid-generation aborts them: a stream when Starlette cancels it (it
listens for the disconnect), a plain request through `until_disconnected`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from jaxserve.outputs import RequestOutput
from jaxserve.server.errors import OpenAIError, bad_value, error_body
from jaxserve.server.logprobs import chat_logprobs, completion_logprobs
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest

_SEED_MOD = 2**63


@dataclasses.dataclass
class Choice:
    """One generated completion of a response, accumulated from its delta outputs."""
    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    def add(self, out: RequestOutput) -> tuple[str, list, list]:
        c = out.outputs[0]
        self.text += c.text
        self.token_ids += c.token_ids
        self.logprobs += c.logprobs or []
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = c.finish_reason, c.stop_reason, c.error
        return c.text, c.token_ids, c.logprobs or []


class Job:
    """A completions or chat request, checked and turned into engine requests."""

    def __init__(self, server, body: CompletionRequest | ChatCompletionRequest, http: Request):
        self.server, self.body, self.chat = server, body, isinstance(body, ChatCompletionRequest)
        self.lora = server.resolve_model(body.model)
        try:
            params = body.to_sampling_params()
            prompts = self._prompts()
        except ValueError as e:
            raise bad_value(e) from None
        self.prompt_texts = [p.get("prompt") for p in prompts]
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.client = http.headers.get("x-tenant-id") or body.user or None
        self.requests, self.choices = [], []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                seed = params.seed if params.seed is None or j == 0 else (params.seed + j) % _SEED_MOD
                index = len(self.choices)
                self.requests.append((f"{self.id}-{index}", prompt, dataclasses.replace(params, seed=seed),
                                      self.lora, self.client))
                self.choices.append(Choice(index, len(prompt["prompt_token_ids"])))

    def _prompts(self) -> list[dict]:
        """Each prompt as {"prompt", "prompt_token_ids"}, checked against the context length."""
        server, body = self.server, self.body
        if self.chat:
            messages = [m.as_template_message() for m in body.messages]
            text = server.tokenizer_required().apply_chat_template(
                messages, body.add_generation_prompt, tools=body.tools, **(body.chat_template_kwargs or {}))
            prompts = [{"prompt": text, "prompt_token_ids": server.tokenizer.encode(text, add_special_tokens=False)}]
        else:
            prompts = []
            for p in body.prompts():
                if isinstance(p, str):
                    prompts.append({"prompt": p, "prompt_token_ids": server.tokenizer_required().encode(p)})
                else:
                    prompts.append({"prompt": None, **p})
        for p in prompts:
            server.check_context(len(p["prompt_token_ids"]), body_max_tokens(body),
                                 "messages" if self.chat else "prompt")
        return prompts

    # ---- responses ------------------------------------------------------------------------
    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for c in self.choices[::self.body.n])
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self) -> dict:
        failed = next((c for c in self.choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise OpenAIError(f"generation failed: {failed.error}", 500)
        choices = [self._choice(c) for c in self.choices]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices, "usage": self.usage()}

    def _choice(self, c: Choice) -> dict:
        base = {"index": c.index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if self.chat:
            return {**base, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.token_ids, c.logprobs)}
        text = c.text
        if self.body.echo:
            text = self.prompt_text(c.index // self.body.n) + text
        return {**base, "text": text, "logprobs": self._completion_logprobs(c.token_ids, c.logprobs, 0)}

    def prompt_text(self, p: int) -> str:
        text = self.prompt_texts[p]
        if text is None and self.server.tokenizer is not None:
            text = self.server.tokenizer.decode(self.requests[p * self.body.n][1]["prompt_token_ids"],
                                                skip_special_tokens=False)
        return text or ""

    def chunk(self, index: int, text: str, token_ids: list, logprobs: list, finish: Choice | None,
              offset: int = 0, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text or not finish else {})
            choice = {"index": index, "delta": delta, "logprobs": self._chat_logprobs(token_ids, logprobs)}
        else:
            choice = {"index": index, "text": text,
                      "logprobs": self._completion_logprobs(token_ids, logprobs, offset)}
        choice["finish_reason"] = finish.finish_reason if finish else None
        if finish:
            choice["stop_reason"] = finish.stop_reason
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.body.model,
                "choices": [choice]}

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _completion_logprobs(self, token_ids: list, tops: list, offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        return completion_logprobs(self.server.token_texts, token_ids, tops, self.body.logprobs, offset)

    def _chat_logprobs(self, token_ids: list, tops: list) -> dict | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(self.server.token_texts, token_ids, tops, self.body.top_logprobs or 0)


def body_max_tokens(body) -> int | None:
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


async def run(server, body, http: Request):
    job = Job(server, body, http)
    outputs = await submit(server, job)
    if body.stream:
        return StreamingResponse(_sse(job, outputs), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(outputs.close))  # (also after a disconnect)
    collect = asyncio.ensure_future(_collect(job, outputs))
    return await until_disconnected(http, collect)


async def submit(server, job: Job):
    """The job's requests into the engine (all or none), past the waiting-queue limit."""
    server.admit(len(job.requests))
    try:
        return await server.thread.submit(job.requests)
    except ValueError as e:
        raise bad_value(e) from None
    finally:
        server.admitted(len(job.requests))


async def until_disconnected(http: Request, work: asyncio.Future):
    """work's result, unless the client disconnects first: then work is cancelled (aborting its
    requests) and nobody is answered."""
    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        try:
            await work
        except (asyncio.CancelledError, Exception):
            pass
        return JSONResponse(error_body("the client disconnected", 499), status_code=499)
    return work.result()


async def _collect(job: Job, outputs):
    try:
        async for index, out in outputs:
            job.choices[index].add(out)
    finally:
        outputs.close()
    return JSONResponse(job.response())


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(job: Job, outputs) -> AsyncIterator[str]:
    """The SSE stream: per choice, (chat) a first chunk with the role, then its deltas, the last
    with its finish_reason; a usage chunk when asked; then [DONE]. Errors after the stream began
    arrive as an error event (the status line is long sent)."""
    body, offsets = job.body, [0] * len(job.choices)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
    try:
        if job.chat:
            for c in job.choices:
                yield _event(job.chunk(c.index, "", [], [], None, role=True))
        elif body.echo:
            for c in job.choices:
                text = job.prompt_text(c.index // body.n)
                offsets[c.index] = len(text)
                yield _event(job.chunk(c.index, text, [], [], None))
        async for index, out in outputs:
            choice = job.choices[index]
            text, token_ids, logprobs = choice.add(out)
            if choice.finish_reason == "error":
                yield _event(error_body(f"generation failed: {choice.error}", 500))
                break
            if not text and not out.finished and not logprobs:
                continue  # (e.g. the start of a multi-byte character, held back)
            chunk = job.chunk(index, text, token_ids, logprobs, choice if out.finished else None, offsets[index])
            offsets[index] += len(text)
            if continuous:
                chunk["usage"] = job.usage()
            yield _event(chunk)
        else:
            if body.include_usage:
                yield _event({"id": job.id, "object": job.chunk_object, "created": job.created,
                              "model": body.model, "choices": [], "usage": job.usage()})
    except RuntimeError as e:  # the engine step failed, or the engine shut down
        yield _event(error_body(str(e), 500))
    finally:
        outputs.close()
    yield "data: [DONE]\n\n"
