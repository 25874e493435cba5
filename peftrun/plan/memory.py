"""Bytes per GPU: model states under each launch config, and the activations of one micro-batch.

The formulas and their sources are in docs/plan.md; benchmarks/plan_check.py measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftrun.plan.census import BNB_BLOCK, Census

# What the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack take beside the
# tensors (not measured here: no GPU; PyTorch's context alone is 0.3-0.5 GB on recent GPUs).
RUNTIME_OVERHEAD = 1 << 30


@dataclass(frozen=True)
class Launch:
    """One way to start the run: DDP (stage None) or DeepSpeed ZeRO, optionally offloaded to host RAM."""

    name: str
    zero_stage: int | None = None
    offload: bool = False  # optimizer state and weights in host RAM (zero3_offload.yaml)
    config_file: str = "ddp.yaml"


LAUNCHES = (
    Launch("DDP", None, False, "ddp.yaml"),
    Launch("ZeRO-1", 1, False, "zero1.yaml"),
    Launch("ZeRO-2", 2, False, "zero2.yaml"),
    Launch("ZeRO-3", 3, False, "zero3.yaml"),
    Launch("ZeRO-3+offload", 3, True, "zero3_offload.yaml"),
)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a step holds, from the recipe's dtype and mixed precision."""

    deepspeed_half: bool  # DeepSpeed with bf16/fp16: it casts the model and keeps fp32 masters
    residual: int  # the residual stream between decoder layers
    compute: int  # matmul outputs and what the attention/MLP save
    mask: int  # a dropout mask element (bool on CUDA; the scaled noise tensor on CPU)


@dataclass(frozen=True)
class States:
    weights: int
    gradients: int
    optimizer: int  # Adam moments (or their 8-bit form)
    master: int  # fp32 master weights (DeepSpeed's partition of them)
    buffers: int  # in flight during a step: DeepSpeed's reduce bucket, ZeRO-3's gathered layer
    host: int  # what offload puts in host RAM instead

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.master + self.buffers


