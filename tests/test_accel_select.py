"""What attention, Liger and compilation a run gets, for which device and recipe (CPU-tested logic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftrun.errors import UserError
from peftrun.model.accel_select import (
    attention_names,
    check_liger,
    check_packing_architecture,
    choose_attention,
    compile_layers,
)
from peftrun.recipe.load import load_recipe


def recipe(write_recipe: Any, packing: bool, attn: str | None = None, **train: Any) -> Any:
    model = {"attn_implementation": attn} if attn else {}
    return load_recipe(write_recipe(model=model, data={"packing": packing}, train=train), [])


# (packing, device, model.attn_implementation, installed packages) -> chosen implementation
CASES = [
    (False, "cuda", None, {"flash_attn"}, None),  # unpacked: transformers' default (sdpa)
    (False, "cpu", "eager", set(), "eager"),
    (True, "cuda", None, {"flash_attn"}, "flash_attention_2"),  # varlen kernel from position_ids
    (True, "cuda", None, {"flash_attn_interface"}, "flash_attention_3"),
    (True, "cuda", None, set(), "sdpa"),  # no flash-attn: transformers' block-diagonal mask
    (True, "cuda", "flex_attention", {"flash_attn"}, "flex_attention"),  # the recipe's choice stands
    (True, "cuda", "sdpa", {"flash_attn"}, "sdpa"),
    (True, "cpu", None, {"flash_attn"}, "peftrun_packed_sdpa"),  # the per-sample loop: CPU only
    (True, "cpu", "sdpa", set(), "peftrun_packed_sdpa"),
    (True, "cpu", "eager", set(), "eager"),
]


@pytest.mark.parametrize(("packing", "device", "attn", "installed", "expected"), CASES)
def test_attention_choice(
    write_recipe: Any, packing: bool, device: str, attn: str | None, installed: set[str], expected: str | None
) -> None:
    r = recipe(write_recipe, packing, attn)
    assert choose_attention(r, device, installed=installed.__contains__).name == expected


def test_every_registered_attention_name_is_accepted_and_typos_are_not(write_recipe: Any) -> None:
    for name in attention_names():
        assert recipe(write_recipe, False, name).model.attn_implementation == name
    assert recipe(write_recipe, False, "kernels-community/flash-attn").model.attn_implementation
    with pytest.raises(UserError, match="did you mean 'flash_attention_2'"):
        recipe(write_recipe, False, "flash_atention_2")


def test_packing_refused_where_layers_do_not_see_positions() -> None:
    from transformers import LlamaConfig, MambaConfig, Qwen3NextConfig

    check_packing_architecture(LlamaConfig())  # attention everywhere: packing is exact
    with pytest.raises(UserError, match=r"data\.packing: its linear_attention layers"):
        check_packing_architecture(Qwen3NextConfig(num_hidden_layers=4))
    with pytest.raises(UserError, match=r"data\.packing: .* do not see sample boundaries"):
        check_packing_architecture(MambaConfig())


def test_validate_refuses_packing_a_hybrid_model(write_recipe: Any, tmp_path: Path) -> None:
    from transformers import Qwen3NextConfig

    from tests.test_cli import peftrun

    model_dir = tmp_path / "qwen3next"
    Qwen3NextConfig(
        num_hidden_layers=4, hidden_size=64, intermediate_size=128, vocab_size=512
    ).save_pretrained(model_dir)
    path = write_recipe(model={"name_or_path": str(model_dir)}, data={"packing": True})
    result = peftrun("validate", str(path))
    assert result.returncode == 2 and "data.packing: its linear_attention layers" in result.stderr


def test_liger_needs_cuda_and_the_package(write_recipe: Any) -> None:
    r = recipe(write_recipe, True, liger=True)
    with pytest.raises(UserError, match=r"train\.liger: .*CUDA"):
        check_liger(r, cuda=False)
    with pytest.raises(UserError, match="pip install liger-kernel"):
        check_liger(r, cuda=True, installed=lambda package: False)
    check_liger(r, cuda=True, installed=lambda package: package == "liger_kernel")
    check_liger(recipe(write_recipe, True), cuda=False)  # off: nothing asked


def test_packed_training_on_cpu_loads_the_per_sample_attention(write_recipe: Any) -> None:
    from peftrun.model.load import load_base

    model = load_base(recipe(write_recipe, True))
    assert model.config._attn_implementation == "peftrun_packed_sdpa"
    assert load_base(recipe(write_recipe, False)).config._attn_implementation != "peftrun_packed_sdpa"


def test_compile_keeps_the_model_s_values_on_cpu(write_recipe: Any) -> None:
    import torch

    from peftrun.model.load import load_base, make_trainable

    r = recipe(write_recipe, False, compile=True)
    torch.manual_seed(0)
    eager = make_trainable(load_base(recipe(write_recipe, False)), r.model_copy(
        update={"train": r.train.model_copy(update={"compile": False})}))  # fmt: skip
    torch.manual_seed(0)
    compiled = make_trainable(load_base(r), r)
    ids = torch.randint(0, 100, (2, 16))
    eager.eval(), compiled.eval()
    with torch.no_grad():
        expected = eager(input_ids=ids).logits
        got = compiled(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4)
    assert compile_layers(torch.nn.Linear(2, 2)) == 0  # nothing that looks like a decoder stack
    layers = compiled.get_base_model().model.layers
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
