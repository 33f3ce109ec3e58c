"""Rotary position embedding (RoPE), the one implementation popc's graph and references use.

Hugging Face's convention: the head dimension is split in halves, and
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``; ``cos`` and
``sin`` repeat each frequency in both halves and broadcast over heads.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., head_dim] by the angles whose cosines and sines are given."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` [B, 1, S, head_dim] for integer ``positions`` [B, S] (scale folded in)."""
    freqs = positions.unsqueeze(-1).float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).unsqueeze(1), (emb.sin() * scale).unsqueeze(1)
