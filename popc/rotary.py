"""Rotary position embedding (RoPE), the one implementation popc's graph and references use.

Hugging Face's convention: the head dimension is split in halves, and
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``; ``cos`` and
``sin`` repeat each frequency in both halves and broadcast over heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the runtime's key rotation needs only numpy
    import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., head_dim] by the angles whose cosines and sines are given."""
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` [B, 1, S, head_dim] for integer ``positions`` [B, S] (scale folded in)."""
    import torch

    freqs = positions.unsqueeze(-1).float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).unsqueeze(1), (emb.sin() * scale).unsqueeze(1)


def rotate_keys(keys: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Cached keys [..., head_dim] (numpy) rotated once more by the angles whose cosines and
    sines [head_dim / 2] are given (a pure rotation: any RoPE scale divided out). Rotations
    compose, so a key rotated at position p this way reads as rotated at p + that angle."""
    half = cos.shape[-1]
    first, second = keys[..., :half], keys[..., half : 2 * half]
    rotated = keys.copy()
    rotated[..., :half] = first * cos - second * sin
    rotated[..., half : 2 * half] = second * cos + first * sin
    return rotated
