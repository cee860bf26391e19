"""Backbone feature cache: a frozen backbone runs once per (backbone, weights, preprocessing, images) and every head,
search point and evaluation reuses it.

Images go through the detector's own image processor (PIL resize to the backbone's resolution, its normalisation),
exactly as at inference, then through ``model.backbone`` in eval mode. Features are written in chunks, each atomically,
so an interrupted extraction resumes at the first missing chunk and loses at most one chunk of work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hub_models import BayesFakeImageProcessor
from train.data import Split, decode_key, default_cache_dir

CHUNK = 1024


def load_backbone_weights(model, weights: str) -> str:
    """Load ImageNet weights into ``model.backbone`` (a timm backbone): a local file (e.g. ../shared/weights/...)
    or ``"timm"`` for timm's own download by name (needs the model hub). Returns what was loaded, for the record."""
    import timm

    name = model.config.backbone
    if weights == "timm":
        try:
            source = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:  # offline: huggingface_hub's LocalEntryNotFoundError, urllib's URLError, ...
            raise RuntimeError(f"could not fetch the pretrained weights of {name!r} by name ({type(err).__name__}: "
                               f"{err}); this needs the model hub, or pass a local weights file") from err
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights {weights!r} not found (a file, or 'timm' to download by name)")
        source = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                   num_classes=0)
    model.backbone.model.load_state_dict(source.state_dict())
    return f"{name} ({'timm hub' if weights == 'timm' else Path(weights).name})"


def _weights_digest(model) -> str:
    digest = hashlib.sha1()
    for key, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])  # enough to tell checkpoints apart
        digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:12]


def cache_folder(model, data_key: str, cache_dir: Path | str | None = "auto") -> Path:
    """One folder per backbone, weights, preprocessing and data (``data_key``: which images, decoded how): changing any
    of them never reuses stale features."""
    cfg = model.config
    ident = json.dumps([cfg.backbone, _weights_digest(model), cfg.image_size, cfg.resample, cfg.image_mean,
                        cfg.image_std, data_key, "v1"])
    root = default_cache_dir() if cache_dir == "auto" else Path(cache_dir)
    tag = f"{cfg.backbone}-{cfg.image_size}px-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"
    return root / "features" / tag


def resize_uint8(processor: BayesFakeImageProcessor, images: np.ndarray) -> np.ndarray:
    """uint8 [N, h, w, 3] -> uint8 [N, S, S, 3] at ``processor``'s side, through the same PIL resize as inference
    (returned as they are when already that size)."""
    if images.shape[1:3] == (processor.size, processor.size):
        return images
    return np.stack([processor.to_rgb_uint8(Image.fromarray(image)) for image in images])


def preprocess_uint8(processor: BayesFakeImageProcessor, images: np.ndarray) -> torch.Tensor:
    """uint8 [N, h, w, 3] arrays -> normalised [N, 3, S, S], through the same PIL resize as inference."""
    return processor.normalize_uint8(torch.from_numpy(resize_uint8(processor, images)).permute(0, 3, 1, 2))


@torch.no_grad()
def extract_features(model, images: np.ndarray, folder: Path, batch_size: int = 64, desc: str = "features",
                     progress: bool = True) -> np.ndarray:
    """Features [N, D] float32 of uint8 ``images`` [N, h, w, 3], cached in ``folder`` (chunks, resumable)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / "features.npy"
    if final.is_file():
        features = np.load(final)
        if len(features) == len(images):
            return features
    model.eval()
    processor = BayesFakeImageProcessor.from_config(model.config)
    device = next(model.parameters()).device
    starts = range(0, len(images), CHUNK)
    chunks = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, mininterval=5.0)
    for start in starts:
        chunk_file = folder / f"chunk_{start // CHUNK:05d}.npy"
        n = min(CHUNK, len(images) - start)
        if chunk_file.is_file():
            chunks.append(np.load(chunk_file))
            bar.update(n)
            continue
        parts = []
        for i in range(start, start + n, batch_size):
            x = preprocess_uint8(processor, images[i:min(i + batch_size, start + n)]).to(device)
            parts.append(model.backbone(x).float().cpu().numpy())
            bar.update(len(x))
        chunk = np.concatenate(parts)
        tmp = chunk_file.with_suffix(".tmp.npy")
        np.save(tmp, chunk)
        os.replace(tmp, chunk_file)  # atomic: a chunk on disk is always complete
        chunks.append(chunk)
    bar.close()
    features = np.concatenate(chunks).astype(np.float32)
    tmp = final.with_suffix(".tmp.npy")
    np.save(tmp, features)
    os.replace(tmp, final)
    for chunk_file in folder.glob("chunk_*.npy"):
        chunk_file.unlink()
    return features


def split_features(model, splits: dict[str, Split], record: dict, processor: BayesFakeImageProcessor,
                   max_train: int = 0, progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (features float32 [N, D], labels)} of the uint8 ``splits`` that ``processor`` decoded from the source in
    ``record`` (``train.data.load_splits``), extracted once and cached. The cache key holds the source, the decoding,
    the validation split's hash and, for train, the ``max_train`` subset."""
    source = Path(record["data"])
    ident = str(source.resolve()) if source.exists() else record["data"]
    out = {}
    for split, (images, labels) in splits.items():
        key = json.dumps({"data": ident, "decode": decode_key(processor), "seed": record["seed"],
                          "val_sha256": record["val_sha256"], "split": split,
                          "max_train": max_train if split == "train" else 0}, sort_keys=True)
        folder = cache_folder(model, key) / split
        out[split] = (extract_features(model, images, folder, desc=f"features {split}", progress=progress), labels)
    return out


def content_features(model, images: np.ndarray, what: str, progress: bool = True) -> np.ndarray:
    """Backbone features of uint8 ``images`` (any size: resized by the model's processor as at inference), cached
    under a hash of their pixels: the frozen-backbone detectors that share a backbone compute them once for any
    image set (laundered copies, an off-domain set, the domain gate's training images)."""
    digest = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    key = json.dumps({"content_sha1": digest, "shape": list(images.shape), "what": what}, sort_keys=True)
    return extract_features(model, images, cache_folder(model, key) / "images", desc=f"features {what}",
                            progress=progress)
