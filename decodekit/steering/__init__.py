"""Steering: per-request vectors added to (or projected out of) the residual stream.

- :mod:`.vector`: :class:`SteeringVector` (per-layer directions, arithmetic) and
  :class:`Steering` (how one request uses it: strength, positions, op);
- :mod:`.io`: safetensors and GGUF control-vector files;
- :mod:`.hooks`: :class:`SteeringHooks` (forward hooks reading per-row device tables, for
  the engine) and :func:`steer` (a context manager for plain transformers);
- :mod:`.train`: :func:`train_steering_vector` from contrastive pairs;
- :mod:`.presets`: named presets trained on first use and cached.

May call: :mod:`decodekit.engine.model_adapter` (decoder layers, hidden size).
"""

from .hooks import SteeringHooks, steer
from .train import train_steering_vector
from .vector import POSITION_END, Steering, SteeringVector

__all__ = ["POSITION_END", "Steering", "SteeringHooks", "SteeringVector", "steer", "train_steering_vector"]
