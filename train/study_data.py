"""The study's images and their frozen-backbone features: CIFAKE subsets, the wild set, transforms and geometries.

Images are kept as their stored bytes and decoded when a view is built, at their stored size (CIFAKE 32x32; wild up
to 512 px on the longer side, of any aspect ratio). A *view* of a split is (transform, geometry): the transform is
applied at the stored resolution (what happens to a file on its way around the web), then the geometry turns the
image into the backbone's square input:

- ``centre``: the detectors' own preprocessing (resize the shorter side to S, centre-crop S x S);
- ``squash``: the whole frame resized to S x S, aspect ratio distorted (keeps what centre-cropping hides: the frame);
- ``lowres``: first down to a 128 px shorter side, then ``centre``: every image has the same detail level, so the
  stored resolution (generators' native 256-512 px vs cameras') cannot be read from sharpness;
- ``crop0`` .. ``crop4``: S x S crops at the stored resolution (four corners and the centre; images with a shorter side
  below S are first enlarged to it); the ``crops5`` features are the mean of the five.

Features go through ``train.features.extract_features`` (chunked, atomic, resumable), in a cache folder keyed by the
backbone's weights and preprocessing (``cache_folder``) and by the images, transform and geometry.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from hub_models.image_processing_bayesfake import PIL_FILTERS, resize_center_crop
from train.features import cache_folder, extract_features
from train.laundering import blur, down_up, jpeg

TRANSFORMS = ("none", "blur", "jitter", "jpeg", "resize")
TRANSFORM_TEXT = {
    "none": "none",
    "blur": "Gaussian blur, radius 1 px",
    "jitter": "colour jitter: brightness, contrast, saturation each x U(0.6, 1.4)",
    "jpeg": "JPEG quality 50",
    "resize": "down to 0.5x and back up (bicubic)",
}
GEOMETRIES = ("centre", "squash", "lowres", "crops5")
LOWRES_SIDE = 128
CROP_PLACES = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))  # centre, then the four corners


@dataclass
class ImageSet:
    """Stored image files (JPEG bytes, decoded when a view is built: sizes differ), labels and per-image metadata of one
    dataset part."""

    name: str
    images: list
    labels: np.ndarray
    generator: np.ndarray  # "none" for real photos (CIFAKE: "stable-diffusion-1.4" / "none")
    source: np.ndarray
    ids: list = field(default_factory=list)  # sha1 of the stored bytes: what identifies the images in the cache key

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray, name: str) -> ImageSet:
        idx = np.flatnonzero(mask) if mask.dtype == bool else np.asarray(mask)
        return ImageSet(name, [self.images[i] for i in idx], self.labels[idx], self.generator[idx], self.source[idx],
                        [self.ids[i] for i in idx])

    def concat(self, other: ImageSet, name: str) -> ImageSet:
        return ImageSet(name, self.images + other.images, np.concatenate([self.labels, other.labels]),
                        np.concatenate([self.generator, other.generator]), np.concatenate([self.source, other.source]),
                        self.ids + other.ids)

    def digest(self) -> str:
        return hashlib.sha1("\n".join(self.ids).encode()).hexdigest()[:16]


def decode(blob: bytes) -> np.ndarray:
    """Stored bytes -> uint8 RGB [H, W, 3] at the stored size."""
    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _read(folder: Path, split: str, columns: list[str]):
    files = sorted((Path(folder) / "data").glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split}-*.parquet under {Path(folder) / 'data'}")
    return pq.read_table(files, columns=columns).to_pydict()


def stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None):
    """Sorted indices of ``n`` images, half of each label (as near as possible), drawn without replacement."""
    chosen = []
    for label, want in ((0, n // 2), (1, n - n // 2)):
        pool = np.flatnonzero(labels == label)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        if want > len(pool):
            raise ValueError(f"asked for {want} images of label {label}, only {len(pool)} available")
        chosen.append(rng.choice(pool, size=want, replace=False))
    return np.sort(np.concatenate(chosen))


def load_cifake(folder: str, n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, ImageSet]:
    """Seeded, label-balanced CIFAKE subsets: train and val (disjoint) from the official train split, test from its
    test split. Only the chosen images are decoded."""
    out = {}
    rng = np.random.default_rng(seed)
    train = _read(folder, "train", ["image", "label"])
    labels = np.asarray(train["label"], dtype=np.int64)
    train_idx = stratified_pick(labels, n_train, rng)
    val_idx = stratified_pick(labels, n_val, rng, exclude=train_idx)
    test = _read(folder, "test", ["image", "label"])
    test_labels = np.asarray(test["label"], dtype=np.int64)
    test_idx = stratified_pick(test_labels, n_test, rng)
    for name, table, lab, idx in (("cifake_train", train, labels, train_idx), ("cifake_val", train, labels, val_idx),
                                  ("cifake_test", test, test_labels, test_idx)):
        blobs = [table["image"][i]["bytes"] for i in idx]
        out[name] = ImageSet(name, blobs, lab[idx],
                             np.where(lab[idx] == 1, "stable-diffusion-1.4", "none"),
                             np.where(lab[idx] == 1, "cifake-fake", "cifar10"),
                             [hashlib.sha1(b).hexdigest() for b in blobs])
    return out


def load_wild(folder: str, val_fraction: float, seed: int) -> dict[str, ImageSet]:
    """The wild set: official test, and its train split carved into train / val (seeded, stratified by generator:
    the real photos form one group), so validation holds the training generators, never the test ones."""
    out = {}
    for split in ("train", "test"):
        table = _read(folder, split, ["image", "label", "source", "generator", "sha1"])
        blobs = [row["bytes"] for row in table["image"]]
        out[split] = ImageSet(f"wild_{split}", blobs, np.asarray(table["label"], np.int64),
                              np.asarray(table["generator"]), np.asarray(table["source"]), list(table["sha1"]))
    train = out.pop("train")
    rng = np.random.default_rng(seed)
    val = np.zeros(len(train), bool)
    for group in np.unique(train.generator):
        idx = np.flatnonzero(train.generator == group)
        rng.shuffle(idx)
        val[idx[: int(round(len(idx) * val_fraction))]] = True
    return {"wild_train": train.subset(~val, "wild_train"), "wild_val": train.subset(val, "wild_val"),
            "wild_test": out["test"]}


def apply_transform(image: np.ndarray, transform: str, rng: np.random.Generator) -> Image.Image:
    """One of ``TRANSFORMS`` on a uint8 image at its stored resolution (colour jitter draws from ``rng``)."""
    pil = Image.fromarray(image)
    if transform == "none":
        return pil
    if transform == "blur":
        return blur(pil, 1.0)
    if transform == "jpeg":
        return jpeg(pil, 50)
    if transform == "resize":
        return down_up(pil, 0.5)
    if transform == "jitter":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            pil = enhance(pil).enhance(float(rng.uniform(0.6, 1.4)))
        return pil
    raise ValueError(f"unknown transform {transform!r}; known: {list(TRANSFORMS)}")


def apply_geometry(image: Image.Image, geometry: str, size: int, resample: str) -> np.ndarray:
    """``image`` -> uint8 [size, size, 3] by one of the geometries (module docstring); ``cropK`` is crop place K."""
    filt = PIL_FILTERS[resample]
    if geometry == "centre":
        return np.asarray(resize_center_crop(image, size, resample), dtype=np.uint8)
    if geometry == "squash":
        return np.asarray(image.resize((size, size), filt), dtype=np.uint8)
    if geometry == "lowres":
        w, h = image.size
        scale = LOWRES_SIDE / min(w, h)
        small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), filt)
        return np.asarray(resize_center_crop(small, size, resample), dtype=np.uint8)
    if geometry.startswith("crop") and geometry[4:].isdigit() and int(geometry[4:]) < len(CROP_PLACES):
        w, h = image.size
        if min(w, h) < size:
            scale = size / min(w, h)
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), filt)
            w, h = image.size
        fx, fy = CROP_PLACES[int(geometry[4:])]
        left, top = round((w - size) * fx), round((h - size) * fy)
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    raise ValueError(f"unknown geometry {geometry!r}; known: {list(GEOMETRIES)} (crops5 = crop0..crop4)")


def view_images(images: ImageSet, transform: str, geometry: str, size: int, resample: str, seed: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: every image transformed (seeded per image) then put into shape."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; known: {list(TRANSFORMS)}")
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, blob in enumerate(images.images):
        rng = np.random.default_rng([seed, i, TRANSFORMS.index(transform)])
        out[i] = apply_geometry(apply_transform(decode(blob), transform, rng), geometry, size, resample)
    return out


def view_features(model, images: ImageSet, transform: str = "none", geometry: str = "centre", seed: int = 0,
                  progress: bool = True) -> np.ndarray:
    """Backbone features [N, D] of a view, cached (``crops5``: mean of the five crop views' features)."""
    if geometry == "crops5":
        return np.mean([view_features(model, images, transform, f"crop{k}", seed, progress)
                        for k in range(len(CROP_PLACES))], axis=0)
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; known: {list(TRANSFORMS)}")
    key = json.dumps({"study_images": images.digest(), "n": len(images), "transform": transform,
                      "geometry": geometry, "seed": seed if transform == "jitter" else 0, "v": 1}, sort_keys=True)
    folder = cache_folder(model, key) / images.name
    final = folder / "features.npy"
    if final.is_file():
        features = np.load(final)
        if len(features) == len(images):
            return features
    cfg = model.config
    pixels = view_images(images, transform, geometry, cfg.image_size, cfg.resample, seed)
    return extract_features(model, pixels, folder, desc=f"{cfg.backbone} {images.name} {transform}/{geometry}",
                            progress=progress)
