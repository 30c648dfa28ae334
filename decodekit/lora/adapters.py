"""LoRA requests and responses, and reading a peft adapter folder into CPU tensors.

The request types follow MAX's: a :class:`LoRARequest` (``operation`` :class:`LoRAOperation`
LOAD / UNLOAD, ``lora_name``, ``lora_path``) is answered by a :class:`LoRAResponse`
(``status`` :class:`LoRAStatus`, ``message``).

:func:`read_adapter` reads a folder saved by peft's ``save_pretrained``: ``adapter_config.json``
(``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
...) and ``adapter_model.safetensors`` (``<prefix>.<module>.lora_A.weight [r, in]`` and
``.lora_B.weight [out, r]``), with json and safetensors only, and checks it against the linear
layers it may target. Every refusal is a :class:`LoRAError` carrying the status to answer with:

- ``LOAD_INVALID_PATH``: no such folder, or it lacks ``adapter_config.json`` /
  ``adapter_model.safetensors``;
- ``LOAD_INVALID_ADAPTER``: what the runtime does not support, with the offending config field
  in the message (``use_dora``, ``bias``, ``lora_bias``, ``modules_to_save``, a rank above
  ``max_lora_rank`` (``r`` / ``rank_pattern``), ``target_modules`` naming something that is not
  one of the model's supported linear layers, ...), and broken files (unreadable or truncated
  safetensors, missing or unexpected keys, wrong shapes, non-finite values);
- ``LOAD_ERROR``: the file system failed otherwise.

``fan_in_fan_out`` is accepted and has no effect: it only concerns ``Conv1D`` base layers
(peft resets it for ``nn.Linear``), and lora_A/lora_B are stored as linear weights either way.
``lora_dropout`` and the initialisation settings do not matter at inference.

May call: nothing in decodekit.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "LoRAAdapter", "LoRAError", "LoRAModuleWeights", "LoRAOperation",
           "LoRARequest", "LoRAResponse", "LoRAStatus", "LoRAType", "read_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class LoRAOperation(Enum):
    """What a :class:`LoRARequest` asks for."""

    LOAD = "load"
    UNLOAD = "unload"


class LoRAStatus(Enum):
    """Outcome of a :class:`LoRARequest`."""

    SUCCESS = "success"
    LOAD_NAME_EXISTS = "load_name_exists"
    LOAD_INVALID_PATH = "load_invalid_path"
    LOAD_INVALID_ADAPTER = "load_invalid_adapter"
    LOAD_ERROR = "load_error"
    UNLOAD_NAME_NONEXISTENT = "unload_name_nonexistent"
    UNLOAD_ERROR = "unload_error"
    UNSPECIFIED_ERROR = "unspecified_error"


class LoRAType(Enum):
    """The weights of a LoRA module, by their name in the checkpoint (``BIAS``: not supported)."""

    A = "lora_A"  # [r, in]: the down projection
    B = "lora_B"  # [out, r]: the up projection
    BIAS = "lora.bias"  # a bias added after B (peft's lora_bias): refused


@dataclass(frozen=True)
class LoRARequest:
    """Load adapter ``lora_path`` under ``lora_name``, or unload ``lora_name``.

    ``operation`` may be given as its value (``"load"`` / ``"unload"``, any case).
    """

    operation: LoRAOperation
    lora_name: str
    lora_path: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        try:
            op = LoRAOperation(self.operation.lower() if isinstance(self.operation, str) else self.operation)
        except ValueError:
            raise ValueError(f"operation must be a LoRAOperation or one of "
                             f"{[o.value for o in LoRAOperation]}, got {self.operation!r}") from None
        object.__setattr__(self, "operation", op)
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty str, got {self.lora_name!r}")
        if self.lora_path is not None and not isinstance(self.lora_path, (str, os.PathLike)):
            raise ValueError(f"lora_path must be a str, a path or None, got {type(self.lora_path).__name__}")


@dataclass(frozen=True)
class LoRAResponse:
    """The answer to a :class:`LoRARequest`: a status and a human-readable message."""

    status: LoRAStatus
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the operation succeeded."""
        return self.status is LoRAStatus.SUCCESS


