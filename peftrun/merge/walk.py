"""Run a model one block of weights at a time: its own forward, with each block built when reached.

The architecture is built with no weights (meta parameters; real buffers, such as rotary frequencies
and embedding scales, which the model computes at init). Each block that holds weights (every decoder
layer, the embeddings, the final norm, the head) is replaced by a stand-in that, when the model's own
forward reaches it, builds the block once per source (its weights read by name from safetensors,
in fp32), runs it on the same input, frees it and passes on. So the rotary embeddings, attention masks,
embedding scales and logit soft-caps are computed by the model's own code, and peak memory is one block
plus the activations of the probe batch.

The probe batch holds one copy of the probe rows per source: every block runs on all rows, and each
source's rows are continued with that source's output. So every block of every source is also run on the
first source's hidden states (the comparison that names a wrong block), and each source's last rows are
its own model's logits, end to end.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from peftrun.merge.lora import PEFT_PREFIX

HEAD_SLICE_ELEMENTS = 2**24  # a linear head is run a slice of its rows at a time: 64 MiB in fp32


class WalkUnsupported(RuntimeError):
    """The architecture cannot be run block by block (the caller falls back to the whole model)."""


@dataclass
class Source:
    """One model the walk runs: its weights by name (in the model's naming), and the adapter on top."""

    label: str
    tensor: Callable[[str], torch.Tensor]
    adapter: AdapterLayers | None = None
    # Rows of a 2-D weight without reading the rest (None where it cannot give them as they are).
    rows: Callable[[str, list[int] | slice], torch.Tensor | None] | None = None


@dataclass
class BlockDiff:
    """A block of one source against the first source's, on the first source's hidden states."""

    block: str
    max_abs: float
    scale: float  # max |reference output|

    @property
    def max_rel(self) -> float:
        return self.max_abs / max(1.0, self.scale)


@dataclass
class WalkResult:
    logits: list[torch.Tensor]  # per source, its own model's, end to end (padding positions zeroed)
    blocks: list[list[BlockDiff]]  # per source after the first, each block against the first's
    largest_block_bytes: int  # the largest block built whole, in fp32: the walk's weight memory


class AdapterLayers:
    """A peft adapter put on one block at a time: peft's own layers (inject_adapter_in_model), with the
    saved tensors under that block; saved whole weights (modules_to_save) replace the base's."""

    def __init__(self, peft_config: Any, saved: dict[str, torch.Tensor]) -> None:
        self.config = copy.copy(peft_config)
        # peft wraps modules_to_save in a copy; here their saved weights are the block's weights instead.
        self.config.modules_to_save = None
        self.config.inference_mode = True
        self.saved = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in saved.items()}

    def replacement(self, name: str) -> torch.Tensor | None:
        """The adapter's saved whole weight `name` (an adapted embedding saves its base layer too)."""
        module, _, param = name.rpartition(".")
        return self.saved.get(name, self.saved.get(f"{module}.base_layer.{param}"))

    def touches(self, block: str) -> bool:
        """Whether the adapter saved anything under the block (its layers, or a whole weight)."""
        return any(key.startswith(block + ".") for key in self.saved)

    def apply(self, module: torch.nn.Module, block: str, weight_names: set[str]) -> torch.nn.Module:
        """`module` (the block named `block`) with the adapter's layers on it; unchanged when the adapter
        has nothing there."""
        from peft import inject_adapter_in_model
        from peft.utils import set_peft_model_state_dict

        prefix = block + "." if block else ""
        own = {
            key: tensor
            for key, tensor in self.saved.items()
            if key.startswith(prefix) and key.replace(".base_layer.", ".") not in weight_names
        }
        if not own:
            return module
        # peft matches target modules by their full names (layer indices, patterns): the block goes in a
        # shell at its own path.
        shell = _shell(module, block)
        try:
            inject_adapter_in_model(copy.copy(self.config), shell)
        except ValueError as exc:  # methods whose state is shared across layers (VeRA, ...)
            raise WalkUnsupported(
                f"peft cannot put this adapter on one block: {str(exc).split('. ')[0]}"
            ) from None
        unexpected: list[str] = set_peft_model_state_dict(shell, own).unexpected_keys  # type: ignore[attr-defined]
        if unexpected:
            raise RuntimeError(f"internal: adapter tensors {unexpected[:3]} found no peft layer")
        return shell.get_submodule(block) if block else shell


