"""Deprecated alias of engine.py (the module holds the `Engine`, it does no scheduling of its own).

Kept only until nanoseek/serve imports `nanoseek.engine.engine` (or `nanoseek.engine`); new code
must not import this module. tests/test_layers.py lists it as a temporary alias.
"""

from .engine import Engine, EngineError, RequestStream  # noqa: F401
