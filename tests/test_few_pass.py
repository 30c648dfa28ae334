"""The three-pass filtering algorithm (decodekit.sampling.few_pass) against the reference
filter (transformers' warper semantics, decodekit.sampling.reference.filter_keep): the same
kept set (on flat rows of 1e5 tokens: up to fp32 rounding of the masses) for every mix of
top-k / top-p / min-p / typical-p on flat, peaked, Zipf and partly banned rows at real
vocabulary sizes, within three passes over the row and no fallback; and wrong guesses
(bands moved at random) never give a wrong set, only fallbacks."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from decodekit.sampling import few_pass as F
from decodekit.sampling.reference import RowState, filter_keep

COMBOS = [c for c in itertools.product([0, 50, 1000], [1.0, 0.9, 0.5], [0.0, 0.05], [1.0, 0.9, 0.5])
          if not (c[0] == 0 and c[1] == 1.0 and c[3] == 1.0)]


def _state(k: int, p: float, mp: float, t: float) -> RowState:
    def f(v, dt=torch.float32):
        return torch.full((1,), v, dtype=dt)

    return RowState(temperature=f(1.0), top_k=f(k, torch.int32), top_p=f(p), min_p=f(mp),
                    typical_p=f(t), repetition_penalty=f(1.0), frequency_penalty=f(0.0),
                    presence_penalty=f(0.0), seed=f(0, torch.int64), n_gen=f(0, torch.int32),
                    min_new=f(0, torch.int32))


def _rows(V: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(V, generator=g)
    peaked = torch.randn(V, generator=g) * 2
    peaked[torch.randint(V, (5,), generator=g)] += 15
    rank = torch.randperm(V, generator=g).double() + 1
    banned = torch.randn(V, generator=g) * 3 - 5
    banned[: V // 3] = -math.inf
    return {"flat": flat, "flat/10": flat * 0.1, "peaked": peaked,
            "zipf": (-1.1 * rank.log()).float(), "banned": banned}


def _reference(l: torch.Tensor, combo: tuple) -> torch.Tensor:
    return filter_keep(l[None], _state(*combo))[0] & torch.isfinite(l)


def _same_up_to_rounding(keep: torch.Tensor, l: torch.Tensor, combo: tuple) -> bool:
    """The reference's set in fp32 or fp64, or a set between the reference's sets at
    ``top_p`` and ``typical_p`` moved by 1e-5: masses summed in another order may move a
    threshold by fp32 rounding (over 1e5 tokens), never by more."""
    if torch.equal(keep, _reference(l, combo)) or torch.equal(keep, _reference(l.double(), combo)):
        return True
    k, p, mp, t = combo
    lo = _reference(l, (k, p - 1e-5 if p < 1 else p, mp, t - 1e-5 if t < 1 else t))
    hi = _reference(l, (k, p + 1e-5 if p < 1 else p, mp, t + 1e-5 if t < 1 else t))
    return bool((lo <= keep).all() and (keep <= hi).all())


def _check(V: int, combos: list[tuple], seed: int = 0, exact: bool = True) -> None:
    for name, l in _rows(V, seed).items():
        for combo in combos:
            keep, info = F.few_pass_keep(l, *combo)
            assert keep is not None, (V, name, combo, info)
            assert info.passes <= 3 and info.candidates <= F.CAP
            if exact or name not in ("flat", "flat/10"):
                assert torch.equal(keep, _reference(l, combo)), (V, name, combo, info)
            else:
                assert _same_up_to_rounding(keep, l, combo), (V, name, combo, info)


def test_exact_within_three_passes_v32000() -> None:
    _check(32000, COMBOS)


@pytest.mark.parametrize("V", [128256, 151936])
def test_exact_within_three_passes_large_vocab(V: int) -> None:
    _check(V, COMBOS[::7], seed=V, exact=False)


@pytest.mark.slow
@pytest.mark.parametrize("V", [128256, 151936])
def test_exact_within_three_passes_large_vocab_all(V: int) -> None:
    _check(V, COMBOS, seed=V + 1, exact=False)


def test_min_p_alone_needs_no_histogram() -> None:
    l = _rows(32000, 3)["zipf"]
    keep, info = F.few_pass_keep(l, 0, 1.0, 0.01, 1.0)
    assert info.passes == 2 and info.bands == []
    assert torch.equal(keep, _reference(l, (0, 1.0, 0.01, 1.0)))


def test_wrong_guesses_fall_back_and_are_never_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guess only places the candidates: bands moved, resized and added at random must
    give the reference's set or a fallback. Negative control: the moved bands do make rows
    fall back (the verification is exercised), and the unmoved ones do not."""
    rng = random.Random(0)
    plan = F._plan

    def moved(*args):
        out = []
        for lo, hi in plan(*args):
            s = rng.randint(-6, 6)
            lo2 = max(0, lo + s + rng.randint(-3, 3))
            out.append((lo2, max(lo2, min(F.NBINS - 1, hi + s + rng.randint(-3, 3)))))
        if rng.random() < 0.3:
            x = rng.randint(0, 900)
            out.append((x, x + rng.randint(0, 20)))
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(out):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    monkeypatch.setattr(F, "_plan", moved)
    fell_back = exact = 0
    for name, l in _rows(4000, 1).items():
        for combo in COMBOS[::2]:
            keep, info = F.few_pass_keep(l, *combo)
            if keep is None:
                fell_back += 1
            else:
                assert torch.equal(keep, _reference(l, combo)), (name, combo, info)
                exact += 1
    assert fell_back >= 20 and exact >= 20, (fell_back, exact)


def test_rounding_tolerance_rejects_a_moved_threshold() -> None:
    """Negative control of the tolerance used on flat rows: a top-p or typical-p moved by
    1e-3 is not 'rounding'."""
    l = _rows(128256, 5)["flat"]
    for combo, moved in [((0, 0.9, 0.0, 1.0), (0, 0.901, 0.0, 1.0)),
                         ((0, 1.0, 0.0, 0.9), (0, 1.0, 0.0, 0.899))]:
        assert _same_up_to_rounding(_reference(l, combo), l, combo)
        assert not _same_up_to_rounding(_reference(l, moved), l, combo)
