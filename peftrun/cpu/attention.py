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
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    # split/unbind and cat/stack, not slice assignment into one output: the backward of a slice
    # assignment writes a zero-filled gradient of the whole tensor per sample.
    for row, (q, k, v) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0), strict=True)):
        # A sample starts where the position does not continue the previous one (and at 0).
        starts = (torch.diff(position_ids[row], prepend=position_ids[row, :1] + 1) != 1).nonzero().flatten()
        lengths = torch.diff(starts, append=starts.new_tensor([query.shape[2]])).tolist()
        samples = [
            torch.nn.functional.scaled_dot_product_attention(
                q_sample.unsqueeze(0),
                k_sample.unsqueeze(0),
                v_sample.unsqueeze(0),
                dropout_p=dropout_p,
                is_causal=True,
                scale=scaling,
                enable_gqa=groups > 1,
            )
            for q_sample, k_sample, v_sample in zip(
                q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1), strict=True
            )
        ]
        rows.append(torch.cat(samples, dim=2))
    out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make PACKED_SDPA a name transformers models accept (`model.set_attn_implementation`)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA
