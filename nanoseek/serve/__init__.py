"""OpenAI-compatible HTTP server over the continuous-batching engine (see app.py, docs/engine.md)."""
