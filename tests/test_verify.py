"""Save verification catches real failures: missing, zeroed, altered and reshaped tensors; wrong bases."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft  # imported at collection: its one-time import cost is not any test's
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftrun.run.verify import (
    ADAPTER_WEIGHTS,
    VerificationError,
    check_adapter_config,
    check_adapter_in_memory,
    check_model_config,
    check_reload,
    check_tensors,
    logit_tolerance,
    read_saved_tensors,
    same_kernels_tolerance,
)

TARGETS = ["q_proj", "v_proj"]
EXPECTED_ADAPTER_TENSORS = 2 * len(TARGETS) * 2  # layers x modules x (lora_A, lora_B)


def base_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def lora_model(model_dir: Path) -> Any:
    torch.manual_seed(0)
    return peft.get_peft_model(
        base_model(model_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(8, vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def train_one_step(model: Any) -> None:
    data = batch(model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**data, labels=data["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@dataclass
class Saved:
    model: Any
    directory: Path

    @property
    def weights(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS

    def rewrite(self, change: Any) -> None:
        """Edit the saved adapter file in place: `change` gets the tensor dict and mutates it."""
        tensors = load_file(self.weights)
        change(tensors)
        save_file(tensors, self.weights, metadata={"format": "pt"})


@pytest.fixture
def trained(tiny_llama: Path, tmp_path: Path) -> Saved:
    model = lora_model(tiny_llama)
    train_one_step(model)
    model.save_pretrained(tmp_path / "adapter")
    return Saved(model, tmp_path / "adapter")


def lora_b_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n in tensors if ".lora_B." in n)


# --- check_tensors on adapters -----------------------------------------------------------------------------


def test_good_adapter_save_passes(trained: Saved) -> None:
    saved = read_saved_tensors(trained.directory)
    assert len(saved) == EXPECTED_ADAPTER_TENSORS
    assert all(bool(t.any()) for t in saved.values())  # the step moved every tensor (lora_B starts at 0)
    assert check_tensors(trained.directory, trained.model) == EXPECTED_ADAPTER_TENSORS


def test_missing_tensor_is_named(trained: Saved) -> None:
    victim = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    trained.rewrite(lambda t: t.pop(victim))
    with pytest.raises(
        VerificationError, match=re.escape(f"tensor '{victim}' is missing from the saved files")
    ):
        check_tensors(trained.directory, trained.model)


def test_untrained_adapter_is_all_zeros(tiny_llama: Path, tmp_path: Path) -> None:
    """An adapter saved before any step: LoRA B is still its zero init."""
    model = lora_model(tiny_llama)
    model.save_pretrained(tmp_path / "untrained")
    with pytest.raises(VerificationError, match=r"trained tensor '.*\.lora_B\.weight' is all zeros"):
        check_tensors(tmp_path / "untrained", model)


def test_one_zeroed_lora_b_is_caught(trained: Saved, tmp_path: Path) -> None:
    victim = lora_b_names(read_saved_tensors(trained.directory))[-1]
    module = trained.model.get_submodule(victim.removesuffix(".weight").replace(".lora_B", ".lora_B.default"))
    with torch.no_grad():
        module.weight.zero_()
    trained.model.save_pretrained(tmp_path / "zeroed")
    with pytest.raises(VerificationError, match=re.escape(f"trained tensor '{victim}' is all zeros")):
        check_tensors(tmp_path / "zeroed", trained.model)
    # Adapters that may prune (AdaLoRA) only need the trained tensors as a whole to be non-zero.
    assert check_tensors(tmp_path / "zeroed", trained.model, each_nonzero=False) == EXPECTED_ADAPTER_TENSORS


def test_every_tensor_zero_is_caught_even_for_pruning_adapters(trained: Saved, tmp_path: Path) -> None:
    with torch.no_grad():
        for name, param in trained.model.named_parameters():
            if "lora_" in name:
                param.zero_()
    trained.model.save_pretrained(tmp_path / "zeros")
    with pytest.raises(VerificationError, match="every trained tensor is all zeros"):
        check_tensors(tmp_path / "zeros", trained.model, each_nonzero=False)


def test_a_different_value_is_caught(trained: Saved) -> None:
    victim = lora_b_names(read_saved_tensors(trained.directory))[0]

    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        tensors[victim] = tensors[victim].clone()
        tensors[victim][0, 0] += 1e-3

    trained.rewrite(nudge)
    with pytest.raises(
        VerificationError, match=re.escape(f"tensor '{victim}' differs from the trained values")
    ):
        check_tensors(trained.directory, trained.model)
    # Without value comparison (e.g. a model trained in another precision) it is accepted.
    assert check_tensors(trained.directory, trained.model, compare_values=False) == EXPECTED_ADAPTER_TENSORS


def test_a_shape_change_is_caught(trained: Saved) -> None:
    victim = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def truncate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[victim] = tensors[victim][:2].contiguous()  # rank 4 -> 2

    trained.rewrite(truncate)
    with pytest.raises(
        VerificationError, match=rf"tensor '{victim}' saved with shape \(2, 64\), trained shape \(4, 64\)"
    ):
        check_tensors(trained.directory, trained.model)


def test_a_dtype_downcast_that_changes_values_is_caught(trained: Saved) -> None:
    victim = lora_b_names(read_saved_tensors(trained.directory))[0]

    def to_bf16(tensors: dict[str, torch.Tensor]) -> None:
        tensors[victim] = tensors[victim].to(torch.bfloat16)

    trained.rewrite(to_bf16)
    with pytest.raises(VerificationError, match="differs from the trained values"):
        check_tensors(trained.directory, trained.model)


# --- full (non-peft) checkpoints ------------------------------------------------------------------------


def test_sharded_full_save_is_read_and_checked(tiny_llama: Path, tmp_path: Path) -> None:
    model = base_model(tiny_llama)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    out = tmp_path / "full"
    model.save_pretrained(out, max_shard_size=f"{int(size * 0.6) // 1000}KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and not (out / "model.safetensors").exists()

    saved = read_saved_tensors(out)
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[n], state[n]) for n in state)
    assert check_tensors(out, model) == len(state)

    (out / shards[1]).unlink()
    with pytest.raises(VerificationError, match=re.escape(f"missing weights file {shards[1]}")):
        read_saved_tensors(out)
    with pytest.raises(VerificationError, match=re.escape(f"missing weights file {shards[1]}")):
        check_tensors(out, model)


def test_single_file_full_save_with_a_changed_weight(tiny_llama: Path, tmp_path: Path) -> None:
    model = base_model(tiny_llama)
    out = tmp_path / "full"
    model.save_pretrained(out)
    assert check_tensors(out, model) == len(model.state_dict())
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # trained after the save
    with pytest.raises(VerificationError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' differs"):
        check_tensors(out, model)


def test_tied_embeddings_are_saved_once_and_accepted(tiny_gpt2: Path, tmp_path: Path) -> None:
    model = base_model(tiny_gpt2)
    assert model.lm_head.weight is model.transformer.wte.weight
    train_one_step(model)  # a fresh GPT-2's biases are zeros; training moves them
    model.save_pretrained(tmp_path / "gpt2")
    saved = read_saved_tensors(tmp_path / "gpt2")
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved
    assert check_tensors(tmp_path / "gpt2", model) == len(model.state_dict())


def test_no_weights_file_at_all(tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match=re.escape("missing weights file model.safetensors")):
        read_saved_tensors(tmp_path)


# --- check_reload ------------------------------------------------------------------------------------------


def test_reload_on_the_right_base_matches(trained: Saved, tiny_llama: Path) -> None:
    reloaded = peft.PeftModel.from_pretrained(base_model(tiny_llama), trained.directory)
    data = batch(trained.model.config.vocab_size)
    tolerance = logit_tolerance(torch.float32, quantized=False)
    assert check_reload(reloaded, trained.model, data, tolerance) <= tolerance
    assert trained.model.training  # the check leaves the mode as it found it


def test_reload_without_the_adapter_differs(trained: Saved, tiny_llama: Path) -> None:
    data = batch(trained.model.config.vocab_size)
    with pytest.raises(VerificationError, match="reloaded model's logits differ from the trained model's"):
        check_reload(base_model(tiny_llama), trained.model, data, 1e-4)


def test_reload_on_a_different_base_fails(trained: Saved, tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from peftrun.demo.tiny import build_llama

    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_llama)
    other = build_llama(tmp_path / "other", tokenizer, hidden_size=64, num_layers=2, seed=1)
    reloaded = peft.PeftModel.from_pretrained(base_model(other), trained.directory)  # same shapes: loads fine
    data = batch(trained.model.config.vocab_size)
    with pytest.raises(VerificationError, match=r"logits differ .* by \d\.\d+e[+-]\d+ \(> 1e-04\)"):
        check_reload(reloaded, trained.model, data, 1e-4)


def test_reload_with_a_different_vocabulary_is_a_shape_error(trained: Saved) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=trained.model.config.vocab_size + 5, n_embd=32, n_layer=1, n_head=2, n_positions=64
        )
    )
    data = batch(trained.model.config.vocab_size)
    with pytest.raises(VerificationError, match="reloaded model gives logits of shape"):
        check_reload(other, trained.model, data, 1e-4)


# --- the save check without a second base ------------------------------------------------------------------


def test_saved_adapter_in_a_second_slot_gives_the_trained_logits(trained: Saved) -> None:
    data = batch(trained.model.config.vocab_size)
    diff, tolerance = check_adapter_in_memory(trained.directory, trained.model, data)
    assert diff == 0.0 and tolerance == 2 * torch.finfo(torch.float32).eps
    # The slot is gone, the trained adapter active and trainable again, the mode as it was.
    assert set(trained.model.peft_config) == {"default"} and trained.model.active_adapter == "default"
    assert all(p.requires_grad for n, p in trained.model.named_parameters() if "lora_" in n)
    assert trained.model.training


def test_one_changed_saved_tensor_moves_the_second_slot_logits(trained: Saved) -> None:
    victim = lora_b_names(read_saved_tensors(trained.directory))[-1]
    trained.rewrite(lambda tensors: tensors[victim].mul_(1.01))
    data = batch(trained.model.config.vocab_size)
    with pytest.raises(VerificationError, match="reloaded model's logits differ"):
        check_adapter_in_memory(trained.directory, trained.model, data)
    assert set(trained.model.peft_config) == {"default"}


def test_a_changed_adapter_config_is_caught(trained: Saved) -> None:
    check_adapter_config(trained.directory, trained.model)
    path = trained.directory / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    with pytest.raises(VerificationError, match="'lora_alpha' is 16, the trained adapter's is 8"):
        check_adapter_config(trained.directory, trained.model)


def test_the_tolerance_is_the_logits_dtype_resolution() -> None:
    assert same_kernels_tolerance(torch.bfloat16) == 2 * 2.0**-7
    assert same_kernels_tolerance(torch.float32) == 2 * 2.0**-23


def test_a_full_save_with_a_changed_config_is_caught(tiny_llama: Path, tmp_path: Path) -> None:
    model = base_model(tiny_llama)
    model.save_pretrained(tmp_path / "full")
    check_model_config(tmp_path / "full", model)
    path = tmp_path / "full" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rms_norm_eps": 0.5}))
    with pytest.raises(VerificationError, match=re.escape("'rms_norm_eps' is 0.5")):
        check_model_config(tmp_path / "full", model)
