"""Datasets for training and evaluation: decoded once into uint8 arrays and cached.

Sources (``load_splits(source)``):
- a Hugging Face ``datasets`` folder or Hub dataset id with an ``image`` and a ``label`` column (CIFAKE in
  ../shared/data/cifake): read with the real ``datasets.load_dataset`` (offline from the local cache when
  ``HF_HUB_OFFLINE=1``);
- an image folder with ``REAL/`` and ``FAKE/`` sub-folders, optionally under ``train/`` and ``test/``.

Every image goes through the detector's own image processor (``to_rgb_uint8``), so training sees exactly what serving
sees. Decoded arrays are cached under ``cache/`` (keyed by source, split and size): an epoch over 99k images then costs
no JPEG decoding. Unreadable images are skipped and counted, never a crash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor

LABELS = {"REAL": 0, "FAKE": 1}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def default_cache_dir() -> Path:
    """``$BAYESFAKE_CACHE``, else ``cache/`` at the repository root (git-ignored)."""
    return Path(os.environ.get("BAYESFAKE_CACHE", Path(__file__).resolve().parent.parent / "cache"))

log = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]  # uint8 images [N, H, W, 3], int64 labels [N]


def decode_images(items, processor: BayesFakeImageProcessor, desc: str) -> tuple[Split, int]:
    """Decode (image source, label) pairs; return the arrays and how many were unreadable."""
    images, labels, skipped = [], [], 0
    for source, label in tqdm(items, desc=desc, unit="img", mininterval=2.0):
        try:
            images.append(processor.to_rgb_uint8(source))
            labels.append(label)
        except ValueError as err:
            skipped += 1
            log.warning("skipping unreadable image (%s)", err)
    size = processor.size
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return (array, np.asarray(labels, dtype=np.int64)), skipped


def _folder_items(folder: Path) -> list[tuple[Path, int]]:
    items = []
    for name, label in LABELS.items():
        sub = folder / name
        if sub.is_dir():
            items += [(p, label) for p in sorted(sub.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


def _is_image_folder(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in LABELS)


def raw_splits(source: str) -> dict[str, list]:
    """(image source, label) pairs per official split ("train", optionally "test") of a folder or dataset."""
    path = Path(source)
    if path.is_dir() and _is_image_folder(path):
        return {"train": _folder_items(path)}
    if path.is_dir() and any(_is_image_folder(path / s) for s in ("train", "test")):
        return {s: _folder_items(path / s) for s in ("train", "test") if _is_image_folder(path / s)}
    import datasets

    ds = datasets.load_dataset(str(source))
    out = {}
    for split in ds:
        # Raw bytes: decoding is ours (same processor as serving), and a corrupt file must not abort the pass.
        table = ds[split].cast_column("image", datasets.Image(decode=False))
        images = table["image"]
        labels = _label_ids(table)
        out[split] = [(img["bytes"] if img.get("bytes") else img["path"], lab) for img, lab in zip(images, labels)]
    return out


def _label_ids(table) -> list[int]:
    """Labels as REAL=0 / FAKE=1, whatever order the dataset's ClassLabel names use."""
    feature = table.features["label"]
    names = getattr(feature, "names", None)
    labels = table["label"]
    if names is None:
        return [int(v) for v in labels]
    mapping = {i: LABELS[n.upper()] for i, n in enumerate(names)}
    return [mapping[int(v)] for v in labels]


def _cache_key(source: str, split: str, size: int) -> str:
    path = Path(source)
    ident = str(path.resolve()) if path.exists() else source
    return hashlib.sha1(f"{ident}|{split}|{size}|v1".encode()).hexdigest()[:16]


def load_split_arrays(source: str, size: int = 32, cache_dir: Path | str | None = "auto") -> dict[str, Split]:
    """Decoded uint8 arrays per official split, from the cache when present (``cache_dir=None``: no cache)."""
    cache_dir = default_cache_dir() if cache_dir == "auto" else cache_dir
    processor = BayesFakeImageProcessor(size=size)
    raw = None
    out = {}
    for split in ("train", "test"):
        cache_file = Path(cache_dir) / f"{_cache_key(source, split, size)}.npz" if cache_dir else None
        if cache_file is not None and cache_file.is_file():
            with np.load(cache_file) as data:
                out[split] = (data["images"], data["labels"])
            continue
        raw = raw if raw is not None else raw_splits(source)
        if split not in raw:
            continue
        arrays, skipped = decode_images(raw[split], processor, desc=f"decode {split}")
        if skipped:
            log.warning("%s/%s: skipped %d unreadable images of %d", source, split, skipped, len(raw[split]))
        out[split] = arrays
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, images=arrays[0], labels=arrays[1])
            os.replace(tmp, cache_file)  # atomic: an interrupted decode never leaves a half cache
    return out


def carve_validation(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded, label-stratified split of train into (train, val)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        val_idx.append(idx[: int(round(len(idx) * fraction))])
    val_mask = np.zeros(len(labels), bool)
    val_mask[np.concatenate(val_idx)] = True
    return (images[~val_mask], labels[~val_mask]), (images[val_mask], labels[val_mask])


def load_splits(source: str, val_fraction: float = 0.05, seed: int = 0, size: int = 32,
                cache_dir: Path | str | None = "auto") -> dict[str, Split]:
    """{"train", "val", "test"} uint8 arrays; "val" is carved from train (seeded), "test" kept for final reports.

    A source without a test split (an image folder) gets its test carved from train with the same seed.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    arrays = load_split_arrays(source, size, cache_dir)
    if "train" not in arrays or len(arrays["train"][1]) == 0:
        raise ValueError(f"{source}: no training images found (need REAL/ and FAKE/ folders or a 'train' split)")
    train, val = carve_validation(*arrays["train"], val_fraction, seed)
    test = arrays.get("test")
    if test is None:
        train, test = carve_validation(*train, val_fraction / (1 - val_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}
