"""Run the app: :class:`Server` binds a socket, starts the engine thread and uvicorn.

``Server(llm).run()`` serves in the calling (main) thread until SIGTERM or Ctrl-C; SIGTERM
stops admission at once (new requests: 503), lets running requests finish for up to
``shutdown_timeout`` seconds, cancels what is left, and returns, so the process exits 0.
``Server(llm).start()`` serves from a background thread (tests, notebooks) until
:meth:`Server.stop`; ``url`` is its base address (port 0 picks a free port).

May call: the app, the engine loop, uvicorn.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

from .app import MAX_BODY_BYTES, build_app
from .engine import EngineLoop
from .metrics import ServerMetrics

__all__ = ["Server"]


class _Uvicorn(uvicorn.Server):
    """uvicorn that stops the engine's admission as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, engine: EngineLoop) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.stop_admission()
        super().handle_exit(sig, frame)


class Server:
    """An OpenAI-compatible server of ``llm`` (a :class:`~decodekit.LLM`).

    Parameters
    ----------
    host, port : str, int
        Where to listen (loopback by default; port 0: any free port).
    model_name : str
        The name clients pass as ``model`` (``/v1/models`` lists it).
    num_steps, max_waiting : int
        :class:`~.engine.EngineLoop`'s settings.
    api_key : str or None
        Required as ``Authorization: Bearer KEY`` on ``/v1/`` routes when set.
    shutdown_timeout : float
        Seconds running requests get to finish after SIGTERM / :meth:`stop`.
    max_body_bytes : int
        Larger request bodies are refused (413).
    steering_dir : path or None
        Requests may steer with vector files in this folder (``steering.vector``: a name
        relative to it); None: steering presets only.
    tensor_parallel : bool
        ``llm``'s model is sharded with transformers' TP: this server runs on rank 0, and
        every other rank runs ``EngineLoop(llm, ..., tensor_parallel=True).follow()``.
    """

    def __init__(self, llm: Any, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "decodekit",
                 num_steps: int = 1, max_waiting: int = 256, api_key: str | None = None,
                 shutdown_timeout: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES,
                 steering_dir: str | os.PathLike[str] | None = None, log_level: str = "warning",
                 tensor_parallel: bool = False) -> None:
        self.metrics = ServerMetrics()
        self.engine = EngineLoop(llm, num_steps=num_steps, max_waiting=max_waiting, metrics=self.metrics,
                                 tensor_parallel=tensor_parallel)
        self.app = build_app(self.engine, model_name, api_key, max_body_bytes, steering_dir)
        self.model_name = model_name
        self.shutdown_timeout = shutdown_timeout
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(2048)  # connections queue from now on, even before uvicorn accepts them
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                                lifespan="off", access_log=False)
        self._uvicorn = _Uvicorn(config, self.engine)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in this thread until SIGTERM / SIGINT (then shut down gracefully)."""
        previous = signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises it when done
        self.engine.start()
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.engine.shutdown(timeout=self.shutdown_timeout)
            signal.signal(signal.SIGTERM, previous)

    def start(self, timeout: float = 30.0) -> Server:
        """Serve from a background thread; returns once it accepts connections."""
        self.engine.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="decodekit-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Graceful shutdown of a :meth:`start`-ed server (as on SIGTERM)."""
        self.engine.stop_admission()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(self.shutdown_timeout + 10)
        self.engine.shutdown(timeout=self.shutdown_timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