class LoRAError(Exception):
    """A refused LoRA operation, with the status to answer it with."""

    def __init__(self, status: LoRAStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> LoRAResponse:
        return LoRAResponse(self.status, self.message)


def _invalid(message: str) -> LoRAError:
    return LoRAError(LoRAStatus.LOAD_INVALID_ADAPTER, message)


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One module's adapter: ``A [r, in]``, ``B [out, r]`` (fp32, CPU) and its scale."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class LoRAAdapter:
    """A validated adapter: per targeted module (the model's module name, e.g.
    ``model.layers.0.self_attn.q_proj``) its weights; ``config`` is the parsed
    ``adapter_config.json``."""

    path: str
    modules: Mapping[str, LoRAModuleWeights]
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank of its modules."""
        return max((w.rank for w in self.modules.values()), default=0)


# Config fields that change the forward in ways the runtime does not implement: refused when set.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained modules saved alongside the adapter",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters (not on linear layers)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "megatron_config": "Megatron parallel layers",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}


def _check_config(config: Mapping[str, Any], max_lora_rank: int) -> None:
    """Refuse the settings the runtime does not support (the message names the field)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise _invalid(f"peft_type: {config['peft_type']!r} is not supported (only 'LORA')")
    for name, what in _REFUSED.items():
        if config.get(name):
            raise _invalid(f"{name}: {what} is not supported (got {config[name]!r})")
    if config.get("bias", "none") != "none":
        raise _invalid(f"bias: {config['bias']!r} is not supported (only 'none')")
    for name in ("r", "lora_alpha"):
        v = config.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                or (name == "r" and v != int(v)):
            raise _invalid(f"{name}: must be a positive {'int' if name == 'r' else 'number'}, got {v!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, Mapping):
            raise _invalid(f"{name}: must be a mapping, got {pattern!r}")
        for key, v in pattern.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise _invalid(f"{name}: {key!r} -> {v!r} is not a positive number")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        field_ = "r" if config["r"] > max_lora_rank else "rank_pattern"
        raise _invalid(f"{field_}: rank {int(max(ranks))} is above max_lora_rank {max_lora_rank}")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that matches ``module`` (whole name or a dotted suffix)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _name_matches(target: str | list[str], module: str) -> bool:
    """peft's rule: a str is a regular expression over the whole name, a list names modules by
    their last components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def _layer_index(module: str, layers_pattern: Any) -> int | None:
    names = layers_pattern if isinstance(layers_pattern, list) else [layers_pattern] if layers_pattern \
        else ["layers", "h", "blocks", "layer", "block"]
    m = re.search(rf"(?:^|\.)(?:{'|'.join(map(re.escape, names))})\.(\d+)(?:\.|$)", module)
    return int(m.group(1)) if m else None


def _targeted_modules(config: Mapping[str, Any], targets: Mapping[str, tuple[int, int]],
                      model_modules: Collection[str]) -> set[str]:
    """The module names the config targets; each must be a supported linear layer."""
    target = config.get("target_modules")
    if target == "all-linear":
        target = list(targets)
    if not target or not isinstance(target, (str, list)) or \
            (isinstance(target, list) and not all(isinstance(t, str) for t in target)):
        raise _invalid(f"target_modules: must be a regular expression or a list of module names, "
                       f"got {target!r}")
    exclude = config.get("exclude_modules") or []
    layers = config.get("layers_to_transform")
    layers = {layers} if isinstance(layers, int) else set(layers) if layers else None
    found = set()
    for name in sorted(set(model_modules) | set(targets)):
        if not name or not _name_matches(target, name) or (exclude and _name_matches(exclude, name)):
            continue
        if layers is not None and _layer_index(name, config.get("layers_pattern")) not in layers:
            continue
        if name not in targets:
            raise _invalid(f"target_modules: {name!r} is not a linear layer this runtime can adapt "
                           f"(supported: {_summary(targets)})")
        found.add(name)
    if not found:
        raise _invalid(f"target_modules: {target!r} match no linear layer of the model "
                       f"(supported: {_summary(targets)})")
    return found


def _summary(targets: Collection[str]) -> str:
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return ", ".join(leaves) + " inside the decoder layers"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError) as e:  # truncated, bad header, bad dtype
        raise _invalid(f"{WEIGHTS_FILE}: cannot be read ({e})") from None


_KEY = re.compile(rf"(?:base_model\.model\.)?(?P<module>.+)\."
                  rf"(?P<kind>{LoRAType.A.value}|{LoRAType.B.value})\.weight")


def _pair_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A": A, "lora_B": B}}`` from the checkpoint keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            hint = " (DoRA: use_dora)" if "lora_magnitude_vector" in key else \
                " (lora_bias)" if key.endswith(".bias") else ""
            raise _invalid(f"{WEIGHTS_FILE}: unexpected key {key!r}{hint}")
        pairs.setdefault(m["module"], {})[m["kind"]] = value
    return pairs


def _module_weights(module: str, pair: Mapping[str, torch.Tensor], shape: tuple[int, int], rank: int,
                    alpha: float, rslora: bool) -> LoRAModuleWeights:
    """Check one module's pair against the layer ``shape = (in, out)`` and its rank; fp32 CPU copies."""
    for kind in ("lora_A", "lora_B"):
        if kind not in pair:
            raise _invalid(f"{WEIGHTS_FILE}: missing key for {module}.{kind}.weight")
    a, b = pair["lora_A"], pair["lora_B"]
    n_in, n_out = shape
    if tuple(a.shape) != (rank, n_in) or tuple(b.shape) != (n_out, rank):
        raise _invalid(f"{WEIGHTS_FILE}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                       f"not fit rank {rank} and the layer's [{n_out}, {n_in}] weight (expected "
                       f"({rank}, {n_in}) / ({n_out}, {rank}))")
    if not a.is_floating_point() or not b.is_floating_point():
        raise _invalid(f"{WEIGHTS_FILE}: {module}: weights must be floating point, got {a.dtype} / {b.dtype}")
    a, b = a.float().contiguous(), b.float().contiguous()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise _invalid(f"{WEIGHTS_FILE}: {module}: non-finite values")
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return LoRAModuleWeights(a, b, float(scale))


def _adapter_files(path: Any) -> tuple[Path, Path]:
    if path is None or (isinstance(path, str) and not path):
        raise LoRAError(LoRAStatus.LOAD_INVALID_PATH, "lora_path: a LOAD request needs the adapter's folder")
    folder = Path(os.fspath(path)).expanduser()
    if not folder.is_dir():
        raise LoRAError(LoRAStatus.LOAD_INVALID_PATH, f"lora_path: {str(folder)!r} is not a folder")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            other = " (only safetensors weights are read)" if name == WEIGHTS_FILE and \
                (folder / "adapter_model.bin").exists() else ""
            raise LoRAError(LoRAStatus.LOAD_INVALID_PATH, f"lora_path: {str(folder)!r} has no {name}{other}")
    return folder / CONFIG_FILE, folder / WEIGHTS_FILE


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _invalid(f"{CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _invalid(f"{CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    return config


def read_adapter(path: str | os.PathLike[str], targets: Mapping[str, tuple[int, int]], max_lora_rank: int,
                 model_modules: Collection[str] = ()) -> LoRAAdapter:
    """Read and validate the peft adapter in folder ``path``.

    Parameters
    ----------
    path : str or PathLike
        A folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
    targets : Mapping[str, tuple[int, int]]
        The linear layers an adapter may target: module name -> ``(in_features, out_features)``.
    max_lora_rank : int
        The largest rank accepted.
    model_modules : Collection[str]
        Every module name of the model, so that ``target_modules`` naming a module that exists
        but is not in ``targets`` (``lm_head``, an embedding) is refused by name.

    Returns
    -------
    LoRAAdapter
        fp32 CPU weights of every targeted module, with their scales (``lora_alpha / r``, or
        ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
        override ``r`` / ``lora_alpha`` per module).

    Raises
    ------
    LoRAError
        With the status to answer (see the module docstring).
    """
    try:
        config_path, weights_path = _adapter_files(path)
        config = _read_config(config_path)
        _check_config(config, max_lora_rank)
        wanted = _targeted_modules(config, targets, model_modules)
        pairs = _pair_weights(_read_weights(weights_path))
    except OSError as e:
        raise LoRAError(LoRAStatus.LOAD_ERROR, f"lora_path: cannot read {str(path)!r} ({e})") from None
    unknown = sorted(set(pairs) - wanted)
    if unknown:
        raise _invalid(f"{WEIGHTS_FILE}: weights for {unknown[0]!r}, which target_modules does not target"
                       + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = sorted(wanted - set(pairs))
    if missing:
        raise _invalid(f"{WEIGHTS_FILE}: missing keys for {missing[0]!r} (lora_A / lora_B)"
                       + (f" and {len(missing) - 1} more module(s)" if len(missing) > 1 else ""))
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for name in sorted(wanted):
        rank = int(_pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
        modules[name] = _module_weights(name, pairs[name], targets[name], rank, alpha, rslora)
    return LoRAAdapter(str(path), modules, config)
