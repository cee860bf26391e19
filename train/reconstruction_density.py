"""The "perceptual_mahalanobis" reconstruction error of an autoencoder detector: attached and fitted on its training
images.

The mean reconstruction error ("l1", "perceptual") mixes "an image with another kind of detail than the training
images" with "a hard training image". ``hub_models.modeling_bayesfake.ReconstructionErrorDensity`` keeps the error per
channel of the encoder's first stages and scores how unlike the training images' errors that pattern is (Mahalanobis
distance, Ledoit-Wolf covariance). Chosen on wild train vs CIFAKE validation among the definitions of
``benchmarks/bench_ae_error_definitions.py``.

    fit_reconstruction_density(model, train_images)   # uint8 [N, S, S, 3] at the detector's input size
    model(pixel_values).reconstruction_error          # now the Mahalanobis distance
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from tqdm.auto import tqdm

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor
from hub_models.modeling_bayesfake import ReconstructionErrorDensity
from train.data import seeded_subset

DENSITY_TRAIN_IMAGES = 10_000  # seeded subset of train the Gaussian is fitted on (168-d for MobileNetV2: ~60x the dim)


@torch.no_grad()
def reconstruction_error_vectors(model, images: np.ndarray, batch_size: int = 128, progress: bool = True) -> np.ndarray:
    """``model.reconstruction_error_vector`` [N, D] of uint8 images [N, S, S, 3] at the detector's input size, prepared
    by the detector's own image processor."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"need uint8 images [N, S, S, 3]; got {images.dtype} {list(images.shape)}")
    processor = BayesFakeImageProcessor.from_config(model.config)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruction error vectors", unit="batch",
                      disable=not progress):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        pixel_values = processor.normalize_uint8(batch).to(device=param.device, dtype=param.dtype)
        model.check_pixel_values(pixel_values)
        _, reconstruction, target = model.autoencode(pixel_values)
        out.append(model.reconstruction_error_vector(reconstruction, target).cpu())
    model.train(was_training)
    return torch.cat(out).double().numpy()


def fit_reconstruction_density(model, images: np.ndarray, max_images: int = DENSITY_TRAIN_IMAGES, seed: int = 0,
                               batch_size: int = 128, progress: bool = True):
    """Set ``model.config.reconstruction_metric`` to "perceptual_mahalanobis", attach the error density and fit it on a
    seeded subset of at most ``max_images`` training images (uint8 [N, S, S, 3] at the detector's input size). Returns
    the model."""
    keep = seeded_subset(len(images), max_images, seed)
    images = images if keep is None else images[keep]
    vectors = reconstruction_error_vectors(model, images, batch_size, progress)
    if len(vectors) <= vectors.shape[1]:
        raise ValueError(f"fit_reconstruction_density: {len(vectors)} images for {vectors.shape[1]}-d error vectors; "
                         "give more training images than dimensions")
    covariance = LedoitWolf().fit(vectors).covariance_
    param = next(model.parameters())
    density = ReconstructionErrorDensity(model.error_vector_dim()).to(param.device)
    density.fit(torch.from_numpy(vectors), torch.from_numpy(covariance))
    model.reconstruction_density = density
    model.config.reconstruction_metric = "perceptual_mahalanobis"
    return model
