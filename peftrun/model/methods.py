"""Training methods: which weights train.

One mechanism for all of them. `full` and `frozen` only set `requires_grad`; every other kind is a
peft adapter looked up by name in peft's own registry, with its options checked against that
adapter's config dataclass (names, types, and the dataclass's own `__post_init__` checks). A new
peft adapter therefore works in peftrun the day peft ships it, with no code here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peftrun.errors import OptionError, did_you_mean

NON_ADAPTER_KINDS = ("full", "frozen")
# Short spellings of peft option names (what design docs and most users write).
OPTION_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# Bounds peft only enforces when the adapter is built on a model (too late for a recipe check).
# Keyed by option name, then by adapter ('*': any adapter that has the option).
_POSITIVE = (1, float("inf"), "must be a positive integer")
OPTION_BOUNDS: dict[str, dict[str, tuple[float, float, str]]] = {
    "r": {kind: _POSITIVE for kind in ("lora", "loha", "lokr", "vera", "adalora")},  # OFT: r=0 + block size
    "num_virtual_tokens": {"*": _POSITIVE},
    "lora_dropout": {"*": (0.0, 0.999999, "must be in [0, 1)")},
}


@dataclass(frozen=True)
class AdapterSchedule:
    """For adapters that follow the training schedule (AdaLoRA reallocates ranks as it goes)."""

    total_steps_option: str  # filled with the run's optimizer steps (a placeholder during checks)
    after_optimizer_step: Callable[[Any, int], None]


ADAPTER_SCHEDULES = {
    "adalora": AdapterSchedule("total_step", lambda model, step: model.base_model.update_and_allocate(step)),
}
# Derived by peftrun from the task and the model; a recipe setting them would be overridden silently.
OWNED_OPTIONS = frozenset(
    {
        "task_type",
        "peft_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
    }
)


@functools.cache
def adapter_kinds() -> dict[str, type]:
    """peft's adapters by recipe name ('lora', 'ia3', 'prefix_tuning', ...) -> config class."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(t.value).lower(): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def is_prompt_learning(kind: str) -> bool:
    """Prefix/prompt/p-tuning: virtual tokens prepended to every sequence, not weights in layers."""
    from peft import PromptLearningConfig

    config_cls = adapter_kinds().get(kind)
    return config_cls is not None and issubclass(config_cls, PromptLearningConfig)


def method_kinds() -> list[str]:
    return [*NON_ADAPTER_KINDS, *adapter_kinds()]


@functools.cache
def _option_types(config_cls: type) -> dict[str, Any]:
    fields = {f.name: Any for f in dataclasses.fields(config_cls)}
    # A peft annotation we cannot resolve: names are still checked, types are not.
    with contextlib.suppress(Exception):
        fields.update(typing.get_type_hints(config_cls))
    return fields


def _pattern_literals(hint: Any) -> list[str]:
    """Literal values that peft writes as patterns, e.g. 'pissa_niter_[number of iters]'."""
    if typing.get_origin(hint) is typing.Literal:
        return [a for a in typing.get_args(hint) if isinstance(a, str) and "[" in a]
    return [p for arg in typing.get_args(hint) for p in _pattern_literals(arg)]


def _check_type(key: str, hint: Any, value: Any) -> Any:
    from pydantic import TypeAdapter, ValidationError

    try:
        adapter: TypeAdapter[Any] = TypeAdapter(hint)
    except Exception:  # an exotic annotation pydantic cannot build a validator for
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        # 'pissa_niter_[number of iters]' -> 'pissa_niter_' followed by a positive integer.
        patterns = [re.escape(p.split("[")[0]) + r"[1-9]\d*" for p in _pattern_literals(hint)]
        if isinstance(value, str) and any(re.fullmatch(p, value) for p in patterns):
            return value
        problem = exc.errors()[0]["msg"]
        raise OptionError(key, f"{problem} (got {value!r})") from None


