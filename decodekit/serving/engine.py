"""The server's engine thread: one thread owns the generator and runs the scheduling loop.

HTTP handlers never touch the :class:`~decodekit.TokenGenerator` (it is not safe to call
from two threads). They :meth:`EngineLoop.submit` a :class:`Job` and
:meth:`EngineLoop.cancel` it through a thread-safe inbox; the engine thread makes the
requests' contexts (``LLM.new_requests``: tokenization, the chat template, checks against
the model), advances them with the project's one scheduler
(:class:`~decodekit.engine.scheduler.Scheduler`, failures isolated to the request that
fails alone) and hands each job its events through the job's ``emit`` callback (the server
wraps an asyncio queue's ``put_nowait`` in ``call_soon_threadsafe``).

Events, in order: :class:`Started` (or :class:`Failed` with 400 for a request the model
refuses), then :class:`Output` per prompt as it advances (DELTA), then :class:`Finished`;
or :class:`Failed` (500) when the request raised inside a step. A cancelled job gets no
more events.

May call: :class:`~decodekit.LLM` (``new_requests``, its generator's public API), the
scheduler, the metrics.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.requests import RequestGroup
from ..engine.scheduler import Scheduler
from ..outputs import RequestOutput
from .metrics import ServerMetrics

__all__ = ["EngineLoop", "Failed", "Finished", "Job", "Output", "QueueFull", "Started"]


@dataclass(frozen=True)
class Started:
    prompt_tokens: list[int]  # per prompt


@dataclass(frozen=True)
class Output:
    prompt_index: int
    output: RequestOutput  # DELTA: what is new since the last one


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


class QueueFull(Exception):
    """The waiting queue holds ``max_waiting`` jobs (HTTP 429)."""


class ShuttingDown(Exception):
    """The engine admits nothing more (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """A request of the server: ``prompts`` with ``params`` and ``LLM.new_requests``
    ``options``; ``emit`` receives its events on the engine thread (it must not block)."""

    prompts: list[Any]
    params: Any
    options: dict[str, Any]
    emit: Callable[[Any], None]
    fit_to_context: bool = False  # params.max_new_tokens: what fits the context after each prompt
    key: int = -1  # the engine's number for it (the same on every tensor-parallel rank)
    arrival: float = field(default_factory=time.perf_counter)
    groups: list[RequestGroup] = field(default_factory=list)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0


class EngineLoop:
    """The thread that owns ``llm``'s generator.

    Parameters
    ----------
    llm : decodekit.LLM
    num_steps : int
        Steps per ``next_token`` call (more: fewer host round trips, coarser streaming).
    max_waiting : int
        Jobs allowed to wait for a slot (the inbox and the scheduler's queue); more are
        refused with :class:`QueueFull`.
    metrics : ServerMetrics
    tensor_parallel : bool
        The model is sharded over ranks (:mod:`decodekit.engine.parallel`): this engine, on
        rank 0, sends each round's commands (submissions, cancellations, stop) to the other
        ranks, which run :meth:`follow` with the same settings and make the same calls.
    """

    def __init__(self, llm: Any, num_steps: int = 1, max_waiting: int = 256,
                 metrics: ServerMetrics | None = None, tensor_parallel: bool = False) -> None:
        self.llm = llm
        self.gen = llm.generator
        self.max_waiting = max_waiting
        self.metrics = metrics or ServerMetrics()
        self.scheduler = Scheduler(self.gen, num_steps, isolate_failures=True)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # jobs submitted and not yet admitted (inbox + scheduler queue)
        self._unread = 0  # submissions still in the inbox
        self._jobs: dict[int, Job] = {}  # live jobs, by id(job)
        self._owner: dict[str, tuple[Job, int]] = {}  # context request id -> (job, prompt index)
        self._accepting = True
        self._keys = itertools.count()
        self._tp = tensor_parallel
        self._by_key: dict[int, Job] = {}  # followers: the leader's job numbers -> their copies
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decodekit-engine", daemon=True)
        self.metrics.bind(self)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``max_waiting`` jobs wait already,
        :class:`ShuttingDown` after :meth:`stop_admission`."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._queued >= self.max_waiting:
                raise QueueFull(f"{self._queued} requests are waiting (max_waiting={self.max_waiting})")
            self._queued += 1
            self._unread += 1
            job.key = next(self._keys)
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (its contexts are released at the next step boundary)."""
        self._inbox.put(("cancel", job))

    def stop_admission(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting, cancel what is left, and join the thread."""
        self.stop_admission()
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        """No job is live (every submitted job finished, failed or was cancelled)."""
        return not self._jobs and self._queued == 0

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            commands = self._commands(block=not self.scheduler.has_work)
            if self._tp:
                _share([(cmd, -1 if job is None else job.key, _spec(job) if cmd == "submit" else None)
                        for cmd, job in commands])
            self._apply(commands)
            self._step()
        for job in list(self._jobs.values()):
            self._fail(job, 503, "the server shut down before the request finished")

    def follow(self) -> None:
        """Run a tensor-parallel rank other than 0 (blocking, until the leader stops): take
        each round's commands from rank 0 and make the same calls; emit nothing."""
        while not self._stop.is_set():
            commands = []
            for cmd, key, spec in _share(None):
                if cmd == "submit":
                    self._by_key[key] = Job(*spec[:3], emit=_ignore, fit_to_context=spec[3], key=key)
                commands.append((cmd, self._by_key.get(key)))
            self._apply(commands, own=False)
            self._step()
        for job in list(self._jobs.values()):
            self._release(job)

    def _step(self) -> None:
        """One scheduler step, if there is work; events for what it produced."""
        if not self._stop.is_set() and self.scheduler.has_work:
            try:
                result = self.scheduler.step()
            except Exception as exc:  # a failure outside any one request: fail every live job
                for job in list(self._jobs.values()):
                    self._fail(job, 500, f"engine error: {type(exc).__name__}: {exc}")
                return
            now = time.perf_counter()
            for rid, exc in result.failed.items():
                owner = self._owner.get(rid)
                if owner is not None:
                    traceback.print_exception(exc)
                    self._fail(owner[0], 500, f"the request failed: {type(exc).__name__}: {exc}")
            self._deliver(result.responses, now)
            self._count_queued()

    def _commands(self, block: bool) -> list[tuple[str, Any]]:
        """Every command in the inbox (waiting up to 50 ms for one when ``block``)."""
        out = []
        try:
            out.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
            while True:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            return out

    def _apply(self, commands: list[tuple[str, Any]], own: bool = True) -> None:
        """Run the commands (``own``: from this engine's inbox, not rank 0's)."""
        for cmd, job in commands:
            if cmd == "submit":
                if own:
                    with self._lock:
                        self._unread -= 1
                self._start(job)
            elif cmd == "cancel" and job is not None:
                self._cancel(job)
            elif cmd == "stop":
                self._stop.set()
        self._count_queued()

    def _start(self, job: Job) -> None:
        try:
            prompts, params = job.prompts, job.params
            if job.fit_to_context:
                prompts = [self.gen.encode(p) for p in prompts]
                params = [params.replace(max_new_tokens=max(1, self.gen.max_seq_len - len(ids)))
                          for ids in prompts]
            job.groups = self.llm.new_requests(prompts, params, **job.options)
        except (ValueError, KeyError, TypeError) as exc:
            self._by_key.pop(job.key, None)
            self._emit(job, Failed(400, str(exc)))  # the HTTP layer counts the rejection
            return
        except Exception as exc:
            traceback.print_exception(exc)
            self._emit(job, Failed(500, f"{type(exc).__name__}: {exc}"))
            self.metrics.failed()
            return
        self._jobs[id(job)] = job
        for i, group in enumerate(job.groups):
            for ctx in group.contexts:
                self._owner[ctx.request_id] = (job, i)
            self.scheduler.add(group.contexts)
        self._emit(job, Started([len(g.contexts[0].prompt_token_ids) for g in job.groups]))

    def _release(self, job: Job) -> None:
        """Forget ``job``: cancel its contexts the scheduler still holds."""
        self._jobs.pop(id(job), None)
        self._by_key.pop(job.key, None)
        for group in job.groups:
            for ctx in group.contexts:
                self.scheduler.cancel(ctx.request_id)
                self._owner.pop(ctx.request_id, None)

    def _cancel(self, job: Job) -> None:
        if id(job) in self._jobs:
            self._release(job)
            self.metrics.cancelled()

    def _fail(self, job: Job, status: int, message: str) -> None:
        self._release(job)
        self._emit(job, Failed(status, message))
        self.metrics.failed()

    def _deliver(self, responses: dict[str, Any], now: float) -> None:
        """Events for every job that advanced; Finished and metrics for the ones done."""
        touched: dict[int, tuple[Job, set[int]]] = {}
        tokens: dict[int, int] = {}
        for rid, r in responses.items():
            owner = self._owner.get(rid)
            if owner is None:
                continue
            job, i = owner
            touched.setdefault(id(job), (job, set()))[1].add(i)
            tokens[id(job)] = tokens.get(id(job), 0) + len(r.tokens)
        for job, indices in touched.values():
            self.metrics.observe_tokens(job, tokens[id(job)], now)
            for i in sorted(indices):
                out = job.groups[i].poll()
                if out is not None:
                    self._emit(job, Output(i, out))
            if all(g.is_done for g in job.groups):
                self._jobs.pop(id(job), None)
                self._by_key.pop(job.key, None)
                for group in job.groups:
                    for ctx in group.contexts:
                        self._owner.pop(ctx.request_id, None)
                self._emit(job, Finished())
                self.metrics.finished(job, now)

    def _count_queued(self) -> None:
        waiting = {id(self._owner[c.request_id][0]) for c in self.scheduler.waiting
                   if c.request_id in self._owner}
        with self._lock:
            self._queued = len(waiting) + self._unread

    def _emit(self, job: Job, event: Any) -> None:
        try:
            job.emit(event)
        except Exception:  # the handler's event loop is gone (client or server closed)
            pass


def _spec(job: Job) -> tuple:
    """What a follower needs to make the same requests as ``job``."""
    return job.prompts, job.params, job.options, job.fit_to_context


def _ignore(event: Any) -> None:
    """A follower's jobs emit nowhere (rank 0 answers the clients)."""


def _share(commands: list | None) -> list:
    """Rank 0's commands of this round, on every rank (rank 0 passes them, the others None)."""
    import torch.distributed as dist

    from ..engine.parallel import cpu_group

    box = [commands]
    dist.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]
