"""Load the tokenizer and base model a recipe names, and make it trainable the way its method says."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from peftrun.cpu.attention import register as register_packed_sdpa
from peftrun.errors import OptionError, UserError
from peftrun.model.hub import require_local_or_reachable
from peftrun.model.methods import (
    NON_ADAPTER_KINDS,
    apply_method,
    count_parameters,
    hold_frozen_norms_in_eval,
)
from peftrun.model.tasks import CLASSIFIER_HEADS, TASKS
from peftrun.model.zero3_load import load_streamed
from peftrun.recipe.schema import ModelConfig, QuantizationConfig, Recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_model_config(cfg: ModelConfig) -> Any:
    """The base model's config.json: cheap, and enough to check a recipe against the architecture."""
    from transformers import AutoConfig

    def read(local_only: bool) -> Any:
        return AutoConfig.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=local_only,
        )

    try:
        return read(local_only=True)
    except (OSError, ValueError):
        pass
    require_local_or_reachable(cfg.name_or_path, "model.name_or_path", is_cached=False)
    try:
        return read(local_only=False)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: cannot read a model config from '{cfg.name_or_path}': {_first_line(exc)}"
        ) from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    return _load_preprocessor(cfg, "AutoTokenizer", "a tokenizer")


def _load_preprocessor(cfg: ModelConfig, auto_class: str, what: str) -> Any:
    """The tokenizer or image processor of `model.tokenizer` (default: the model's own)."""
    import transformers

    source = cfg.tokenizer or cfg.name_or_path
    try:
        return getattr(transformers, auto_class).from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise UserError(f"{key}: cannot load {what} from '{source}': {_first_line(exc)}") from None


def bitsandbytes_config(quant: QuantizationConfig, model_dtype: str, keep: tuple[str, ...] = ()) -> Any:
    """transformers' quantization settings; modules named in `keep` stay unquantized.

    A classifier's head is new (not in the checkpoint), so bitsandbytes would wrap it without ever
    quantizing it and fail at its first forward; it is trained in full precision anyway.
    """
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(keep)} if keep else {}
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[quant.storage_dtype or model_dtype],
    )


def load_image_processor(cfg: ModelConfig) -> Any:
    return _load_preprocessor(cfg, "AutoImageProcessor", "an image processor")


def load_processor(cfg: ModelConfig, task_name: str) -> Any:
    """What turns the task's raw inputs into model inputs: a tokenizer, or an image processor."""
    if TASKS[task_name].processor == "image_processor":
        return load_image_processor(cfg)
    return load_tokenizer(cfg)


def label_kwargs(labels: list[str] | None) -> dict[str, Any]:
    """A classifier's head size and names, saved in its config.json (id2label/label2id)."""
    if labels is None:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


RANDOM_INIT_SEED = 0  # what weights a checkpoint lacks are initialised from (see load_model)


def load_model(
    cfg: ModelConfig, task_name: str, device_map: Any = None, labels: list[str] | None = None
) -> Any:
    """The base model from disk (or the Hub), in the recipe's dtype and quantization.

    A classifier gets a head for `labels`; a checkpoint's head of another size (an ImageNet ResNet's
    1000 classes) is replaced by a new one instead of failing.
    """
    task = TASKS[task_name]
    # Weights the checkpoint lacks (a new head, a pooler) are drawn from a fixed seed, so every load of
    # the base (training, the reload check, a user's reload) starts from the same ones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _load_weights(cfg, task.model_class(), device_map, labels)
    model.config.use_cache = False  # the KV cache only costs memory during training
    if cfg.quantization is not None:
        keep_4bit_compute_dtype(model)
    return model


def keep_4bit_compute_dtype(model: Any) -> None:
    """4-bit layers compute in the recipe's compute_dtype in eval too.

    On CPUs with AVX512-BF16, bitsandbytes' Linear4bit in eval mode (inputs without grad) repacks its
    weights in place and runs a fused kernel that casts the input to bf16, whatever compute_dtype says.
    Evaluation, the reload check and the merge verdict would then measure another model than the one
    trained: QLoRA logits moved by ~1e-3 relative between eval and training mode here, instead of ~1e-6.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _load_weights(cfg: ModelConfig, model_class: Any, device_map: Any, labels: list[str] | None) -> Any:
    if cfg.random_init:
        config = load_model_config(cfg)
        for key, value in label_kwargs(labels).items():
            setattr(config, key, value)
        return model_class.from_config(
            config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        **label_kwargs(labels),
    }
    if labels is not None:
        kwargs["ignore_mismatched_sizes"] = True
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization is not None:
        heads = CLASSIFIER_HEADS if labels is not None else ()
        kwargs["quantization_config"] = bitsandbytes_config(cfg.quantization, cfg.dtype, keep=heads)
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():  # ZeRO-3 places (and splits) the weights itself
            kwargs["device_map"] = device_map if device_map is not None else _default_device()
    with _zero3_builds_in(DTYPES[cfg.dtype]):
        if _streams_under_zero3(cfg, labels):
            build = {
                k: kwargs[k] for k in ("dtype", "trust_remote_code", "attn_implementation") if k in kwargs
            }
            model = load_streamed(model_class, load_model_config(cfg), Path(cfg.name_or_path), **build)
            if model is not None:
                return model
        return model_class.from_pretrained(cfg.name_or_path, **kwargs)


def _streams_under_zero3(cfg: ModelConfig, labels: list[str] | None) -> bool:
    """Under ZeRO-3, a plain base is read one tensor at a time (model/zero3_load.py), not gathered
    whole on rank 0 first as transformers does."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and cfg.quantization is None and labels is None


