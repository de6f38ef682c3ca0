"""Image data sources for eval (and later calibration): class folders, plain image folders,
COCO-format caption annotations. Images are read with PIL and preprocessed by the model's
image processor."""

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from turbo.core.errors import TurboNote, UsageError
from turbo.core.manifest import CalibrationRecord

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class Sample:
    path: Path | None  # None for images held in memory (HF datasets)
    label: int | None = None  # class index (class folders, ClassLabel column)
    references: tuple[str, ...] = ()  # reference captions (COCO annotations)
    image: object = None  # a PIL image, when not read from `path`


def is_hf_dataset(root: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return any((root / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def hf_dataset(root: str | Path) -> tuple[list[Sample], list[str] | None]:
    """An HF datasets directory with an image column and, optionally, a ClassLabel column. Of a
    DatasetDict, the test split is used, else validation, else the first."""
    try:
        import datasets
    except ImportError:
        raise UsageError("HF datasets directories need `datasets`: pip install -e '.[eval]'") from None
    data = datasets.load_from_disk(str(root))
    if isinstance(data, datasets.DatasetDict):
        split = next((name for name in ("test", "validation") if name in data), next(iter(data)))
        data = data[split]
    features = data.features
    image_column = next((name for name, kind in features.items() if isinstance(kind, datasets.Image)), None)
    if image_column is None:
        raise UsageError(f"{root}: no image column (a datasets.Image feature) among {', '.join(features)}")
    label_column = next((name for name, kind in features.items() if isinstance(kind, datasets.ClassLabel)), None)
    classes = features[label_column].names if label_column else None
    samples = [Sample(None, row[label_column] if label_column else None, (), row[image_column]) for row in data]
    return samples, classes


def _images(root: Path) -> list[Path]:
    """The image files under `root`; a broken link among them is an error, not a skipped image."""
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    broken = [p for p in found if p.is_symlink() and not p.exists()]
    if broken:
        raise UsageError(f"{broken[0]} is a broken link ({len(broken)} under {root}); fix or remove it")
    return [p for p in found if p.is_file()]


def image_files(paths: list[str | Path], option: str = "--images") -> list[Path]:
    """Image files from files and folders (searched recursively), in the order given; a path
    that does not exist, or no image at all, is a one-line error."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += _images(path)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{option} {path}: no such file or folder")
    if not found:
        raise UsageError(f"{option} {', '.join(map(str, paths))} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def unreadable_images(paths: list[Path]) -> list[Path]:
    """The files PIL cannot open as images (truncated, not an image, unreadable)."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, UnidentifiedImageError, ValueError):
            bad.append(path)
    return bad


def image_folder(root: str | Path, labels_file: str | Path | None = None) -> tuple[list[Sample], list[str] | None]:
    """Class folders (`root/<class>/<image>`): sorted folder names, or the order of `labels_file`
    (one class folder name per line), give the labels. A folder of loose images gives unlabeled
    samples (label-free fidelity only). An HF datasets directory is read with `hf_dataset`."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--data {root} is not a directory")
    if is_hf_dataset(root):
        return hf_dataset(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _images(p))
    if labels_file is not None:
        order = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        unknown = sorted(set(classes) - set(order))
        if unknown:
            raise UsageError(f"class folders {', '.join(unknown[:5])} are not in {labels_file}")
        classes = order
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        samples = [Sample(path, index[path.relative_to(root).parts[0]]) for path in _images(root)
                   if path.relative_to(root).parts[0] in index and len(path.relative_to(root).parts) > 1]
        return samples, classes
    samples = [Sample(path) for path in _images(root)]
    if not samples:
        raise UsageError(f"--data {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples, None


def coco_captions(annotations: str | Path, image_root: str | Path) -> list[Sample]:
    """Images and their captions from a captions JSON, in one of the layouts they ship in:
    COCO (`images` with `id`/`file_name`, `annotations` with `image_id`/`caption`), Karpathy
    (`images` with `filepath`?/`filename`, `split` and `sentences[].raw`; of several splits, the
    test split is used, with a note) or BLIP's (a list of `image` and `caption`, one or a list).
    A file in none of them is one line naming what is wrong."""
    try:
        data = json.loads(Path(annotations).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read captions {annotations} ({exc.__class__.__name__})") from None
    root = Path(image_root)
    try:
        samples = _captioned(data, root, annotations)
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{annotations} is not a COCO, Karpathy or BLIP captions file ({exc.__class__.__name__}: "
                         f"{exc}); see docs/guides/eval.md") from None
    missing = [s.path for s in samples if not s.path.is_file()]
    if not samples or missing:
        raise UsageError(f"{annotations}: {len(missing)} of {len(samples)} images missing under {root}"
                         + (f" (first: {missing[0]})" if missing else ""))
    return samples


def _captioned(data, root: Path, annotations) -> list[Sample]:
    if isinstance(data, list):  # BLIP's annotation files
        return [Sample(root / item["image"], None, tuple([item["caption"]] if isinstance(item["caption"], str)
                                                         else map(str, item["caption"]))) for item in data]
    if "annotations" in data:
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
        return [Sample(root / image["file_name"], None, tuple(captions.get(image["id"], ())))
                for image in data["images"]]
    images = data["images"]
    splits = {image.get("split") for image in images} - {None}
    if len(splits) > 1 and "test" in splits:
        kept = [image for image in images if image.get("split") == "test"]
        warnings.warn(f"{annotations}: using its test split ({len(kept)} of {len(images)} images)", TurboNote,
                      stacklevel=3)
        images = kept
    return [Sample(root / image.get("filepath", "") / image["filename"], None,
                   tuple(str(sentence["raw"]) for sentence in image.get("sentences", []))) for image in images]


def batches(pixels: np.ndarray, size: int, static: bool) -> Iterator[tuple[np.ndarray, int]]:
    """(chunk, images in it) of `size` images; for a fixed-batch (static) graph the last chunk is
    filled up with copies of its last image, whose outputs the caller drops."""
    for start in range(0, len(pixels), size):
        chunk = pixels[start:start + size]  # (B, C, H, W)
        count = len(chunk)
        if static and count < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - count, 0)])
        yield chunk, count


MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # the PIL mode of a model's channel count


def smallest_side(samples: list[Sample]) -> int:
    """The shortest side in pixels over the samples' images (headers only; unreadable images are
    left to `pixel_batch`, which names them)."""
    sides = []
    for sample in samples:
        if sample.image is not None:
            sides.append(min(sample.image.size))
            continue
        try:
            with Image.open(sample.path) as image:
                sides.append(min(image.size))
        except (OSError, UnidentifiedImageError):
            continue
    return min(sides, default=0)


def pixel_batch(samples: list[Sample], processor, channels: int = 3) -> np.ndarray:
    """Preprocessed (B, channels, H, W) float32 pixels. Each image is converted to the model's
    channels (grayscale or RGBA to RGB for an RGB model; a colour image to one channel is noted
    once); unreadable images are a one-line error."""
    if channels not in MODES:
        raise UsageError(f"images cannot be converted to {channels} channels (only {', '.join(map(str, MODES))})")
    mode, images, changed = MODES[channels], [], set()

    def convert(image: Image.Image) -> Image.Image:
        if len(image.getbands()) != channels and channels != 3:
            changed.add(image.mode)
        return image.convert(mode)

    for sample in samples:
        if sample.image is not None:
            images.append(convert(sample.image))
            continue
        try:
            with Image.open(sample.path) as image:
                images.append(convert(image))
        except (OSError, UnidentifiedImageError):
            raise UsageError(f"{sample.path} is not a readable image") from None
    if changed:
        warnings.warn(f"{', '.join(sorted(changed))} images were converted to {mode} for the model's {channels} "
                      "input channels", TurboNote, stacklevel=2)
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)


SYNTHETIC = "synthetic"


@dataclass
class Calibration:
    pixels: np.ndarray  # (n, C, H, W), preprocessed
    texts: list[str] | None  # one reference caption per image (COCO-format sources), else None
    info: CalibrationRecord  # what the manifest records


def calibration_set(source: str, count: int, seed: int, processor, pixel_shape: tuple[int, int, int],
                    image_root: str | None = None) -> Calibration:
    """`count` calibration images (with their first caption for a COCO-format file), sampled
    without replacement by `seed` (sorted, so the choice is deterministic), preprocessed.
    `synthetic` gives seeded noise for smoke tests only."""
    if count < 1:
        raise UsageError(f"--calib-size must be at least 1, not {count}")
    rng = np.random.default_rng(seed)
    if source == SYNTHETIC:
        pixels = rng.standard_normal((count, *pixel_shape)).astype(np.float32)  # (n, C, H, W)
        return Calibration(pixels, None, CalibrationRecord(SYNTHETIC, count, seed, synthetic=True))
    root = Path(source)
    images = None
    if root.is_file() and root.suffix == ".json":
        images = str(image_root or root.parent)
        samples = coco_captions(root, images)
    elif not root.is_dir():
        raise UsageError(f"--calib {source} is neither a folder of images nor a COCO-format captions .json (or "
                         "'synthetic' for smoke tests only)")
    else:
        samples = hf_dataset(root)[0] if is_hf_dataset(root) else [Sample(path) for path in _images(root)]
    if not samples:
        raise UsageError(f"--calib {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}, searched "
                         "recursively)")
    if count > len(samples):
        warnings.warn(f"--calib-size {count} but {source} holds {len(samples)} images: calibrating on "
                      f"{len(samples)}", TurboNote, stacklevel=2)
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), size=min(count, len(samples)), replace=False))]
    texts = [s.references[0] for s in chosen] if all(s.references for s in chosen) else None
    return Calibration(pixel_batch(chosen, processor, pixel_shape[0]), texts,
                       CalibrationRecord(str(root), len(chosen), seed, available=len(samples), images=images,
                                         captions=texts is not None))
