"""Tiny encoders and vision models for the tests of the tasks the demo does not use (built locally)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

# ---- encoders and vision models for the other tasks ----------------------------------------------------

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_wordpiece_tokenizer(
    out_dir: str | Path, corpus: Iterable[str], vocab_size: int = 300
) -> PreTrainedTokenizerFast:
    """Train a lower-casing WordPiece tokenizer (BERT's scheme) on `corpus`, save it and return it.

    Calling it adds `[CLS] ... [SEP]`, as a BERT tokenizer does; `[PAD]` is id 0.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_bert(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A seeded, random BERT with its pre-training heads (masked LM, next sentence) and pooler, saved with
    `tokenizer`: loads as a masked LM or (new head) as a sequence classifier, like bert-base-uncased."""
    import torch
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout (as in the tiny Llama): runs with different process counts compare exactly.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    out = Path(out_dir)
    BertForPreTraining(config).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def _save_image_processor(out: Path, image_size: int) -> None:
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    # The PIL processor: it needs no torchvision. AutoImageProcessor reads back the saved type.
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    AutoImageProcessor.from_pretrained(str(out))  # fail here, not in a test, if it does not load


def build_resnet(out_dir: str | Path, num_labels: int = 5, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-stage ResNet image classifier (with batch norm) and its image processor; its head has
    `num_labels` classes, as an ImageNet checkpoint has its own 1000."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    config.num_labels = num_labels
    torch.manual_seed(seed)
    out = Path(out_dir)
    ResNetForImageClassification(config).save_pretrained(str(out), safe_serialization=True)
    _save_image_processor(out, image_size)
    return out


def build_vit(out_dir: str | Path, num_labels: int = 5, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-block ViT image classifier (8x8 patches) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    config.num_labels = num_labels
    torch.manual_seed(seed)
    out = Path(out_dir)
    ViTForImageClassification(config).save_pretrained(str(out), safe_serialization=True)
    _save_image_processor(out, image_size)
    return out


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_colour_images(folder: str | Path, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """An image folder (one sub-folder per class) of noisy solid-colour squares: a task a tiny model
    learns in a few steps. Returns the folder."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    root = Path(folder)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = [
                tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour) for _ in range(size * size)
            ]
            image = Image.new("RGB", (size, size))
            image.putdata(pixels)
            image.save(root / name / f"{name}_{i}.png")
    return root
