"""Replicas on Ray Serve: N copies of the server, each with its own engine loop and model,
behind Ray's HTTP proxy (which spreads the requests over them).

:func:`deployment` builds the Ray Serve application; :func:`run` starts Ray (a local head
on loopback, or an existing cluster by address), deploys it and serves until SIGTERM /
Ctrl-C. ``decodekit serve MODEL --ray --replicas N`` is these two calls.

Each replica is a Ray actor that builds its ``LLM`` with the ``make_llm`` it was given (a
picklable function: every replica loads the model itself), starts an
:class:`~.engine.EngineLoop` and serves the same FastAPI app as :class:`~.server.Server`
(same routes, errors, limits and metrics; ``/metrics`` is the answering replica's). Each
answer names its replica in the ``x-decodekit-replica`` header.

Needs the ``ray`` extra (``pip install 'decodekit[ray]'``: ``ray[serve]``).

May call: ray, the app, the engine loop.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from .app import MAX_BODY_BYTES, build_app
from .engine import EngineLoop
from .metrics import ServerMetrics

__all__ = ["REPLICA_HEADER", "deployment", "run"]

REPLICA_HEADER = "x-decodekit-replica"
_APP: Any = None  # this replica process's app (Ray builds the ingress after the constructor)


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(f"{e}; replicas need Ray Serve: pip install 'decodekit[ray]'") from None
    return ray, serve


class _Replica:
    """One replica: the model, the engine thread and the app (see the module docstring)."""

    def __init__(self, make_llm: Callable[[], Any], options: dict[str, Any]) -> None:
        global _APP
        import torch
        from ray import serve

        torch.set_num_threads(max(1, int(options["num_cpus"])))
        self.name = serve.get_replica_context().replica_id.unique_id
        self.shutdown_timeout = options["shutdown_timeout"]
        self.engine = EngineLoop(make_llm(), num_steps=options["num_steps"],
                                 max_waiting=options["max_waiting"], metrics=ServerMetrics())
        app = build_app(self.engine, options["model_name"], options["api_key"], options["max_body_bytes"],
                        options["steering_dir"])
        _APP = _Named(app, self.name)
        self.engine.start()

    def check_health(self) -> None:
        """Ray's health probe: the engine thread must be running."""
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.name}: the engine loop stopped")

    async def __del__(self) -> None:
        """Ray calls (and awaits) it when the replica shuts down, after draining its requests:
        stop the engine off the event loop, then Ray's own ASGI shutdown."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop_admission()
            await asyncio.to_thread(engine.shutdown, timeout=self.shutdown_timeout)
        parent = getattr(super(), "__del__", None)
        if parent is not None:
            done = parent()
            if inspect.isawaitable(done):
                await done


def _current_app() -> Any:
    """Ray's ingress builder: the app this process's replica built in its constructor."""
    return _APP


class _Named:
    """ASGI wrapper adding the replica header to every HTTP answer."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, named)


def deployment(make_llm: Callable[[], Any], *, replicas: int = 2, num_cpus: float = 1.0,
               model_name: str = "decodekit", num_steps: int = 1, max_waiting: int = 256,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               steering_dir: str | os.PathLike[str] | None = None, shutdown_timeout: float = 30.0) -> Any:
    """The Ray Serve application of ``replicas`` servers (pass it to :func:`run`, or to
    ``ray.serve.run`` yourself).

    Parameters
    ----------
    make_llm : callable () -> LLM
        Called once in each replica (picklable: a module-level function or a
        ``functools.partial`` of one).
    replicas : int
        Number of replicas (>= 1).
    num_cpus : float
        CPUs Ray reserves for each replica (also its torch threads); add ``ray_actor_options``
        GPUs through Ray's own ``.options`` on the returned deployment if needed.
    model_name, num_steps, max_waiting, api_key, max_body_bytes, steering_dir, shutdown_timeout
        As for :class:`~decodekit.serving.Server`, per replica.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    if not num_cpus > 0:
        raise ValueError(f"num_cpus must be > 0, got {num_cpus!r}")
    _, serve = _ray()
    options = dict(num_cpus=num_cpus, model_name=model_name, num_steps=num_steps, max_waiting=max_waiting,
                   api_key=api_key, max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout,
                   steering_dir=None if steering_dir is None else os.fspath(steering_dir))
    ingress = serve.ingress(_current_app)(_Replica)
    # Ray queues a replica's requests beyond max_ongoing_requests itself; let them reach the
    # engine, whose own queue answers 429 with Retry-After when it is full.
    dep = serve.deployment(ingress, name="decodekit", num_replicas=replicas,
                           ray_actor_options={"num_cpus": num_cpus},
                           max_ongoing_requests=max_waiting + 1024,
                           graceful_shutdown_timeout_s=shutdown_timeout + 5)
    return dep.bind(make_llm, options)


def run(app: Any, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        ready: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:
    """Serve ``app`` (from :func:`deployment`) until SIGTERM / Ctrl-C (or ``stop`` is set):
    joins the Ray cluster at ``address`` or starts a local head (on loopback when ``host``
    is), deploys, calls ``ready(url)``, and shuts Serve and Ray down at the end."""
    ray, serve = _ray()
    if port == 0:  # Ray's proxy takes a fixed port: pick a free one
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    local = address is None
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if local and host in ("127.0.0.1", "localhost"):
        kw["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address, **kw)
    stop = stop or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="decodekit", route_prefix="/", blocking=False)
        if ready is not None:
            ready(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