def run_blocks(skeleton: Any, sources: list[Source], batch: dict[str, torch.Tensor]) -> WalkResult:
    """Every source's logits on `batch`, the model run block by block (see the module's docstring)."""
    rows = len(batch["input_ids"])
    blocks = weight_blocks(skeleton)
    tied = _tied_names(skeleton)
    recorder = _Recorder(len(sources), rows, batch.get("attention_mask"))
    for name in blocks:
        template = skeleton.get_submodule(name)
        _replace(skeleton, name, _StandIn(template, name, sources, tied, recorder))
    stacked = {key: value.repeat(len(sources), *([1] * (value.dim() - 1))) for key, value in batch.items()}
    skeleton.eval()
    # No key/value cache: it would carry one source's keys into the next source's run of the same layer.
    skeleton.config.use_cache = False
    with torch.no_grad():
        logits = skeleton(**stacked).logits.float()
    mask = stacked.get("attention_mask")
    if mask is not None and logits.dim() == 3 and logits.shape[:2] == mask.shape:
        logits = logits * mask[..., None].to(logits.dtype)  # padding positions' logits mean nothing
    per_source = [logits[i * rows : (i + 1) * rows] for i in range(len(sources))]
    return WalkResult(per_source, recorder.diffs, recorder.largest_block_bytes)


def weight_blocks(skeleton: Any) -> list[str]:
    """The blocks built one at a time: each layer of the model's layer lists, and every other module
    that holds weights itself (with what is below it). No layer list: the walk does not apply."""
    blocks: list[str] = []
    found_layers = False

    def visit(module: torch.nn.Module, name: str) -> None:
        nonlocal found_layers
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(module, torch.nn.ModuleList) and any(True for _ in child.parameters()):
                found_layers = True
                blocks.append(full)
            elif any(True for _ in child.parameters(recurse=False)):
                blocks.append(full)
            else:
                visit(child, full)

    if any(True for _ in skeleton.parameters(recurse=False)):
        raise WalkUnsupported(f"{type(skeleton).__name__} holds weights outside its modules")
    visit(skeleton, "")
    if not found_layers:
        raise WalkUnsupported(f"{type(skeleton).__name__} has no list of layers")
    return blocks


class _Recorder:
    """Combines the sources' outputs of a block (each source's rows from its own block) and records how
    far each source's block is from the first source's on the first source's rows."""

    def __init__(self, sources: int, rows: int, mask: torch.Tensor | None) -> None:
        self.sources = sources
        self.rows = rows
        self.mask = mask
        self.diffs: list[list[BlockDiff]] = [[] for _ in range(sources - 1)]
        self.largest_block_bytes = 0  # of the blocks built whole, in fp32 (with their adapter layers)

    def combine(self, name: str, outputs: list[Any]) -> Any:
        tensors = [_first_tensor(name, out) for out in outputs]
        reference = self._real_tokens(tensors[0][: self.rows].float())
        for i, tensor in enumerate(tensors[1:]):
            got = self._real_tokens(tensor[: self.rows].float())
            self.diffs[i].append(
                BlockDiff(name, float((got - reference).abs().max()), float(reference.abs().max()))
            )
        combined = tensors[0].clone()
        for i, tensor in enumerate(tensors[1:], start=1):
            combined[i * self.rows : (i + 1) * self.rows] = tensor[i * self.rows : (i + 1) * self.rows]
        first = outputs[0]
        return combined if isinstance(first, torch.Tensor) else (combined, *first[1:])

    def _real_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or tensor.dim() < 2 or tuple(tensor.shape[:2]) != tuple(mask.shape):
            return tensor
        return tensor * mask.view(*mask.shape, *([1] * (tensor.dim() - 2))).to(tensor.dtype)


