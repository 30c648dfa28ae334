"""Launch settings: the one helper every kernel launch goes through.

Liger-Kernel's ``calculate_settings`` idea: the block size decides ``num_warps``; plus
the row split of the process launch (programs per row). Pure Python and torch (device
properties), so it imports without Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .layout import MAX_CHUNKS

__all__ = ["Launch", "cdiv", "interpreting", "launch", "next_pow2", "num_sms", "num_warps",
           "row_split"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int, lo: int = 1) -> int:
    """Smallest power of two >= ``max(n, lo)``."""
    return max(lo, 1 << max(0, (max(n, 1) - 1).bit_length()))


def num_warps(block: int) -> int:
    """Warps for a program whose widest tile has ``block`` elements (Liger's rule, down to
    one warp for scalar programs)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 256:
        return 4
    if block >= 64:
        return 2
    return 1


@dataclass(frozen=True)
class Launch:
    """Grid and warps of one launch: ``kernel[l.grid](..., num_warps=l.num_warps)``."""

    grid: tuple[int, ...]
    num_warps: int


def launch(grid: tuple[int, ...], block: int) -> Launch:
    """The launch of a kernel over ``grid`` whose tiles are ``block`` wide."""
    return Launch(tuple(grid), num_warps(block))


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def row_split(n_rows: int, n_cols: int, device: torch.device, block: int) -> tuple[int, int]:
    """Programs per row and columns per program for a row-split launch.

    Aim for about four programs per SM over the whole grid, at most
    :data:`~decodekit.kernels.layout.MAX_CHUNKS` per row; each program covers a whole
    number of ``block``-wide tiles. Returns ``(programs_per_row, chunk)``.
    """
    tiles = cdiv(n_cols, block)
    want = max(1, cdiv(4 * num_sms(device), max(n_rows, 1)))
    per_row = max(1, min(tiles, want, MAX_CHUNKS))
    tiles_per_prog = cdiv(tiles, per_row)
    per_row = cdiv(tiles, tiles_per_prog)
    return per_row, tiles_per_prog * block
