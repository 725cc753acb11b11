"""A jaxserve server for tests: uvicorn on 127.0.0.1 on a free port (a socket bound here, so no
race for the port), in a thread of the test process; stopped (and its engine thread with it) on
exit. Collects the ERROR log records of the server's loggers meanwhile."""
from __future__ import annotations

import logging
import socket
import threading
import time

from jaxserve.server import build_app
from jaxserve.server.cli import GracefulServer

SERVER_LOGGERS = ("jaxserve", "uvicorn", "uvicorn.error", "uvicorn.access", "fastapi")


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class Served:
    def __init__(self, engine, name: str = "tiny", grace: float = 10.0, **app_options):
        self.engine, self.name = engine, name
        self.app = build_app(engine, name, **app_options)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = GracefulServer(self.app, grace, log_level="warning")
        self.errors = _Errors()

    def __enter__(self) -> "Served":
        for name in SERVER_LOGGERS:
            logging.getLogger(name).addHandler(self.errors)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        for name in SERVER_LOGGERS:
            logging.getLogger(name).removeHandler(self.errors)
        assert not self.thread.is_alive(), "the test server did not stop"

    @property
    def state(self):
        return self.app.state.server

    def error_messages(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.errors.records]


def metrics(client, url: str, headers=None) -> dict[tuple[str, tuple], float]:
    """/metrics parsed: {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = client.get(f"{url}/metrics", headers=headers or {}).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(parsed: dict, name: str, **labels) -> float:
    """One sample's value, matching the labels given (others ignored); 0 when absent."""
    total, found = 0.0, False
    for (sample, items), v in parsed.items():
        if sample == name and all(dict(items).get(k) == str(w) for k, w in labels.items()):
            total, found = total + v, True
    return total if found else 0.0