class _StandIn(torch.nn.Module):
    """Takes a block's place in the model: builds it per source when called. Attributes the model's
    forward reads from its layers (attention_type, layer_idx, ...) come from the weightless template."""

    def __init__(
        self,
        template: torch.nn.Module,
        name: str,
        sources: list[Source],
        tied: dict[str, str],
        recorder: _Recorder,
    ) -> None:
        super().__init__()
        # Kept out of the module tree: its meta parameters are not the model's.
        self.__dict__["_block"] = (template, name, sources, tied, recorder)

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["_block"][0], attr)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        template, name, sources, tied, recorder = self.__dict__["_block"]
        outputs = []
        for source in sources:
            output = by_rows(template, name, source, tied, args, kwargs)
            if output is None:
                block = build_block(template, name, source, tied)
                recorder.largest_block_bytes = max(
                    recorder.largest_block_bytes, sum(4 * p.numel() for p in block.parameters())
                )
                output = block(*args, **kwargs)
                del block  # freed here (no reference cycles): one block in memory at a time
            outputs.append(output)
        return recorder.combine(name, outputs)


def by_rows(
    template: torch.nn.Module,
    name: str,
    source: Source,
    tied: dict[str, str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> torch.Tensor | None:
    """An embedding or a plain linear head (a model's largest weights, vocabulary x hidden) run from the
    rows it needs: the probe's tokens, or the head's output rows a slice at a time. None: run it whole."""
    weights = [local for local, _ in template.named_parameters()]
    if source.rows is None or weights != ["weight"] or kwargs or len(args) != 1:
        return None
    if source.adapter is not None and source.adapter.touches(name):
        return None
    weight = tied.get(f"{name}.weight", f"{name}.weight")
    (inputs,) = args
    if (
        isinstance(template, torch.nn.Embedding)
        and template.max_norm is None
        and not inputs.is_floating_point()
    ):
        ids = inputs.unique()  # sorted
        rows = source.rows(weight, ids.tolist())
        if rows is None:
            return None
        block = copy.deepcopy(template)  # its own forward (Gemma's scaled embeddings) on the rows it needs
        block.padding_idx = None  # only affects gradients; its index is not a row here
        block.weight = torch.nn.Parameter(rows.float(), requires_grad=False)
        return block(torch.searchsorted(ids, inputs))
    if type(template) is torch.nn.Linear:
        step = max(1, HEAD_SLICE_ELEMENTS // template.in_features)
        parts = []
        for start in range(0, template.out_features, step):
            rows = source.rows(weight, slice(start, start + step))
            if rows is None:
                return None
            parts.append(torch.nn.functional.linear(inputs, rows.float()))
        return torch.cat(parts, dim=-1)
    return None


def build_block(
    template: torch.nn.Module, name: str, source: Source, tied: dict[str, str]
) -> torch.nn.Module:
    """The block `name` with `source`'s weights in fp32 (and its adapter's layers)."""
    block = copy.deepcopy(template)
    weights = {}
    names = {f"{name}.{local}" for local, _ in template.named_parameters()}
    for local, _ in template.named_parameters():
        full = f"{name}.{local}"
        saved = source.adapter.replacement(full) if source.adapter else None
        tensor = saved if saved is not None else source.tensor(tied.get(full, full))
        weights[local] = tensor.float()
    block.load_state_dict(weights, strict=False, assign=True)
    if source.adapter is not None:
        block = source.adapter.apply(block, name, names)
    return block.eval()


def _first_tensor(name: str, output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise WalkUnsupported(f"block {name} returns {type(output).__name__}, not a tensor")


def _shell(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """An empty module tree with `module` at `path`."""
    if not path:
        return module
    shell = torch.nn.Module()
    parent = shell
    *parents, last = path.split(".")
    for part in parents:
        child = torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(last, module)
    return shell


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, torch.nn.ModuleList):
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def _tied_names(skeleton: Any) -> dict[str, str]:
    """Weight name -> the name it is saved under, for weights a checkpoint stores once (a head tied to
    the embeddings), by transformers' own record of the model's ties."""
    if not getattr(skeleton.config, "tie_word_embeddings", False):
        return {}
    ties = getattr(skeleton, "_tied_weights_keys", None)
    return dict(ties) if isinstance(ties, dict) else {}


def weightless_model(inputs: Any) -> Any:
    """The base's architecture with meta parameters and real buffers (rotary frequencies, embedding
    scales: computed at init, not saved), so its forward runs once the blocks are stand-ins."""
    from accelerate import init_empty_weights

    config = inputs.base_config()
    with init_empty_weights(include_buffers=False):
        return inputs.task.model_class().from_config(config, trust_remote_code=inputs.trust_remote_code)
