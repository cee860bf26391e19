"""Everyday "laundering" of images: the re-encodings and resizes an image goes through on its way around the web.

The CIFAKE detectors work on 32x32 images and learn from their finest detail: the pixel-level texture, noise and
high-frequency statistics that separate a Stable Diffusion render from a CIFAR-10 photo, not what the picture shows.
That signal is exactly what everyday processing removes or rewrites: JPEG quantises the 8x8 DCT blocks and drops high
frequencies, a Gaussian blur low-passes them, a downscale and upscale resamples every pixel through an interpolation
kernel, and a crop resized back to the original size enlarges the content and smooths it the same way. A detector
trained on clean images only reads laundered images of BOTH classes as whatever their smoothed texture resembles:
a downscale by 2 and back drops the released CNNs from 97-99% to about 60% accuracy.

Two uses, one set of operations:

- ``LAUNDERINGS`` / ``launder_images``: fixed, named launderings (JPEG 75 and 50, down-up x0.5, a 75% centre crop,
  blur radius 1), the conditions a detector is measured under;
- ``random_launder``: the training augmentation. It applies a random laundering of random strength to both classes
  alike, so that the only thing left to learn is what survives laundering. Its draws come only from the ``rng`` it is
  given, so a seeded generator makes it repeatable (a resumed training run draws exactly the same launderings).

Everything is PIL on uint8 RGB arrays, the same library and resampling filter (bicubic) as the detectors' own image
processor, and every function returns images of the size it was given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

# The operations live in the model package: inference makes degraded copies with them too (hub_models.copies).
from hub_models.degradations import blur, crop_resize, down_up, jpeg  # noqa: F401 - re-exported

# Ranges of random_launder's strengths. JPEG below 30 and blur above 1.5 px leave little of a 32 px image; a scale
# under 0.4 leaves fewer than 13 px of it. The crop keeps at least 70% of each side so the content stays the picture.
JPEG_QUALITY = (30, 100)
BLUR_RADIUS = (0.3, 1.5)
DOWNUP_SCALE = (0.4, 0.9)
CROP_KEEP = (0.70, 0.95)


LAUNDERINGS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg75": lambda image: jpeg(image, 75),
    "jpeg50": lambda image: jpeg(image, 50),
    "downup0.5": lambda image: down_up(image, 0.5),
    "crop75": lambda image: crop_resize(image, 0.75),
    "blur1": lambda image: blur(image, 1.0),
}


def _check_images(images) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"expected uint8 RGB images as a numpy array [N, H, W, 3]; got shape {shape} dtype {dtype}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images must be at least 1x1 pixels; got shape {images.shape}")


def launder_images(images: np.ndarray, name: str) -> np.ndarray:
    """Apply the named laundering (a key of ``LAUNDERINGS``) to every image of a uint8 [N, H, W, 3] array; returns a
    new array of the same shape and dtype."""
    if name not in LAUNDERINGS:
        raise ValueError(f"unknown laundering {name!r}; known: {sorted(LAUNDERINGS)}")
    _check_images(images)
    fn = LAUNDERINGS[name]
    out = np.empty_like(images)
    for i, array in enumerate(images):
        out[i] = np.asarray(fn(Image.fromarray(array)), dtype=np.uint8)
    return out


# random_launder's kinds, in the order its draw picks them from (changing the order changes every seeded draw).
RANDOM_KINDS = ("jpeg", "blur", "downup", "crop")


def random_launder(images: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """The training augmentation: each image of a uint8 [N, H, W, 3] array, with probability ``probability``, gets ONE
    laundering drawn uniformly from JPEG (quality 30-100), Gaussian blur (radius 0.3-1.5), down-and-up scaling (factor
    0.4-0.9) and a random crop keeping 70-95% of each side resized back; the others are left as they are. Returns a new
    array of the same shape. All randomness comes from ``rng``: the same generator state gives the same output."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1]; got {probability!r}")
    _check_images(images)
    out = images.copy()
    # One draw per image first (whether it is laundered), then the kind and strength of each laundered one in order.
    chosen = np.flatnonzero(rng.random(len(images)) < probability)
    for i in chosen:
        kind = RANDOM_KINDS[int(rng.integers(len(RANDOM_KINDS)))]
        image = Image.fromarray(images[i])
        if kind == "jpeg":
            image = jpeg(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
        elif kind == "blur":
            image = blur(image, rng.uniform(*BLUR_RADIUS))
        elif kind == "downup":
            image = down_up(image, rng.uniform(*DOWNUP_SCALE))
        else:
            image = crop_resize(image, rng.uniform(*CROP_KEEP), rng.random(), rng.random())
        out[i] = np.asarray(image, dtype=np.uint8)
    return out
