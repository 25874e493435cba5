"""Packing: the bin packer, and packed rows that the model sees exactly as separate samples."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from peftrun.data.packing import best_fit_decreasing, collate_packed, pack_dataset
from peftrun.data.tokenize import IGNORE_INDEX


def test_best_fit_decreasing_places_every_sample_once_within_capacity() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # Near the lower bound: at most 2% more rows than a perfect packer could need.
    assert len(bins) <= 1.02 * (sum(lengths) / 512) + 1


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits() -> None:
    # 6 goes first; 5 does not fit beside it; 4 fits beside 6 (fullest with room) -> [6,4], [5,3,2].
    bins = best_fit_decreasing([6, 5, 4, 3, 2], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="longer than the packing capacity 10"):
        best_fit_decreasing([11], 10)


def samples_dataset(lengths: list[int], seed: int = 0) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]
    # Prompt (first third) masked, answer supervised, as the chat/alpaca templates produce.
    labels = [[IGNORE_INDEX] * (n // 3) + row[n // 3 :] for row, n in zip(ids, lengths, strict=True)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def test_packed_rows_hold_the_samples_with_restarting_positions() -> None:
    samples = samples_dataset([7, 12, 5, 20, 9])
    packed = list(pack_dataset(samples, capacity=25))
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(r) for r in samples["input_ids"])
    assert all(len(r["input_ids"]) <= 25 for r in packed)
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0 and all(row["labels"][s] == IGNORE_INDEX for s in starts)
    supervised = sum(sum(t != IGNORE_INDEX for t in r[1:]) for r in samples["labels"])
    assert sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in packed) == supervised

    batch = collate_packed(packed, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}  # no attention_mask
    assert batch["num_tokens"].tolist() == [len(r["input_ids"]) for r in packed]
    pad = batch["input_ids"].shape[1] - len(packed[1]["input_ids"])
    if pad:
        assert batch["position_ids"][1, -pad:].tolist() == list(range(pad))
        assert (batch["labels"][1, -pad:] == IGNORE_INDEX).all()


def batch_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    # use_cache=False as in training (peftrun turns the cache off): transformers looks for packed
    # sequences only when no KV cache is passed or created.
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


@pytest.mark.parametrize(
    ("family", "attn"),
    [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "sdpa"), ("llama", "packed"), ("gpt2", "packed")],
)
def test_a_packed_row_gives_each_sample_its_own_logits(
    tiny_llama: Path, tiny_gpt2: Path, family: str, attn: str
) -> None:
    """What no cross-sample attention means: every token's logits in the packed row equal those of
    its sample run alone, on the attention path actually used (rotary and learned positions alike)."""
    from transformers import AutoModelForCausalLM

    from peftrun.cpu.attention import register

    path = tiny_llama if family == "llama" else tiny_gpt2
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="sdpa" if attn == "packed" else attn
    )
    if attn == "packed":  # peftrun's per-sample attention (attention.py), what packed training uses
        model.set_attn_implementation(register())
    model.eval()
    samples = samples_dataset([9, 14, 6, 11])
    rows = list(pack_dataset(samples, capacity=24))
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        packed_logits = model(**batch_inputs(batch)).logits
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in samples["input_ids"]]
    by_content = {tuple(ids): logits for ids, logits in zip(samples["input_ids"], alone, strict=True)}
    checked = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in itertools.pairwise(starts):
            expected = by_content[tuple(row["input_ids"][start:end])]
            torch.testing.assert_close(packed_logits[r, start:end], expected, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == len(samples) and len(rows) < len(samples)


def test_no_attention_weight_crosses_a_sample_boundary(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    rows = list(pack_dataset(samples_dataset([5, 7, 4]), capacity=16))
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        attentions = model(**batch_inputs(batch), output_attentions=True).attentions
    sample_of = (torch.diff(batch["position_ids"], prepend=batch["position_ids"][:, :1] - 1) != 1).cumsum(-1)
    same_sample = sample_of[:, :, None] == sample_of[:, None, :]  # [batch, query, key]
    for layer in attentions:  # [batch, heads, query, key]
        assert (layer.masked_select(~same_sample[:, None]) == 0).all()
        assert (layer.masked_select(same_sample[:, None]) > 0).any()


def test_packed_losses_and_gradients_equal_unpacked(tiny_llama: Path) -> None:
    """Through the task's own loss: the per-row loss sums of a packed batch add up to the per-sample
    sums of its samples, and the LoRA gradients of the total loss are the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftrun.data import collate
    from peftrun.model.tasks import TASKS

    task = TASKS["causal_lm"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.config.use_cache = False
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)
    samples = samples_dataset([9, 14, 6, 11, 17])
    packed_rows = list(pack_dataset(samples, capacity=30))
    assert len(packed_rows) < len(samples)

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        per_row = task.loss_per_sample(model, batch)
        per_row.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
        return per_row.detach(), grads

    unpacked_loss, unpacked_grads = loss_and_grads(collate(list(samples), pad_id=0))
    packed_loss, packed_grads = loss_and_grads(collate_packed(packed_rows, pad_id=0))
    targets = task.targets_per_sample(collate(list(samples), pad_id=0)).sum()
    assert task.targets_per_sample(collate_packed(packed_rows, pad_id=0)).sum() == targets
    torch.testing.assert_close(packed_loss.sum(), unpacked_loss.sum(), rtol=1e-6, atol=0)
    assert len(packed_grads) == len(unpacked_grads) > 0
    for got, expected in zip(packed_grads, unpacked_grads, strict=True):
        # Float summation order only: sums in another order differ by a few ulp of their largest terms,
        # so the absolute tolerance scales with the tensor (a fixed 1e-6 failed by 4e-6 on an entry that
        # cancels to ~1e-2, depending on the order the tests ran in).
        atol = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=atol)
