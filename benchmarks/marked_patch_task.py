"""A tiny ViT trained in seconds on a synthetic task where a few patches decide the class and the
rest do not: the model on which merge methods measurably differ (random weights cannot tell them
apart). Writes a `save_pretrained` checkpoint with its image processor, and calibration and
held-out image folders (one folder per class):

    python benchmarks/marked_patch_task.py OUT [--seed 0]
    turbo eval --model OUT/model --data OUT/heldout --sweep method=tome,turbo,pitome alpha=0.1,1,5 r=4,8,12

Images are 32×32 (an 8×8 grid of 4×4 patches). The background is a few large flat regions of dull
colours with mild noise (many near-duplicate patches); two marker patches of saturated colours sit
at random grid cells, and the class is the pair of marker colours (green or red for the first, blue or
yellow for the second: 4 classes). Half the images also carry decoy patches of a third colour that
says nothing about the class.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

GRID, PATCH = 8, 4
SIZE = GRID * PATCH
MARKERS = ((30, 200, 40), (230, 30, 30))  # first marker: green or red
SECOND = ((40, 60, 230), (230, 210, 30))  # second marker: blue or yellow
DECOY = (200, 40, 200)
CLASSES = ("green-blue", "green-yellow", "red-blue", "red-yellow")  # sorted, as class folders are read
TRAIN_THREADS = 2


def make_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 32, 32, 3) uint8 images and their labels (0..3)."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, SIZE, SIZE, 3), np.float32)
    labels = rng.integers(0, len(CLASSES), count)
    for image, label in zip(images, labels):
        tones = rng.uniform(60, 160, (3, 3))  # three dull regions split at random rows and columns
        row, col = rng.integers(2, GRID - 1, 2) * PATCH
        image[:] = tones[0]
        image[row:] = tones[1]
        image[:, col:] = tones[2]
        image += rng.normal(0, 6, image.shape)
        cells = rng.choice(GRID * GRID, 5, replace=False)
        colours = [MARKERS[label // 2], SECOND[label % 2]] + ([DECOY] * 3 if rng.random() < 0.5 else [])
        for cell, colour in zip(cells, colours):
            y, x = divmod(int(cell), GRID)
            image[y * PATCH:(y + 1) * PATCH, x * PATCH:(x + 1) * PATCH] = colour + rng.normal(0, 10, 3)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def train(seed: int = 0, steps: int = 250, batch: int = 64) -> ViTForImageClassification:
    """A 4-layer, 48-wide ViT trained with AdamW on freshly drawn images (about 15 s on 2 cores).
    Always on 2 threads: the thread count changes the float sums, and so which model comes out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train(seed, steps, batch)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, steps: int, batch: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=48, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=96, num_labels=len(CLASSES),
                       id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    images, labels = make_images(steps * batch // 4, seed + 1000)  # each image seen about 4 times
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # the processor's scaling
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(pixels), (batch,), generator=generator)
        loss = model(pixel_values=pixels[pick], labels=targets[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def write_folder(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = directory / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")


def write_task(directory: Path, seed: int = 0, calibration: int = 128, heldout: int = 512) -> dict[str, Path]:
    """The trained checkpoint (directory/model) and image folders (directory/calibration, /heldout)."""
    model = train(seed)
    paths = {"model": directory / "model", "calibration": directory / "calibration", "heldout": directory / "heldout"}
    model.save_pretrained(paths["model"])
    processor().save_pretrained(paths["model"])
    write_folder(paths["calibration"], *make_images(calibration, seed + 1))
    write_folder(paths["heldout"], *make_images(heldout, seed + 2))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_task(args.out, args.seed)
    print(json.dumps({name: str(path) for name, path in paths.items()}))


if __name__ == "__main__":
    main()
