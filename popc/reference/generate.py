"""Greedy decoding over left-padded prompts, shared by the PyTorch references."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def greedy_generate(step, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int = 0) -> list[list[int]]:
    """Greedy decoding with any reference's ``step(ids, mask, cache=None) -> (logits, cache)``
    over left-padded prompts, without early stop: the new ids per prompt."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    logits, cache = step(ids, mask)
    generated = []
    for _ in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_ids)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        logits, cache = step(next_ids, mask, cache)
    return torch.cat(generated, dim=1).tolist()
