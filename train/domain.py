"""The domain gate of a detector: attached, fitted on its training images, thresholded on validation.

A CIFAKE detector's confidence is no guide off its domain: on real phone photos the most accurate one is *more* sure
than on CIFAKE. The gate (``hub_models.modeling_bayesfake.DomainGate``) measures instead how unlike the training data
an image is, by the Mahalanobis distance of its features to one Gaussian per class (Ledoit-Wolf covariance, the
DDU recipe). Which features carry that signal was measured (``benchmarks/results_domain.md``): the frozen ImageNet
EfficientNet-Lite0 features do, the from-scratch CNNs' own 192 features do not, so the CNN releases ship a frozen
Lite0 as the gate's extractor and the Lite0-head releases reuse their own backbone features.

    attach_domain_gate(model, "tf_efficientnet_lite0", "../shared/weights/tf_efficientnet_lite0.in1k.safetensors")
    fit_domain_gate(model, train_images, train_labels)      # the Gaussians, on (a seeded subset of) train
    choose_domain_threshold(model, val_images)               # >= 99% of in-domain validation images pass
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from tqdm.auto import tqdm

from hub_models.configuration_bayesfake import DOMAIN_OWN_FEATURES
from hub_models.image_processing_bayesfake import BayesFakeImageProcessor
from train.data import default_cache_dir
from train.features import content_features, resize_uint8
from train.prediction import as_nchw_uint8, is_features


IN_DOMAIN_PASS = 0.99  # share of in-domain validation images the threshold lets through
GATE_TRAIN_IMAGES = 10_000  # seeded subset of train the Gaussians are fitted on (1280-d: ~4x the dimension per class)


def attach_domain_gate(model, gate: str, extractor_weights: str | None = None, image_size: int = 128,
                       image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
    """Give ``model`` an (unfitted) domain gate: on its own backbone features (``gate="features"``) or on a frozen timm
    model named ``gate`` loaded from ``extractor_weights`` (a local file), fed ``image_size`` px. Returns the gate."""
    config = model.config
    config.domain_gate = gate
    if gate != DOMAIN_OWN_FEATURES:
        config.domain_image_size = image_size
        config.domain_image_mean = [float(v) for v in image_mean]
        config.domain_image_std = [float(v) for v in image_std]
    config.domain_threshold = None
    config.validate_bayesfake()
    # The gate class of the model's own module: a model loaded with trust_remote_code runs a copy of the code.
    gate_class = sys.modules[type(model).__module__].DomainGate
    module = gate_class(config, model.backbone.num_features)
    if module.extractor is not None:
        if not extractor_weights or not Path(extractor_weights).is_file():
            raise FileNotFoundError(f"the domain gate's extractor {gate!r} needs its pretrained weights file; got "
                                    f"{extractor_weights!r}")
        import timm

        source = timm.create_model(gate, pretrained=True, pretrained_cfg_overlay=dict(file=str(extractor_weights)),
                                   num_classes=0)
        module.extractor.load_state_dict(source.state_dict())
        module.extractor.requires_grad_(False)
    param = next(model.parameters())
    model.domain_gate = module.to(device=param.device, dtype=param.dtype).eval()
    return model.domain_gate


def gate_images(model, images: np.ndarray) -> np.ndarray:
    """uint8 images [N, h, w, 3] (at their stored size: CIFAKE's own 32 px, or decoded from the original files) ->
    uint8 [N, S, S, 3] at the size the gate reads: ``config.domain_image_size`` for a gate with its own extractor,
    the detector's input size for a gate on its own features. Resized by the processor's PIL resize, as at
    inference."""
    processor = BayesFakeImageProcessor.from_config(model.config)
    if model.domain_gate is not None and model.domain_gate.extractor is not None:
        processor = processor.domain_processor()
    return resize_uint8(processor, images)


@torch.no_grad()
def gate_features(model, inputs, batch_size: int = 256, progress: bool = True, cache: bool = False) -> np.ndarray:
    """The raw features [N, D] the gate reads: of uint8 images (any size: ``gate_images`` resizes them) or of a
    frozen backbone's cached features [N, D] (a gate on the detector's own features). ``cache``: the detector is a
    head on a frozen backbone, whose features of these images are cached and shared (``content_features``)."""
    gate = model.domain_gate
    if gate is None:
        raise ValueError("the model has no domain gate (attach_domain_gate first)")
    if is_features(inputs):
        if gate.extractor is not None:
            raise ValueError("this gate has its own extractor: it needs images, not the backbone's cached features")
        return np.asarray(inputs, dtype=np.float32)
    if gate.extractor is None and cache:
        return content_features(model, np.asarray(inputs), "gate", progress)
    if gate.extractor is not None:
        return extractor_features(model, np.asarray(inputs), batch_size, progress)
    # A gate on the detector's own features, images not cached: the features its forward pass gives the head (a
    # greyscale autoencoder's encoder sees the luminance, not the pixels as given).
    return batched_features(model, gate_images(model, np.asarray(inputs)),
                            BayesFakeImageProcessor.from_config(model.config),
                            lambda x: model.sample_features(x, 1, stochastic=False), batch_size, progress)


@torch.no_grad()
def batched_features(model, images: np.ndarray, processor: BayesFakeImageProcessor, network, batch_size: int,
                     progress: bool) -> np.ndarray:
    """``network``'s features [N, D] of uint8 ``images`` already at ``processor``'s size, normalised by it, in
    batches, with ``model`` (which holds ``network``) in eval mode."""
    images = as_nchw_uint8(images)
    device = next(model.parameters()).device
    model.eval()
    parts = []
    for start in tqdm(range(0, len(images), batch_size), desc="gate features", unit="batch", disable=not progress):
        x = processor.normalize_uint8(images[start:start + batch_size].to(device))
        parts.append(network(x).float().cpu())
    return torch.cat(parts).numpy()


def _extractor_digest(model) -> str:
    digest = hashlib.sha1()
    cfg = model.config
    digest.update(json.dumps([cfg.domain_gate, cfg.domain_image_size, cfg.domain_image_mean, cfg.domain_image_std,
                              cfg.resample, "v1"]).encode())
    for key, tensor in sorted(model.domain_gate.extractor.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:12]


def extractor_features(model, images: np.ndarray, batch_size: int = 256, progress: bool = True,
                       cache_dir: Path | str | None = "auto") -> np.ndarray:
    """The gate extractor's features [N, D] of uint8 ``images`` (any size: resized to the gate's input from these
    pixels), cached under a hash of the pixels and of the extractor: the detectors that ship the same extractor
    (the CIFAKE CNNs and MobileNetV2 share a frozen Lite0) compute them once for any image set."""
    gate = model.domain_gate
    content = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    root = default_cache_dir() if cache_dir == "auto" else Path(cache_dir)
    path = root / "domain" / f"{model.config.domain_gate}-{_extractor_digest(model)}" / f"{content}-{len(images)}.npy"
    if path.is_file():
        return np.load(path)
    features = batched_features(model, gate_images(model, images),
                                BayesFakeImageProcessor.from_config(model.config).domain_processor(), gate.features,
                                batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, features)
    os.replace(tmp, path)  # atomic: a cached file is always complete
    return features


def fit_domain_gate(model, inputs, labels, max_images: int = GATE_TRAIN_IMAGES, seed: int = 0,
                    progress: bool = True, cache: bool = False) -> dict:
    """Fit the gate's Gaussians on (a seeded subset of at most ``max_images`` of) the training ``inputs``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), size=max_images, replace=False))
        inputs, labels = inputs[keep], labels[keep]
    raw = torch.from_numpy(gate_features(model, inputs, progress=progress, cache=cache))
    if not torch.isfinite(raw).all():
        raise ValueError("the gate's training features hold NaN or infinite values")
    features = model.domain_gate.prepare(raw).double().numpy()
    covariances, shrinkage = [], []
    for c in (0, 1):
        estimate = LedoitWolf().fit(features[labels == c])
        covariances.append(estimate.covariance_)
        shrinkage.append(float(estimate.shrinkage_))
    model.domain_gate.fit(torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(np.stack(covariances)))
    return {"gate": model.config.domain_gate, "fitted_on": int(len(labels)), "feature_dim": int(features.shape[1]),
            "ledoit_wolf_shrinkage": shrinkage}


def domain_scores(model, inputs, progress: bool = True) -> np.ndarray:
    """The gate's distance [N] of every input (higher = less like the training data)."""
    features = torch.from_numpy(gate_features(model, inputs, progress=progress))
    gate = model.domain_gate
    with torch.no_grad():
        return torch.cat([gate.distance(features[i:i + 4096].to(gate.means.device)).float().cpu()
                          for i in range(0, len(features), 4096)]).numpy()


def choose_domain_threshold(model, inputs, pass_rate: float = IN_DOMAIN_PASS, progress: bool = True) -> float:
    """Set ``config.domain_threshold`` to the distance that at least ``pass_rate`` of the in-domain validation
    ``inputs`` stay under, and return it."""
    scores = domain_scores(model, inputs, progress)
    threshold = float(np.quantile(scores, pass_rate, method="higher"))
    model.config.domain_threshold = threshold
    return threshold
