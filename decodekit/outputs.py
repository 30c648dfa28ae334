"""Every result type decodekit returns: the sampler's (:class:`SamplerOutput`,
:class:`LogProbabilities`), the per-step API's (:class:`GenerationStatus`,
:class:`TextResponse`, :class:`TextGenerationResponse`, :class:`StepStats`) and
:class:`RequestOutput` of :class:`~decodekit.LLM`. Plain data; calls nothing.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = [
    "CompletionOutput",
    "GenerationStatus",
    "LogProbabilities",
    "RequestOutput",
    "SamplerOutput",
    "StepStats",
    "TextGenerationResponse",
    "TextResponse",
]


class GenerationStatus(enum.Enum):
    """A request's state (MAX's ``GenerationStatus``)."""

    ACTIVE = "active"
    END_OF_SEQUENCE = "end_of_sequence"
    MAXIMUM_LENGTH = "maximum_length"
    CANCELLED = "cancelled"

    @property
    def is_done(self) -> bool:
        return self is not GenerationStatus.ACTIVE


@dataclass(frozen=True)
class LogProbabilities:
    """Log probabilities of one request's tokens, shaped like MAX's ``LogProbabilities``.

    ``token_log_probabilities[i]`` is the log probability of the i-th chosen token;
    ``top_log_probabilities[i]`` maps the top-n token ids at that step to theirs.
    """

    token_log_probabilities: list[float]
    top_log_probabilities: list[dict[int, float]]


@dataclass(frozen=True)
class SamplerOutput:
    """One sampling step for ``B`` rows; every tensor stays on the sampler's device.

    Attributes
    ----------
    token_ids : int64 ``[B]``
        The chosen tokens.
    logprobs : fp32 ``[B]`` or None
        Log probability of each chosen token; present when a row asked for logprobs.
    top_logprobs, top_token_ids : fp32 / int64 ``[B, n]`` or None
        The ``n`` most likely tokens (``n`` = the largest ``logprobs`` asked in the
        batch) and their log probabilities.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_token_ids: torch.Tensor | None = None

    def log_probabilities(self, row: int, n: int | None = None) -> LogProbabilities | None:
        """Host-side :class:`LogProbabilities` of one row (synchronises; call off the hot path)."""
        if self.logprobs is None:
            return None
        lp = float(self.logprobs[row])
        top: dict[int, float] = {}
        if self.top_logprobs is not None:
            k = self.top_logprobs.shape[1] if n is None else n
            ids = self.top_token_ids[row, :k].tolist()
            vals = self.top_logprobs[row, :k].tolist()
            top = dict(zip(ids, vals, strict=True))
        top.setdefault(int(self.token_ids[row]), lp)
        return LogProbabilities([lp], [top])


@dataclass(frozen=True)
class TextResponse:
    """One generated token (MAX's ``TextResponse``)."""

    next_token: int
    log_probabilities: LogProbabilities | None = None


@dataclass
class TextGenerationResponse:
    """What one request produced in one :meth:`~decodekit.TokenGenerator.next_token` call."""

    tokens: list[TextResponse]
    final_status: GenerationStatus
    text: str = ""

    @property
    def is_done(self) -> bool:
        return self.final_status.is_done


@dataclass
class StepStats:
    """Counters of the last :meth:`~decodekit.TokenGenerator.next_token` call (host wall times)."""

    batch_size: int = 0
    tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens computed
    prefix_hit_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    preempted: int = 0  # running requests that gave their KV blocks back (they re-prefill later)
    waiting: int = 0  # contexts of the call left without cache room (no tokens this call)
    steps: int = 0
    forced_tokens: int = 0  # guided tokens emitted by jump-forward (steps saved)
    forward_s: float = 0.0
    sample_s: float = 0.0
    total_s: float = 0.0

    @contextlib.contextmanager
    def timing(self, field: str) -> Iterator[None]:
        """Add the block's host wall time to ``field`` (``"forward_s"`` or ``"sample_s"``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) + time.perf_counter() - t0)


@dataclass(frozen=True)
class CompletionOutput:
    """One output of a request (vLLM's names): ``index`` the sample it comes from (seeded
    ``seed + index``), its ``text`` and ``token_ids``, ``finish_reason``, per-token
    ``logprobs`` (None unless asked) and their sum ``cumulative_logprob`` (None unless
    logprobs were computed)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[LogProbabilities] | None = None
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class RequestOutput:
    """The result of one request of :meth:`~decodekit.LLM.generate`. ``outputs``: its
    ``n`` completions (best first with ``best_of``, else by sample); ``text``, ``token_ids``,
    ``finish_reason`` and ``logprobs`` are those of ``outputs[0]``. ``prompt_logprobs``:
    entry ``i`` for prompt token ``i`` (entry 0 None), when asked. ``finished``: False for
    the intermediate outputs of :meth:`~decodekit.LLM.stream_outputs`."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "cancelled"
    logprobs: list[LogProbabilities] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[LogProbabilities | None] | None = None
    finished: bool = True
