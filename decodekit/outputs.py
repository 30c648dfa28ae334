"""Plain result types returned by the sampler (and, later, the generator)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LogProbabilities", "SamplerOutput"]


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
