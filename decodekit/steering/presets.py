"""Steering presets: named behaviours defined by contrastive datasets shipped with decodekit.

Each preset is a JSON Lines file of ``{"positive", "negative"}`` prompt pairs written for
this project (``decodekit/steering/preset_data/*.jsonl``, see its README). The vector for a model is
trained on first use (:func:`~decodekit.train_steering_vector`, ``mean_diff`` at the
last token over a band of middle layers) and cached on disk, keyed by the model's identity
(its config and a fingerprint of its weights) and the dataset's content, so the next use
only reads a small safetensors file.

Default strengths (tuned on the embedded SmolLM2-135M-Instruct, greedy, ``positions="all"``;
the vectors are raw mean differences, added at 13 of its 30 layers, hence the small
numbers):

=============  ========  ======================================================
preset         strength  effect
=============  ========  ======================================================
``brevity``    0.05      shorter answers (tests: >= 30% fewer tokens)
``positive``   0.12      more upbeat wording (tests: higher lexicon sentiment)
``formal``     0.08      more formal register (tests: higher formality score)
=============  ========  ======================================================

May call: :mod:`.train`, :mod:`.vector`, the model adapter, loading's cache folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..engine.model_adapter import decoder_layers
from .train import train_steering_vector
from .vector import Steering, SteeringVector

__all__ = ["PRESETS", "Preset", "preset_pairs", "preset_steering", "preset_vector"]


@dataclass(frozen=True)
class Preset:
    """A named steering behaviour: its dataset, layer band and default strength."""

    name: str
    default_strength: float
    description: str
    layer_band: tuple[float, float] = (0.27, 0.67)  # fraction of the depth (SmolLM2: 8-20)
    method: str = "mean_diff"

    def layers(self, num_layers: int) -> list[int]:
        lo = round(self.layer_band[0] * num_layers)
        hi = max(lo, min(num_layers - 1, round(self.layer_band[1] * num_layers)))
        return list(range(lo, hi + 1))


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("brevity", 0.05, "short, terse answers"),
        Preset("positive", 0.12, "upbeat, optimistic wording"),
        Preset("formal", 0.08, "formal, professional register"),
    )
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown steering preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _data_text(name: str) -> str:
    return resources.files("decodekit.steering").joinpath("preset_data", f"{name}.jsonl").read_text("utf-8")


def preset_pairs(name: str) -> list[dict[str, str]]:
    """The preset's contrastive pairs, ``[{"positive": str, "negative": str}, ...]``."""
    _preset(name)
    return [json.loads(line) for line in _data_text(name).splitlines() if line.strip()]


def model_fingerprint(model) -> str:
    """A short hash identifying ``model``: its config and a sample of its weights."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for p in list(model.parameters())[:3] + list(model.parameters())[-2:]:
            h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(name: str, model) -> Path:
    from ..loading import cache_dir

    p = _preset(name)
    key = hashlib.sha256((_data_text(name) + repr((p.layer_band, p.method))).encode()).hexdigest()[:10]
    return cache_dir() / "steering" / f"{name}-{model_fingerprint(model)}-{key}.safetensors"


def preset_vector(name: str, model, tokenizer, *, cache: bool = True) -> SteeringVector:
    """The preset's vector for ``model``: read from the disk cache, or trained now (and cached)."""
    p = _preset(name)
    path = _cache_path(name, model)
    if cache and path.is_file():
        return SteeringVector.load(path)
    vec = train_steering_vector(model, tokenizer, preset_pairs(name), p.layers(len(decoder_layers(model))),
                                method=p.method,
                                model_name=getattr(model.config, "_name_or_path", None) or None)
    vec.metadata["preset"] = name
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.safetensors")
        vec.save(tmp)
        tmp.replace(path)
    return vec


def preset_steering(name: str, model, tokenizer, strength: float | None = None, **kw) -> Steering:
    """A :class:`~decodekit.Steering` for the preset (its default strength unless given)."""
    p = _preset(name)
    return Steering(preset_vector(name, model, tokenizer), p.default_strength if strength is None
                    else strength, **kw)
