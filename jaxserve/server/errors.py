"""Errors in OpenAI's body shape — {"error": {"message", "type", "param", "code"}} — with the
status codes the `openai` SDK maps to its exception classes."""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
          500: "server_error", 503: "server_error"}


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.headers = message, status, param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")


_FIELD = re.compile(r"^(?:SamplingParams\.)?(\w+)=")
_REQUEST_FIELDS = {"prompt_token_ids": "prompt"}  # engine names -> the request's field


def bad_value(error: ValueError) -> OpenAIError:
    """An engine ValueError (it names the value and what is allowed) as a 400, with the field as
    param where the message starts with one."""
    message = str(error)
    match = _FIELD.match(message)
    param = match.group(1) if match else None
    return OpenAIError(message, 400, param=_REQUEST_FIELDS.get(param, param))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # FastAPI's 422 becomes OpenAI's 400: the first problem, with its field as param.
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg')}"
        else:
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
            if "input" in first and where:
                message += f" (got {first['input']!r:.80})"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        param = loc[0] if loc and first.get("type") != "json_invalid" else None
        return OpenAIError(message, 400, param=param).response()

    @app.exception_handler(RuntimeError)
    async def _engine_error(request: Request, exc: RuntimeError):  # the engine failed or shut down
        return JSONResponse(error_body(str(exc), 500), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
