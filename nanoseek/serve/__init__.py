"""OpenAI-compatible HTTP server over the continuous-batching engine (see app.py, docs/engine.md).

    from nanoseek.serve import create_app, serve, ServeConfig

The names load lazily: `nanoseek serve --help` (serve/cli.py) must not need FastAPI installed.
"""

_EXPORTS = {"create_app": "app", "serve": "app", "ChatStreamSplitter": "app", "ServeConfig": "protocol",
            "APIError": "protocol"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
