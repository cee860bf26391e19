"""The wild data set (../shared/data/wild) and per-view backbone features of its images, cached.

wild holds full-size real photos and AI images of 12 generators (longer side <= 512 px, JPEG 90), split by source and
generator: ``test`` has sources and generators never seen in ``train``. A multi-view detector
(``BayesFakeConfig.view_layout``) sees K crops of an image; here every image's six views ("whole_five_crop": the whole
image, four corners, centre) go through the frozen backbone once, and each layout's features are the mean over its
own views (``layout_features``), so choosing a layout on validation costs no second pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from hub_models.configuration_bayesfake import VIEW_NAMES
from hub_models.image_processing_bayesfake import BayesFakeImageProcessor
from train.data import default_cache_dir

WILD = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wild"
ALL_VIEWS = "whole_five_crop"
CHUNK = 128


@dataclass
class WildSplit:
    """One split of wild: the encoded images and their labels (0 REAL, 1 FAKE), sources and generators."""

    images: list[bytes]
    labels: np.ndarray
    sources: np.ndarray
    generators: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def group(self) -> np.ndarray:
        """Source for real photos, generator for AI images: what the splits are made by."""
        return np.where(self.labels == 1, self.generators, self.sources)

    def subset(self, index) -> WildSplit:
        index = np.asarray(index)
        return WildSplit([self.images[i] for i in index], self.labels[index], self.sources[index],
                         self.generators[index])


def load_wild(split: str, root: Path | str = WILD) -> WildSplit:
    """The ``split`` ("train" or "test") of wild, read from its parquet files."""
    files = sorted(Path(root).glob(f"data/{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split} parquet files under {root}/data (the wild data set: ../shared/data/wild)")
    table = pq.read_table(files, columns=["image", "label", "source", "generator"]).to_pydict()
    return WildSplit([item["bytes"] for item in table["image"]], np.asarray(table["label"], dtype=np.int64),
                     np.asarray(table["source"]), np.asarray(table["generator"]))


def view_processor(config) -> BayesFakeImageProcessor:
    """The detector's processor, but cutting all six views (every layout's views are a subset of them)."""
    return BayesFakeImageProcessor(size=config.image_size, image_mean=config.image_mean, image_std=config.image_std,
                                   resample=config.resample, view_layout=ALL_VIEWS,
                                   view_max_side=config.view_max_side)


def _cache_path(model, data: WildSplit, what: str) -> Path:
    cfg = model.config
    digest = hashlib.sha1()
    for key, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    digest.update(json.dumps([cfg.backbone, cfg.image_size, cfg.resample, cfg.image_mean, cfg.image_std,
                              cfg.view_max_side, ALL_VIEWS, len(data), "v1"]).encode())
    for image in data.images[:: max(1, len(data) // 64)]:
        digest.update(hashlib.sha1(image).digest())
    return default_cache_dir() / "wild_views" / f"{cfg.backbone}-{cfg.image_size}px-{what}-{digest.hexdigest()[:12]}"


@torch.no_grad()
def view_features(model, data: WildSplit, what: str, batch_images: int = 8, progress: bool = True) -> np.ndarray:
    """Backbone features [N, 6, D] (float32) of every image's six views, cached in chunks (resumable)."""
    folder = _cache_path(model, data, what)
    final = folder / "views.npy"
    if final.is_file():
        return np.load(final)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    processor = view_processor(model.config)
    chunks = []
    bar = tqdm(total=len(data), desc=f"views {what}", unit="img", disable=not progress, mininterval=10.0)
    for start in range(0, len(data), CHUNK):
        stop = min(start + CHUNK, len(data))
        path = folder / f"chunk_{start // CHUNK:04d}.npy"
        if path.is_file():
            chunks.append(np.load(path))
            bar.update(stop - start)
            continue
        parts = []
        for i in range(start, stop, batch_images):
            pixels = processor(data.images[i:min(i + batch_images, stop)])["pixel_values"]  # [b, 6, 3, S, S]
            b, k = pixels.shape[:2]
            parts.append(model.backbone(pixels.flatten(0, 1)).float().view(b, k, -1).numpy())
            bar.update(b)
        chunk = np.concatenate(parts)
        np.save(path.with_suffix(".tmp.npy"), chunk)
        os.replace(path.with_suffix(".tmp.npy"), path)  # atomic: a chunk on disk is always complete
        chunks.append(chunk)
    bar.close()
    features = np.concatenate(chunks)
    np.save(final.with_suffix(".tmp.npy"), features)
    os.replace(final.with_suffix(".tmp.npy"), final)
    for path in folder.glob("chunk_*.npy"):
        path.unlink()
    return features


def layout_features(views: np.ndarray, layout: str) -> np.ndarray:
    """Features [N, D] of a layout: the mean of its views' features, taken from the six-view array [N, 6, D]
    (``layout="center"`` is the "whole" view alone)."""
    names = VIEW_NAMES[ALL_VIEWS]
    wanted = ("whole",) if layout == "center" else VIEW_NAMES[layout]
    return views[:, [names.index(name) for name in wanted]].mean(1)


def decode_check(data: WildSplit) -> int:
    """How many images of ``data`` PIL cannot open (expected 0; a sanity check of the parquet bytes)."""
    bad = 0
    for image in data.images:
        try:
            Image.open(io.BytesIO(image)).verify()
        except Exception:  # any PIL failure is a bad file here
            bad += 1
    return bad
