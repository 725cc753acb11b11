"""`jaxserve serve`: the OpenAI-compatible server on uvicorn.

SIGTERM or SIGINT stops it gracefully: no new connections, in-flight requests get up to
--shutdown-timeout seconds to finish (then they are aborted), the engine thread ends, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvicorn

logger = logging.getLogger("jaxserve.server")


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose graceful shutdown ends in an abort: requests in flight get `grace`
    seconds to finish, then the engine aborts them, so each ends as a normal response with
    finish_reason "abort" (a stream: then [DONE]) rather than a cut connection. uvicorn's own
    timeout (cancelling the handlers) stays as a backstop."""

    def __init__(self, app, grace: float = 30.0, **config):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=grace + 10, **config))
        self.grace = grace

    async def shutdown(self, sockets=None):
        asyncio.get_running_loop().call_later(self.grace, self.config.app.state.server.abort_all)
        await super().shutdown(sockets)


def _pairs(values: list[str], flag: str, kind=str) -> dict:
    out = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {value!r} is invalid; allowed: NAME=VALUE")
        try:
            out[name] = kind(rest)
        except ValueError:
            raise ValueError(f"{flag} {value!r} is invalid; allowed: NAME={kind.__name__}") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxserve.sched import SCHEDULERS
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="a PEFT adapter served as model NAME "
                   "(repeat for more; more can be loaded at run time: POST /v1/load_lora_adapter)")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: --model as given)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every path but /health")
    p.add_argument("--scheduler", default="fcfs", choices=sorted(SCHEDULERS), help="fairness policy across tenants")
    p.add_argument("--tenant-weight", action="append", metavar="NAME=W",
                   help="a tenant's weight under vtc / vtc-predict / lcf (default 1; repeat for more)")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="requests waiting for admission past which new ones get 429 (default 1024)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def main(args, engine_kwargs: dict) -> int:
    from jaxserve import runtime
    from jaxserve.config import EngineConfig
    from jaxserve.engine import Engine
    from jaxserve.lora.request import LoRARequest
    from jaxserve.server.app import build_app

    logging.getLogger("jaxserve").setLevel(args.log_level.upper())  # (jaxserve's logger has its handler)
    loras = _pairs(args.lora, "--lora")
    weights = _pairs(args.tenant_weight, "--tenant-weight", float)
    options = {"weights": weights} if weights else None
    engine = Engine(EngineConfig(**engine_kwargs, scheduler=args.scheduler, scheduler_options=options))
    for i, (name, path) in enumerate(loras.items(), start=1):
        engine.add_lora(LoRARequest(name, i, path))
    runtime.freeze_startup_heap()
    name = args.served_model_name or args.model
    app = build_app(engine, name, api_key=args.api_key, max_waiting_requests=args.max_waiting_requests)
    server = GracefulServer(app, args.shutdown_timeout, host=args.host, port=args.port, log_level=args.log_level)
    # uvicorn handles SIGTERM / SIGINT while it serves and re-raises them once it has shut down;
    # these handlers take that re-raise, so a graceful stop exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        logger.info("starting: %r%s with the %s scheduler, on http://%s:%d/v1", name,
                    f" and adapters {', '.join(loras)}" if loras else "", args.scheduler, args.host, args.port)
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped")
    return 0 if server.started else 1