def model_states(c: Census, launch: Launch, world: int, optimizer: str, precision: Precision) -> States:
    """Per-GPU bytes of weights, gradients and optimizer state (DeepSpeed's estimators, generalised)."""
    ds = launch.zero_stage is not None
    half = ds and precision.deepspeed_half
    quantized_bytes = c.weight_bytes - c.weight_bytes_float
    weights = quantized_bytes + (2 * c.float_params if half else c.weight_bytes_float)
    # Per trainable element: the bytes of its weight/gradient as the model holds them.
    grad_elem = 2.0 if half else c.trainable_bytes / max(c.trainable, 1)
    moments = _adam_moments(c, optimizer, 4.0 if ds else grad_elem)
    if not ds:  # DDP's reducer keeps a second, bucketed copy of every gradient (world > 1)
        grads = int(grad_elem * c.trainable)
        return States(weights, grads * (2 if world > 1 else 1), moments, 0, 0, 0)
    shard = max(world, 1)
    bucket = int(grad_elem * c.hidden * c.hidden)  # accelerate's "auto" reduce_bucket_size, in flight
    master = 4 * c.trainable // shard  # DeepSpeed always updates an fp32 copy of its partition
    # ZeRO-1 and -2 alike keep only the reduced partition of the gradients (measured: plan_check.py),
    # in fp32 for the step, beside its bf16/fp16 form under mixed precision.
    gradients = 4 * c.trainable // shard + (int(grad_elem * c.trainable) // shard if grad_elem < 4 else 0)
    moments //= shard
    if launch.zero_stage != 3:
        return States(weights, gradients, moments, master, bucket, 0)
    elem = weights / max(c.params, 1)
    gathered = int(elem * c.largest_layer_params)  # the layer being computed, whole, in flight
    persistent = int(elem * c.persistent_params)  # small tensors ZeRO-3 leaves whole on every rank
    if launch.offload:  # only the layer in flight, the persistent tensors and the bucket stay on the GPU
        return States(persistent, 0, 0, 0, gathered + bucket, weights // shard + gradients + master + moments)
    # ZeRO-3 keeps its reduce bucket allocated between steps (measured: plan_check.py).
    return States(weights // shard + persistent, gradients + bucket, moments, master, gathered, 0)


def _adam_moments(c: Census, optimizer: str, elem: float) -> int:
    """AdamW's two moments: in the parameter's dtype (torch), or 8-bit with fp32 block scales."""
    if optimizer == "adamw_8bit":
        big = c.trainable - c.trainable_small
        return 2 * big + 8 * c.trainable_small + 8 * -(-big // BNB_BLOCK)
    return int(2 * elem * c.trainable)


@dataclass(frozen=True)
class Activations:
    saved: int  # what autograd keeps from forward to backward
    peak: int  # saved plus the largest transient (the loss's logits, a layer's gradients)


def activations(
    c: Census,
    tokens: int,
    head_tokens: int,
    checkpointing: bool,
    precision: Precision,
    attention_mask_bytes: int = 0,
) -> Activations:
    """Bytes of one micro-batch's activations (per GPU), for a Llama-shaped decoder.

    A padding mask (attention_mask_bytes > 0) also sends transformers' sdpa path through repeat_kv:
    keys and values are saved at the query heads' width.
    """
    layer = layer_bytes_per_token(c, precision, repeat_kv=attention_mask_bytes > 0) * tokens
    head = head_saved_per_token(c, precision) * head_tokens
    # Beside the saved fp32 log-probabilities (4V per token), backward holds three more [tokens, V] fp32
    # tensors: the loss gradient, exp(log-probs) inside log_softmax's backward, and its output.
    logits_transient = 12 * c.vocab * head_tokens
    layer_transient = 2 * precision.compute * max(c.intermediate, c.hidden) * tokens
    if checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        saved = c.layers * precision.residual * c.hidden * tokens + head
        # The loss's backward runs before any recomputation; the log-probabilities are freed after it.
        recompute = saved - 4 * c.vocab * head_tokens + layer + layer_transient
        return Activations(saved, max(saved + logits_transient, recompute) + attention_mask_bytes)
    saved = c.layers * layer + head
    return Activations(saved, saved + max(logits_transient, layer_transient) + attention_mask_bytes)


def layer_bytes_per_token(c: Census, p: Precision, repeat_kv: bool = False) -> int:
    """What one decoder layer saves for backward, per token (Korthikanti et al. 2022, section 4.1,
    recounted for a pre-norm SwiGLU decoder with fused attention: no dropout, no score matrix)."""
    h, i, a = c.hidden, c.intermediate, p.compute
    norm = 4 * h + (p.residual * h if c.norms_train else 0)  # RMSNorm's fp32 input, its normalised x
    kv = h if repeat_kv else c.kv_dim
    attention = a * h + 2 * a * kv + a * h + 4 * c.heads  # q, k, v after RoPE; output; logsumexp
    mlp = 3 * a * i  # gate (SiLU's input), SiLU's output, up
    return (
        2 * norm
        + attention
        + mlp
        + _inputs_kept(c, p, h, ("q_proj", "k_proj", "v_proj"))
        + _inputs_kept(c, p, h, ("o_proj",))
        + _inputs_kept(c, p, h, ("gate_proj", "up_proj"))
        + _inputs_kept(c, p, i, ("down_proj",))
    )


def _inputs_kept(c: Census, p: Precision, width: int, names: tuple[str, ...]) -> int:
    """What linear layers reading one input keep of it: the input itself when a weight trains on it
    (or an adapter without dropout reads it), and each adapter's dropped copy and mask otherwise."""
    adapted = [n for n in names if n in c.lora_targets]
    keeps_input = any(n in c.trained_linears for n in names) or (adapted and c.lora_dropout == 0)
    kept = p.compute * width if keeps_input else 0
    if c.lora_dropout > 0:
        kept += len(adapted) * (p.compute + p.mask) * width
    return kept + len(adapted) * p.compute * c.lora_rank  # lora_A's output, read by lora_B


def head_saved_per_token(c: Census, p: Precision) -> int:
    """The final norm, the head's input if the head trains, and the loss's fp32 log-probabilities."""
    norm = 4 * c.hidden + (p.residual * c.hidden if c.norms_train else 0)
    head_input = p.compute * c.hidden if c.head_trains else 0
    return norm + head_input + 4 * c.vocab
