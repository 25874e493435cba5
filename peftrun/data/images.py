"""Images for classification: rows of (image path, class id), pixels made per batch by the model's
image processor.

Data is an image folder (one sub-folder per class) or a .jsonl/.json/.csv/.parquet file of image
paths (relative to the file) and labels. Images are decoded when a batch is built, not up front, so
memory stays flat whatever the data set's size. Augmentation (data.augment) is a random horizontal
flip and a random crop of 80-100% of each side, drawn from a generator seeded by the recipe's seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftrun.data.rows import Row, SampleReport, TaskData, class_counts, label_ids, read_split, resolve_labels
from peftrun.data.sources import image_path
from peftrun.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from peftrun.recipe.schema import DataConfig

MIN_CROP = 0.8  # smallest side of a random crop, as a share of the image's side


def prepare_images(cfg: DataConfig, processor: Any, seed: int, labelled: bool = True) -> TaskData:
    """Absolute image paths and class ids; the processor is used per batch (see ImageCollator)."""
    import datasets

    split = read_split(cfg, seed, labelled)
    names = resolve_labels(split, cfg) if labelled else list(cfg.labels or [])

    def build(rows: list[Row]) -> Any:
        labels = label_ids(rows, names) if labelled else [-1] * len(rows)
        paths = [str(image_path(r.source, r.fields["image"])) for r in rows]
        return datasets.Dataset.from_dict({"image": paths, "label": labels, "row": [r.number for r in rows]})

    train = build(split.train)
    held_out = build(split.eval) if split.eval is not None else None
    report = SampleReport(split.rows, len(train), len(held_out) if held_out is not None else 0)
    if labelled:
        report.classes = class_counts(train["label"], names)
    return TaskData(train, held_out, report, names)


def load_image(path: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: cannot read the image ({exc})") from None


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    from PIL import Image

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = image.size
    w, h = round(width * rng.uniform(MIN_CROP, 1.0)), round(height * rng.uniform(MIN_CROP, 1.0))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    return image.crop((left, top, left + w, top + h))


class ImageCollator:
    """Decode, optionally augment, and run the model's image processor over a batch of samples."""

    def __init__(self, processor: Any, augment: bool, seed: int) -> None:
        self.processor = processor
        self.rng = random.Random(seed) if augment else None

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        images = [load_image(s["image"]) for s in samples]
        if self.rng is not None:
            images = [augment(image, self.rng) for image in images]
        batch = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        if all(s["label"] >= 0 for s in samples):
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch
