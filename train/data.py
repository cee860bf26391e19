"""Datasets for training and evaluation: decoded once into uint8 arrays and cached.

Sources (``load_splits(source)``):
- a Hugging Face ``datasets`` folder or Hub dataset id with an ``image`` and a ``label`` column (CIFAKE in
  ../shared/data/cifake): read with the real ``datasets.load_dataset`` (offline from the local cache when
  ``HF_HUB_OFFLINE=1``);
- an image folder with ``REAL/`` and ``FAKE/`` sub-folders, optionally under ``train/`` and ``test/``.

Every image goes through the detector's own image processor (``decode_processor``: its size, resample filter and
pixel limit; ``to_rgb_uint8``), so training, evaluation and the feature cache see exactly what serving sees. Decoded
arrays are cached under ``cache/``, keyed by the source and its files (``source_fingerprint``), the split and every
field of the processor that shapes the uint8 pixels (``decode_key``): an epoch over 99k images then costs no JPEG
decoding. Unreadable images are skipped and
counted, never a crash.

Validation is a seeded, label-stratified share of train (``carve_validation``). ``load_splits`` returns it with a
record (source, fraction, seed, sizes and a sha256 of the sorted validation indices) that training writes into the run
and evaluation checks (``check_split_record``) before it calibrates on what it re-derives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor

LABELS = {"REAL": 0, "FAKE": 1}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def default_cache_dir() -> Path:
    """``$BAYESFAKE_CACHE``, else ``cache/`` at the repository root (git-ignored)."""
    return Path(os.environ.get("BAYESFAKE_CACHE", Path(__file__).resolve().parent.parent / "cache"))

log = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]  # uint8 images [N, H, W, 3], int64 labels [N]
# Bump when the decoding itself changes (the processor's to_rgb steps), so older cached arrays are not reused.
DECODE_VERSION = 2


def decode_processor(config, decode_size: int = 0) -> BayesFakeImageProcessor:
    """The detector's own image processor (``BayesFakeImageProcessor.from_config``), decoding at ``decode_size``
    instead of the config's image_size when given (a feature run caches its images small and resizes them later)."""
    processor = BayesFakeImageProcessor.from_config(config)
    if decode_size and decode_size != processor.size:
        processor = BayesFakeImageProcessor(size=decode_size, image_mean=config.image_mean, image_std=config.image_std,
                                            resample=config.resample)
    return processor


def decode_key(processor: BayesFakeImageProcessor) -> dict:
    """Every processor field that shapes the decoded uint8 pixels: size, resample filter, pixel limit (images above it
    are refused, so it decides which images exist). Mean and std are left out on purpose: they apply after uint8
    (``normalize_uint8``), so arrays decoded once serve any normalisation."""
    return {"size": processor.size, "resample": processor.resample, "max_pixels": processor.max_pixels,
            "version": DECODE_VERSION}


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


def source_fingerprint(source: str) -> str:
    """What identifies a source's current contents without reading them: for a local folder every file's relative
    path, size and modification time (an added, removed or replaced image gives another fingerprint, so the decode
    cache is never stale); for a Hub dataset id, the id."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    digest = hashlib.sha1(str(path.resolve()).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_key(source: str, split: str, processor: BayesFakeImageProcessor) -> str:
    key = json.dumps([source_fingerprint(source), split, decode_key(processor)], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_split_arrays(source: str, processor: BayesFakeImageProcessor,
                      cache_dir: Path | str | None = "auto") -> dict[str, Split]:
    """Decoded uint8 arrays per official split, from the cache when present (``cache_dir=None``: no cache)."""
    cache_dir = default_cache_dir() if cache_dir == "auto" else cache_dir
    raw = None
    out = {}
    for split in ("train", "test"):
        cache_file = Path(cache_dir) / f"{_cache_key(source, split, processor)}.npz" if cache_dir else None
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


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the seeded, label-stratified validation share of ``labels``."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        val_idx.append(idx[: int(round(len(idx) * fraction))])
    return np.sort(np.concatenate(val_idx)) if val_idx else np.zeros(0, np.int64)


def carve_validation(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded, label-stratified split of train into (train, val)."""
    val_mask = np.zeros(len(labels), bool)
    val_mask[validation_indices(labels, fraction, seed)] = True
    return (images[~val_mask], labels[~val_mask]), (images[val_mask], labels[val_mask])


def indices_sha256(indices: np.ndarray) -> str:
    """sha256 of sorted indices written as little-endian int64."""
    return hashlib.sha256(np.sort(np.asarray(indices)).astype("<i8").tobytes()).hexdigest()


def split_record(source: str, train_labels: np.ndarray, fraction: float, seed: int, test_carved: bool) -> dict:
    """What identifies the validation split: where it came from, how it was drawn, and a hash of its indices into the
    official train split (as decoded)."""
    val = validation_indices(train_labels, fraction, seed)
    return {"data": str(source), "val_fraction": float(fraction), "seed": int(seed),
            "train_split_size": len(train_labels), "val_size": len(val), "val_sha256": indices_sha256(val),
            "test": "carved from train (seed + 1)" if test_carved else "official"}


def check_split_record(recorded: dict, derived: dict) -> None:
    """Raise unless the validation split re-derived now (``derived``) is the one the run recorded."""
    if recorded.get("val_sha256") != derived["val_sha256"]:
        raise ValueError(
            f"the validation split re-derived from {derived['data']} (fraction {derived['val_fraction']}, seed "
            f"{derived['seed']}: {derived['val_size']} of {derived['train_split_size']} images, sha256 "
            f"{derived['val_sha256'][:12]}) is not the one the run recorded ({recorded.get('val_size')} of "
            f"{recorded.get('train_split_size')} images from {recorded.get('data')}, sha256 "
            f"{str(recorded.get('val_sha256'))[:12]}): the data changed, or another source, fraction or seed was "
            "given. Calibrating on it would mix training images into validation; refusing.")


class Splits(dict):
    """{"train", "val", "test"} -> (uint8 images [N, H, W, 3], int64 labels), and ``record``: how val was drawn."""

    record: dict


def load_splits(source: str, processor: BayesFakeImageProcessor, val_fraction: float = 0.05, seed: int = 0,
                cache_dir: Path | str | None = "auto") -> Splits:
    """{"train", "val", "test"} uint8 arrays decoded by ``processor``; "val" is carved from train (seeded), "test"
    kept for final reports. ``.record`` describes the validation split (``split_record``).

    A source without a test split (an image folder) gets its test carved from train with seed + 1.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    arrays = load_split_arrays(source, processor, cache_dir)
    if "train" not in arrays or len(arrays["train"][1]) == 0:
        raise ValueError(f"{source}: no training images found (need REAL/ and FAKE/ folders or a 'train' split)")
    train, val = carve_validation(*arrays["train"], val_fraction, seed)
    test = arrays.get("test")
    if test is None:
        train, test = carve_validation(*train, val_fraction / (1 - val_fraction), seed + 1)
    splits = Splits(train=train, val=val, test=test)
    splits.record = split_record(source, arrays["train"][1], val_fraction, seed, test_carved="test" not in arrays)
    return splits


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def training_subset(n: int, max_train: int, seed: int) -> np.ndarray:
    """Sorted indices of the seeded ``max_train`` training images (all ``n`` when max_train is 0 or >= n)."""
    if not max_train or max_train >= n:
        return np.arange(n)
    return np.sort(epoch_order(n, seed, -1)[:max_train].numpy())


def seeded_subset(n: int, max_n: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of ``max_n`` of ``n`` items (numpy's generator: evaluation subsets,
    the autoencoder's error density); None when every item is kept (``max_n`` None or >= n)."""
    if max_n is None or n <= max_n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


def augment_batch(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random translation (reflect-padded crop) of a uint8 [B, 3, H, W] batch."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip.view(b, 1, 1, 1), images.flip(3), images)
    if pad <= 0:
        return images
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(b, 3, h, w + 2 * pad)
    cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(b, 3, h, w)
    return padded.gather(2, rows).gather(3, cols).to(torch.uint8)
