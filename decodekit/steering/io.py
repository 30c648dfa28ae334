"""Steering-vector files: safetensors (decodekit's own) and GGUF control vectors.

safetensors: one fp32 tensor ``layer.{i}`` per layer; ``model_name``, ``method`` and
``metadata`` go in the header as JSON-encoded strings.

GGUF (the control-vector format of llama.cpp and repeng): ``general.architecture =
"controlvector"``, ``controlvector.model_hint`` (``model_name``, ``""`` when None),
``controlvector.layer_count`` (int32, the number of direction tensors, as llama.cpp's
cvector-generator writes it) and one F32 tensor ``direction.{i}`` per layer. The tensor
index *is* the decodekit layer index: llama.cpp's loader puts ``direction.N`` in its
per-layer slot ``il = N`` and adds it to the output of block ``il`` (0-based), and repeng
adds ``direction.N`` to the output of ``model.model.layers[N]``. llama.cpp rejects
``direction.0`` (it never steers block 0); saving a vector with layer 0 warns. ``method``
and ``metadata`` travel as ``decodekit.method`` / ``decodekit.metadata`` (llama.cpp
ignores unknown keys).

Calls nothing else in decodekit (the vector class calls these).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load", "save"]

_GGUF_ARCH = "controlvector"
_SAFETENSORS_FORMAT = "decodekit.steering_vector"

Directions = Mapping[int, torch.Tensor]


def save(path: str | os.PathLike[str], directions: Directions, *, model_name: str | None,
         method: str | None, metadata: Mapping[str, str]) -> None:
    """Write ``{layer: fp32 tensor [H]}`` to ``path`` (GGUF if it ends in ``.gguf``). A folder
    that does not exist is a ``ValueError``; a write that fails is an ``OSError``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write steering vector {str(path)!r}: folder {str(path.parent)!r} "
                         "does not exist")
    try:
        _save(path, directions, model_name, method, metadata)
    except OSError:
        raise
    except Exception as e:  # the writers' own error types
        raise OSError(f"cannot write steering vector {str(path)!r}: {type(e).__name__}: {e}") from None


def _save(path: Path, directions: Directions, model_name: str | None, method: str | None,
          metadata: Mapping[str, str]) -> None:
    if path.suffix.lower() == ".gguf":
        _save_gguf(path, directions, model_name, method, metadata)
        return
    from safetensors.torch import save_file

    header = {"format": _SAFETENSORS_FORMAT, "model_name": json.dumps(model_name),
              "method": json.dumps(method), "metadata": json.dumps(dict(metadata))}
    save_file({f"layer.{k}": t for k, t in directions.items()}, str(path), metadata=header)


def load(path: str | os.PathLike[str]) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``(directions, {"model_name", "method", "metadata"})`` read from ``path``. A missing,
    truncated or corrupt file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"steering vector file {str(path)!r} does not exist")
    try:
        directions, meta = _load_gguf(path) if path.suffix.lower() == ".gguf" else _load_safetensors(path)
    except Exception as e:  # truncated or byte-flipped files fail in many ways inside the readers
        raise ValueError(f"steering vector file {str(path)!r} is not a valid "
                         f"{'GGUF control vector' if path.suffix.lower() == '.gguf' else 'safetensors'} "
                         f"file ({type(e).__name__}: {e})"[:500]) from None
    if not isinstance(meta.get("metadata") or {}, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in (meta.get("metadata") or {}).items()):
        raise ValueError(f"steering vector file {str(path)!r}: metadata must map str to str")
    for key in ("model_name", "method"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"steering vector file {str(path)!r}: {key} must be a string")
    return directions, meta


def _load_safetensors(path: Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    directions: dict[int, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        for name in f.keys():
            directions[_parse_index(name, "layer", path)] = f.get_tensor(name)

    def field(key: str, default: Any) -> Any:
        return json.loads(header[key]) if key in header else default

    return directions, {"model_name": field("model_name", None), "method": field("method", None),
                        "metadata": field("metadata", {})}


def _save_gguf(path: Path, directions: Directions, model_name: str | None, method: str | None,
               metadata: Mapping[str, str]) -> None:
    import gguf

    if 0 in directions:
        warnings.warn("steering vector has layer 0: saved as direction.0, which llama.cpp rejects "
                      "(it never steers block 0); repeng and decodekit read it", stacklevel=5)
    writer = gguf.GGUFWriter(str(path), _GGUF_ARCH)
    writer.add_string(f"{_GGUF_ARCH}.model_hint", model_name or "")
    writer.add_int32(f"{_GGUF_ARCH}.layer_count", len(directions))
    if method is not None:
        writer.add_string("decodekit.method", method)
    if metadata:
        writer.add_string("decodekit.metadata", json.dumps(dict(metadata)))
    for k, t in directions.items():
        writer.add_tensor(f"direction.{k}", t.numpy().astype(np.float32, copy=False))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load_gguf(path: Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def string(key: str) -> str | None:
        field = reader.get_field(key)
        return None if field is None else str(field.contents())

    arch = string("general.architecture")
    if arch != _GGUF_ARCH:
        raise ValueError(f"{str(path)!r}: general.architecture is {arch!r}, expected {_GGUF_ARCH!r}")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{str(path)!r}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                             "expected F32")
        directions[_parse_index(tensor.name, "direction", path)] = torch.from_numpy(
            np.array(tensor.data, dtype=np.float32).reshape(-1))
    meta = string("decodekit.metadata")
    return directions, {"model_name": string(f"{_GGUF_ARCH}.model_hint") or None,
                        "method": string("decodekit.method"),
                        "metadata": json.loads(meta) if meta else None}


def _parse_index(name: str, prefix: str, path: Path) -> int:
    head, _, tail = name.partition(".")
    if head != prefix or not tail.isdigit():
        raise ValueError(f"{str(path)!r}: unexpected tensor name {name!r}, expected '{prefix}.<layer>'")
    return int(tail)