def build_peft_config(kind: str, options: Mapping[str, Any], task_type: str | None) -> Any:
    """The peft config for `kind` with the recipe's options, or an OptionError naming the bad key."""
    config_cls = adapter_kinds()[kind]
    types = _option_types(config_cls)
    aliases = {alias: name for alias, name in OPTION_ALIASES.items() if name in types}
    known = sorted((set(types) - OWNED_OPTIONS) | set(aliases))
    values: dict[str, Any] = {}
    schedule = ADAPTER_SCHEDULES.get(kind)
    if schedule is not None:  # the real count is set by set_total_steps once the data is known
        values[schedule.total_steps_option] = 1_000_000
    for key, value in options.items():
        name = aliases.get(key, key)
        if name != key and name in options:
            raise OptionError(key, f"and {name} are the same option (`{key}` is short for it); give one")
        if name in OWNED_OPTIONS:
            raise OptionError(key, "is set by peftrun (from the task and model), not by the recipe")
        if name not in types:
            raise OptionError(
                key, f"unknown option of method '{kind}' ({config_cls.__name__}){did_you_mean(key, known)}"
            )
        values[name] = _check_type(key, types[name], value)
        bounds = OPTION_BOUNDS.get(name, {})
        low, high, rule = bounds.get(kind) or bounds.get("*") or (None, None, "")
        if low is not None and isinstance(values[name], (int, float)) and not low <= values[name] <= high:
            raise OptionError(key, f"{rule} (got {value!r})")
    try:
        return config_cls(**values, task_type=task_type)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{config_cls.__name__} rejects these options: {exc}") from None


def check_method_options(kind: str, options: Mapping[str, Any], has_freeze: bool) -> None:
    """Schema-time checks that need no model: the kind exists and its options are its own."""
    if kind in NON_ADAPTER_KINDS:
        for key in options:
            raise OptionError(
                key, f"not an option of method '{kind}'{did_you_mean(key, ['freeze', 'train'])}"
            )
        if kind == "frozen" and not has_freeze:
            raise OptionError(
                "freeze", "method 'frozen' needs at least one pattern to freeze (e.g. ['layers[:2]'])"
            )
        return
    if kind not in adapter_kinds():
        raise OptionError("kind", f"unknown method '{kind}'{did_you_mean(kind, method_kinds())}")
    if has_freeze:
        raise OptionError(
            "freeze", f"only for kind: frozen; '{kind}' trains only its own weights (see modules_to_save)"
        )
    build_peft_config(kind, options, task_type=None)


# --- freezing by name patterns and layer ranges ------------------------------------------------------

_LAYER_RANGE = re.compile(r"^(?P<path>[\w.]+)\[(?P<index>-?\d*)(?::(?P<stop>-?\d*))?\]$")


def select_parameters(names: Iterable[str], pattern: str) -> set[str]:
    """Parameter names matched by one pattern.

    'all'; a glob on the dotted name ('model.embed_tokens.*', '*.bias'); or a layer range on a numbered
    module list, written like a Python slice: 'layers[:4]' (first four blocks), 'layers[-2:]',
    'h[3]' (GPT-2), 'encoder.layer[0:6]' (BERT). Negative bounds count from the end of that list.
    """
    names = list(names)
    if pattern == "all":
        return set(names)
    match = _LAYER_RANGE.match(pattern)
    if match is None:
        return {n for n in names if fnmatch.fnmatchcase(n, pattern)}
    block = re.compile(r"(?:^|\.)" + re.escape(match["path"]) + r"\.(\d+)\.")
    layer_of = {n: int(m.group(1)) for n in names if (m := block.search(n))}
    if not layer_of:
        return set()
    count = max(layer_of.values()) + 1
    start, stop = match["index"], match["stop"]
    if stop is None:  # a single index, 'h[3]'
        chosen = {range(count)[int(start)]} if start and -count <= int(start) < count else set()
    else:
        chosen = set(range(count)[slice(int(start) if start else None, int(stop) if stop else None)])
    return {n for n, layer in layer_of.items() if layer in chosen}


def frozen_parameter_names(names: Iterable[str], freeze: list[str], train: list[str]) -> set[str]:
    """Names to freeze for method 'frozen'; a pattern that matches nothing is an error (a typo, usually)."""
    names = list(names)
    frozen: set[str] = set()
    for key, patterns in (("freeze", freeze), ("train", train)):
        for i, pattern in enumerate(patterns):
            matched = select_parameters(names, pattern)
            if not matched:
                example = names[0] if names else "(none)"
                raise OptionError(
                    f"{key}[{i}]", f"'{pattern}' matches no parameter (names look like '{example}')"
                )
            frozen = frozen | matched if key == "freeze" else frozen - matched
    return frozen


# --- applying a method to a loaded model ---------------------------------------------------------------


def apply_method(model: Any, method: Any, task_type: str | None, head_modules: Iterable[str] = ()) -> Any:
    """Make `model` train what the recipe's method says; returns the (possibly peft-wrapped) model.

    `head_modules` name a task's new head (a classifier): an adapter that can save whole modules
    trains and saves the ones this model has, beside its own weights.
    """
    if method.kind == "full":
        model.requires_grad_(True)
        return model
    if method.kind == "frozen":
        frozen = frozen_parameter_names([n for n, _ in model.named_parameters()], method.freeze, method.train)
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
        return model
    from peft import get_peft_model

    options = dict(method.options)
    heads = [h for h in head_modules if hasattr(model, h)]
    if heads and "modules_to_save" in _option_types(adapter_kinds()[method.kind]):
        options["modules_to_save"] = list(dict.fromkeys([*(options.get("modules_to_save") or []), *heads]))
    return get_peft_model(model, build_peft_config(method.kind, options, task_type))


def hold_frozen_norms_in_eval(model: Any) -> list[str]:
    """Keep batch-norm layers whose weights are all frozen in eval mode, whatever model.train() says.

    In train mode batch norm normalises with the batch's statistics and overwrites its running ones,
    so a frozen ResNet stage would still change (and its saved buffers would differ from the base an
    adapter is reloaded onto). Frozen, it normalises with the statistics it was pre-trained with, as
    torchvision's FrozenBatchNorm2d does. Returns the names of the layers held.
    """
    import types

    import torch

    held = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in params
        ):
            module.train = types.MethodType(  # type: ignore[method-assign]
                lambda self, mode=True: torch.nn.Module.train(self, False), module
            )
            module.eval()
            held.append(name)
    return held


def set_total_steps(model: Any, kind: str, total_steps: int) -> None:
    """Tell a schedule-following adapter how long the run is (known only after the data is batched)."""
    schedule = ADAPTER_SCHEDULES.get(kind)
    if schedule is not None:
        for config in model.peft_config.values():
            setattr(config, schedule.total_steps_option, total_steps)


def after_optimizer_step(model: Any, kind: str, step: int) -> None:
    schedule = ADAPTER_SCHEDULES.get(kind)
    if schedule is not None:
        schedule.after_optimizer_step(model, step)


# Adapters whose training may legitimately zero whole tensors (AdaLoRA prunes modules to rank 0).
MAY_ZERO_TENSORS = frozenset({"adalora"})

# LoRA inits that move the base weights (W -> W - BA at init): their adapter only reloads on the
# original base after peft converts it to a plain LoRA of rank 2r at save time.
BASE_MUTATING_INITS = ("pissa", "olora", "corda")


def mutates_base(method: Any) -> bool:
    init = method.options.get("init_lora_weights")
    return isinstance(init, str) and init.startswith(BASE_MUTATING_INITS)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves each process a slice
        if hasattr(param, "quant_state") or type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()  # two 4-bit values per byte of the storage dtype
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