@contextlib.contextmanager
def _zero3_builds_in(dtype: torch.dtype) -> Iterator[None]:
    """Under ZeRO-3, transformers builds the model inside DeepSpeed's zero.Init, which casts every
    weight to the DeepSpeed config's precision: fp32 when it enables neither bf16 nor fp16
    (`train.mixed_precision: no`). A bf16 base was then held and trained in fp32: twice its memory
    per process, and another computation than the same recipe on one process. Its section for the
    model's dtype is enabled while the model is built, so the weights stay in `model.dtype`; the
    engine's own precision settings are untouched (adapters stay fp32, as on one process)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if key is None or not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations.deepspeed import deepspeed_config

    config = deepspeed_config()
    if any(str(config.get(k, {}).get("enabled", False)).lower() == "true" for k in ("bf16", "fp16")):
        yield  # the config sets a precision already: zero.Init builds in it
        return
    before = config.get(key)
    config[key] = {"enabled": True}
    try:
        yield
    finally:
        if before is None:
            config.pop(key)
        else:
            config[key] = before


def load_base(recipe: Recipe, device_map: Any = None) -> Any:
    """The recipe's base model, with the class names its data resolved to (classifiers).

    Its attention kernel is the one accel_select.choose_attention picks for the device (packing: a
    variable-length kernel on CUDA, per-sample sdpa on CPU); Liger's kernels go in where asked.
    """
    model = load_model(recipe.model, recipe.task, device_map, labels=recipe.data.labels)
    from peftrun.model.accel_select import apply_liger, choose_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = choose_attention(recipe, device).name
    if attention == "peftrun_packed_sdpa":
        attention = register_packed_sdpa()
    if attention is not None and attention != recipe.model.attn_implementation:
        model.set_attn_implementation(attention)
    if recipe.train.liger:
        apply_liger(model)
    return model


def _default_device() -> Any:
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


def make_trainable(model: Any, recipe: Recipe) -> Any:
    """Gradient checkpointing, k-bit preparation, then the method (peft adapter, full or frozen)."""
    if recipe.model.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.method.kind not in NON_ADAPTER_KINDS:
            # Frozen embeddings give checkpointed blocks inputs without grad; adapters inside still need it.
            model.enable_input_require_grads()
    task = TASKS[recipe.task]
    model = apply_method(model, recipe.method, task.peft_task_type, task.head_modules)
    hold_frozen_norms_in_eval(model)
    if recipe.train.compile:
        from peftrun.model.accel_select import compile_layers

        compile_layers(model)
    return model


# --- pre-flight: the method against the architecture, with no weights loaded --------------------------


def _module_matches(names: list[str], key: str) -> bool:
    """peft's rule for one entry of a target_modules list: the full name or its last dotted parts."""
    return any(n == key or n.endswith("." + key) for n in names)


def check_method_against_architecture(recipe: Recipe, model_config: Any) -> tuple[int, int]:
    """Build the model on the meta device (no memory, no weights) and apply the method to it.

    Catches target modules that match nothing, freeze patterns that match nothing and options peft
    rejects for this architecture, in well under a second even for a 70B config.
    Returns (trainable, total) parameter counts.
    """
    model = meta_model(recipe, model_config)
    return count_parameters(apply_method_checked(model, recipe))


def meta_model(recipe: Recipe, model_config: Any, dtype: torch.dtype | None = None) -> Any:
    """The recipe's base model on the meta device: its structure and shapes, no memory, no weights."""
    with torch.device("meta"):
        return (
            TASKS[recipe.task]
            .model_class()
            .from_config(model_config, trust_remote_code=recipe.model.trust_remote_code, dtype=dtype)
        )


def apply_method_checked(model: Any, recipe: Recipe) -> Any:
    """apply_method on a meta model, with each mismatch against the architecture said in one line."""
    module_names = [n for n, _ in model.named_modules() if n]
    for key in ("target_modules", "modules_to_save", "feedforward_modules", "exclude_modules"):
        value = recipe.method.options.get(key)
        if isinstance(value, list):
            for i, entry in enumerate(value):
                if not _module_matches(module_names, entry):
                    raise UserError(
                        f"method.{key}[{i}]: '{entry}' matches no module of {type(model).__name__} "
                        f"(linear layers here: {', '.join(_linear_leaf_names(model)) or 'none'})"
                    )
        elif (
            isinstance(value, str)
            and value != "all-linear"
            and not any(re.fullmatch(value, n) for n in module_names)
        ):
            raise UserError(f"method.{key}: regex '{value}' matches no module name of {type(model).__name__}")
    # Weight-dependent inits (PiSSA's SVD, OLoRA's QR, ...) need real weights; structure is what is checked.
    method = recipe.method
    if "init_lora_weights" in method.options:
        method = method.model_copy(update={"init_lora_weights": True})
    task = TASKS[recipe.task]
    try:
        with torch.device("meta"):  # adapters too: a 70B model's LoRA weights would take seconds and GBs
            model = apply_method(model, method, task.peft_task_type, task.head_modules)
    except OptionError as exc:
        raise UserError(f"method.{exc.key}: {exc.message}") from None
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise UserError(
            f"method: peft cannot apply '{recipe.method.kind}' to {type(model).__name__}: {_first_line(exc)}"
        ) from None
    return model


def _linear_leaf_names(model: Any) -> list[str]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, which peft targets too

    linear = (torch.nn.Linear, Conv1D)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear)})
