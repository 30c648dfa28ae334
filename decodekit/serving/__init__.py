"""``decodekit serve``: an OpenAI-compatible HTTP server over the token generator.

- :mod:`.protocol`: OpenAI request bodies -> ``SamplingParams`` and options (errors name the
  field), and the response / stream-chunk bodies;
- :mod:`.engine`: :class:`EngineLoop`, the one thread that owns the generator and runs the
  scheduler, fed through a thread-safe inbox;
- :mod:`.app`: the FastAPI routes (completions, chat, models, health, metrics), auth, limits,
  disconnects;
- :mod:`.metrics`: Prometheus metrics;
- :mod:`.server`: :class:`Server`, binding, uvicorn, graceful shutdown.

Needs the ``serve`` extra (``pip install decodekit[serve]``: fastapi, uvicorn,
prometheus-client). Calls go one way: server -> app -> engine -> ``LLM`` / scheduler.
"""

from __future__ import annotations

from .engine import EngineLoop
from .server import Server

__all__ = ["EngineLoop", "Server"]
