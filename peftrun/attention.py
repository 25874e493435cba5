"""Attention for packed rows that costs what the samples cost, not what the row costs.

A packed row of several samples gets a block-diagonal causal mask from transformers (see
data/packing.py). Where no variable-length kernel exists (CPUs; GPUs without flash-attn), that mask
sends sdpa to its generic path over the whole row: O(row length^2) work and a materialised mask,
most of it for pairs of tokens that may not attend to each other. This attention function instead
runs sdpa's causal kernel on each sample of the row (found from its restarting position_ids), so
the work is the sum of the samples' squares and no mask is built.

It is registered with transformers' AttentionInterface and selected for packed training only.
transformers builds no mask for an implementation it does not know, which is exact here: within a
sample attention is causal, and right padding (the only padding peftrun makes) is never attended to
by a real token under a causal mask.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

PACKED_SDPA = "peftrun_packed_sdpa"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, length, head_dim]
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2]:
        raise RuntimeError(
            f"{PACKED_SDPA}: this architecture does not pass position_ids to its attention (or uses a KV "
            "cache); packed training cannot use it"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    dropout_p = dropout if module.training else 0.0
    out = torch.empty_like(query)
    position_ids = position_ids.expand(query.shape[0], -1)
    for row in range(query.shape[0]):
        # A sample starts where the position does not continue the previous one (and at 0).
        starts = (torch.diff(position_ids[row], prepend=position_ids[row, :1] + 1) != 1).nonzero().flatten()
        bounds = [*starts.tolist(), query.shape[2]]
        for start, end in itertools.pairwise(bounds):
            out[row : row + 1, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                dropout_p=dropout_p,
                is_causal=True,
                scale=scaling,
                enable_gqa=groups > 1,
            )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make PACKED_SDPA a name transformers models accept (`model.set_attn_implementation`)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA
