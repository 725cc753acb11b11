"""The OpenAI-compatible HTTP server: `jaxserve serve`, or `build_app(engine)` for an Engine of
your own (imported lazily: the CLI's --help does not load FastAPI)."""


def __getattr__(name):
    if name == "build_app":
        from jaxserve.server.app import build_app
        return build_app
    raise AttributeError(name)


__all__ = ["build_app"]
