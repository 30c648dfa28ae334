"""Tensor parallelism with transformers' own TP (``from_pretrained(..., tp_plan="auto")``).

Every rank runs the same generator on its shard of the model: its KV cache holds the rank's
own key/value heads (``num_key_value_heads / tp_size``), the logits come out whole on every
rank, and the counter-based sampler draws the same token from the same logits and seed on
every rank, so no token is ever broadcast. What must agree is what the sampler is keyed by:
the generator seed (rank 0's, broadcast once at construction over a CPU group) and the order
in which requests are made and admitted (every rank runs the same calls: the usual torchrun
pattern, or :mod:`decodekit.serving.parallel` for a server fed on rank 0).

May call: ``torch.distributed``.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, NamedTuple

import torch

__all__ = ["LinearShard", "all_ranks", "check_pipeline_parallel", "check_tensor_parallel", "cpu_group",
           "from_leader", "init_distributed", "is_leader", "linear_shard", "rank", "shared_seed", "tp_size"]

_CPU_GROUP: Any = None


def tp_size(model: torch.nn.Module) -> int:
    """The model's tensor-parallel degree (1 when it is not sharded)."""
    return int(getattr(model, "tp_size", None) or 1)


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_leader() -> bool:
    """Rank 0: the one that detokenizes for the user, streams and serves."""
    return rank() == 0


def init_distributed() -> None:
    """Join the torchrun job this process belongs to (gloo on a CPU; on a GPU transformers
    joins it with NCCL when it loads the model); ``ValueError`` outside torchrun."""
    dist = torch.distributed
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--tp runs under torchrun: torchrun --nproc_per_node N -m decodekit ... --tp")
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")


def cpu_group() -> Any:
    """A gloo group over every rank, for host objects (seeds, requests); made once, on every
    rank in the same order (a collective)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        dist = torch.distributed
        _CPU_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CPU_GROUP


def shared_seed(seed: int | None, tp: int) -> int | None:
    """The generator seed every rank uses: ``seed`` when given (it must then be the same on
    every rank), else one drawn on rank 0 and broadcast. Without TP, ``seed`` itself."""
    if tp <= 1:
        return seed
    leader = from_leader(secrets.randbits(63) if seed is None else seed, tp)
    if seed is not None and leader != seed:
        raise ValueError(f"seed differs between ranks ({seed} here, {leader} on rank 0): pass the same "
                         "seed on every rank")
    return leader


def from_leader(value: Any, tp: int) -> Any:
    """Rank 0's ``value`` (a picklable host object) on every rank: one broadcast over the CPU
    group, for every decision a rank would otherwise make alone (a seed, timings that steer
    the plan). Without TP, ``value`` itself."""
    if tp <= 1:
        return value
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"the model is tensor-parallel (tp_size={tp}) but torch.distributed is not "
                         "initialised: run every rank under torchrun")
    box = [value]
    dist.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]


def check_pipeline_parallel(model: torch.nn.Module) -> None:
    """``ValueError`` for a model split into pipeline stages by transformers
    (``DistributedConfig(pp_size=N)``): its forward binds the arguments by name and hands each
    stage only the hidden states, so decodekit's KV cache (passed by keyword) never reaches
    the stages' attention layers."""
    stage = getattr(model, "_pp_stage", None)
    if stage is None and not any(type(m).__name__ == "PipelineIdentityLayer" for m in model.modules()):
        return
    size = getattr(stage, "pp_size", "> 1")
    raise ValueError(f"pipeline parallelism is not supported (the model is split into {size} pipeline "
                     "stages): transformers' pipeline forward does not pass the KV cache "
                     "(past_key_values) to the stages' layers. Load it with tensor parallelism instead "
                     "(tp_plan='auto', or DistributedConfig(tp_plan='auto') without pp_size)")


def all_ranks(flag: bool, tp: int) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce over the CPU group): for outcomes a
    rank may meet alone (an adapter file that one rank cannot read), so that every rank then
    acts alike. Without TP, ``flag`` itself."""
    if tp <= 1:
        return bool(flag)
    box = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN, group=cpu_group())
    return bool(box.item())


class LinearShard(NamedTuple):
    """The slice of a tensor-parallel linear layer's weight ``[out, in]`` that this rank holds:
    ``dim`` 0 (column-wise: output features ``start:stop``; the input is whole) or 1 (row-wise:
    input features ``start:stop``; the output is summed over the ranks of ``mesh``, the layer's
    DeviceMesh: its process group is looked up when used, so nothing here keeps a group alive
    past ``destroy_process_group``)."""

    dim: int
    start: int
    stop: int
    mesh: Any


def linear_shard(module: torch.nn.Module) -> LinearShard | None:
    """How transformers' TP plan split ``module`` (an ``nn.Linear``) on this rank: None when its
    weight is whole (not a DTensor, or replicated); ``ValueError`` for a layout other than one
    column- or row-wise split over a 1-D mesh (transformers' head-aligned "unit" styles)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without distributed tensors: nothing is sharded
        return None
    weight = module.weight
    if not isinstance(weight, DTensor):
        return None
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
        raise ValueError(f"a LoRA target layer is sharded as {placements} over a {mesh.ndim}-D mesh: LoRA "
                         "under tensor parallelism supports layers split column- or row-wise over one "
                         "mesh dimension (tp_plan 'colwise' / 'rowwise')")
    dim = placements[0].dim % 2
    n, local = weight.shape[dim], weight.to_local().shape[dim]
    chunk = -(-n // mesh.size())  # torch.chunk's split, which Shard follows
    start = min(mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    if stop - start != local:
        raise ValueError(f"a LoRA target layer's shard ({local} of {n} features on rank "
                         f"{mesh.get_local_rank()}) is not torch.chunk's split ({start}:{stop})")
    return LinearShard(dim, start, stop, mesh)


def check_tensor_parallel(tp: int, kv_heads: int) -> None:
    """``ValueError``s for what TP cannot run, saying what to change."""
    if tp <= 1:
        return
    if kv_heads % tp:
        raise ValueError(f"num_key_value_heads {kv_heads} is not divisible by tp_size {tp}: use a tp_size "
                         "that divides it")
