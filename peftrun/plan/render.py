"""A plan as a table for people, or as JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from peftrun.plan import Plan

GB = 1024**3


def plan_text(plan: Plan) -> str:
    c, r = plan.census, plan.recipe
    quant = r.model.quantization
    base = (
        f"{quant.bits}-bit {quant.quant_type if quant.bits == 4 else 'int8'} base"
        if quant
        else f"{r.model.dtype} base"
    )
    ckpt = "on" if r.model.gradient_checkpointing else "off"
    lines = [
        f"{plan.world} GPU(s) ({plan.nodes} node(s) x {plan.gpus}) of {plan.gpu_bytes / GB:.0f} GB",
        f"model: {c.architecture}, {c.params:,} parameters, {c.trainable:,} trainable ({r.method.kind}), {base}",
        f"step: micro-batch {r.train.micro_batch_size} x {r.data.max_seq_len} tokens "
        f"({plan.head_tokens:,} through the LM head), gradient checkpointing {ckpt}, "
        f"mixed precision {r.train.mixed_precision}, {r.train.optimizer}",
        "",
        "GB per GPU       weights  grads  optim  master  buffers  activations   total  verdict",
        f"{'':17}{'':47}ckpt {ckpt:>3} / {'off' if ckpt == 'on' else 'on'}",
    ]
    for row in plan.rows:
        s = row.states
        verdict = row.applies or ("fits" if row.fits else "does not fit")
        lines.append(
            f"{row.launch.name:<16}{s.weights / GB:8.2f}{s.gradients / GB:7.2f}{s.optimizer / GB:7.2f}"
            f"{s.master / GB:8.2f}{s.buffers / GB:9.2f}{row.activations.peak / GB:8.2f} /"
            f"{row.activations_other.peak / GB:6.2f}{row.total / GB:8.2f}  {verdict}"
        )
        if s.host:
            lines.append(f"{'':16}(host RAM per GPU: {s.host / GB:.2f} GB)")
    lines += ["", "total = states + activation peak + 1 GB CUDA context and workspaces", plan.advice]
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    def rows() -> list[dict[str, Any]]:
        out = []
        for row in plan.rows:
            item = dataclasses.asdict(row)
            item["launch"] = row.launch.name
            item["config_file"] = row.launch.config_file
            item["states"]["total"] = row.states.total
            out.append(item)
        return out

    census = dataclasses.asdict(plan.census)
    for key in ("lora_targets", "trained_linears"):
        census[key] = sorted(census[key])
    return json.dumps(
        {
            "gpus": plan.gpus,
            "nodes": plan.nodes,
            "gpu_bytes": plan.gpu_bytes,
            "tokens": plan.tokens,
            "head_tokens": plan.head_tokens,
            "census": census,
            "rows": rows(),
            "advice": plan.advice,
        },
        indent=2,
    )
