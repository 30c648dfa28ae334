"""The banded select launches (decodekit.kernels.bands) in the interpreter: the same token
as the torch reference sampler for every top-k / top-p / min-p / typical-p mix on flat,
peaked and Zipf rows at real vocabulary sizes, in at most three passes over each row
(counted by the kernels), where the pivot search they replace takes many more."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import KERNEL_DEVICE

from decodekit import Sampler, SamplingParams

COMBOS = [c for c in itertools.product([0, 50, 1000], [1.0, 0.9, 0.5], [0.0, 0.05], [1.0, 0.9, 0.5])
          if not (c[0] == 0 and c[1] == 1.0 and c[3] == 1.0)]


def _row(kind: str, V: int, g: torch.Generator) -> torch.Tensor:
    if kind == "flat":
        return torch.randn(V, generator=g)
    if kind == "peaked":
        x = torch.randn(V, generator=g) * 2
        x[torch.randint(V, (5,), generator=g)] += 15
        return x
    rank = torch.randperm(V, generator=g).double() + 1  # Zipf
    return (-1.1 * rank.log()).float()


def _draw(logits: torch.Tensor, combos: list[tuple], seed: int, banded: bool):
    """Tokens of one step (nothing committed) and the passes each row took; without
    ``banded`` the select launch searches every threshold with its pivot passes."""
    N, V = logits.shape
    s = Sampler(V, N, KERNEL_DEVICE, backend="triton")
    for i, (k, p, mp, t) in enumerate(combos):
        s.add(i, SamplingParams(temperature=0.8, top_k=k, top_p=p, min_p=mp, typical_p=t, seed=seed + i))
    tok, passes = s.passes(logits.to(KERNEL_DEVICE), list(range(N)), banded=banded)
    return tok.cpu(), passes.cpu()


def _reference(logits: torch.Tensor, combos: list[tuple], seed: int) -> torch.Tensor:
    N, V = logits.shape
    s = Sampler(V, N, "cpu", backend="torch")
    for i, (k, p, mp, t) in enumerate(combos):
        s.add(i, SamplingParams(temperature=0.8, top_k=k, top_p=p, min_p=mp, typical_p=t, seed=seed + i))
    return s.sample(logits, list(range(N))).token_ids


def _check(V: int, kinds: tuple[str, ...], combos: list[tuple]) -> None:
    g = torch.Generator().manual_seed(V)
    for kind in kinds:
        logits = torch.stack([_row(kind, V, g) for _ in combos])
        tok, passes = _draw(logits, combos, 7, banded=True)
        over = [(c, int(n)) for c, n in zip(combos, passes, strict=True) if n > 3]
        assert not over, (kind, over)
        assert tok.tolist() == _reference(logits, combos, 7).tolist(), kind


@pytest.mark.parametrize("V, combos", [
    (32000, COMBOS[1::13]),  # the default suite: each filter alone and mixed, at a real vocabulary size
    pytest.param(32000, COMBOS[::3], marks=pytest.mark.slow),
    pytest.param(128256, COMBOS[1::13], marks=pytest.mark.slow),
    pytest.param(151936, COMBOS[2::13], marks=pytest.mark.slow)])
def test_three_passes(V: int, combos: list[tuple]) -> None:
    _check(V, ("flat", "peaked", "zipf"), combos)


@pytest.mark.slow
@pytest.mark.parametrize("V", [32000])  # the larger vocabularies: test_three_passes (~18 s a row here)
def test_three_passes_every_combination(V: int) -> None:
    _check(V, ("flat", "peaked", "zipf"), COMBOS)


def test_pivot_search_takes_more_passes() -> None:
    """Control: the pass counter sees the pivot search (the fallback path) take more than
    three passes on the same rows, and both paths draw the same tokens."""
    V, combos = 8192, [(50, 0.9, 0.0, 1.0), (0, 0.9, 0.0, 1.0), (0, 1.0, 0.0, 0.9)]
    g = torch.Generator().manual_seed(1)
    logits = torch.stack([_row("flat", V, g) for _ in combos])
    tok_b, passes_b = _draw(logits, combos, 3, banded=True)
    tok_p, passes_p = _draw(logits, combos, 3, banded=False)
    assert tok_b.tolist() == tok_p.tolist()
    assert (passes_b == 3).all() and (passes_p > 6).all(), (passes_b, passes_p)
    assert math.isfinite(float(passes_p.float().mean()))
