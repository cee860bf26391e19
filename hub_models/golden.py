"""Golden outputs: what a released detector answers on fixed, seeded inputs, written at export and checked by the tests.

A release is immutable: its ``golden_outputs.json`` holds the Monte Carlo predictive (probs, std, entropies, verdicts)
of ``golden_pixel_values(config)`` at ``GOLDEN_NUM_SAMPLES`` samples with ``GOLDEN_SEED``, and the release version that
produced it. Any change of code or weights that moves those outputs fails ``check_golden`` until the release is
re-exported on purpose with a new ``release_version`` (``hub_models.export`` refuses to overwrite the goldens of a
version with other outputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

GOLDEN_FILE = "golden_outputs.json"
GOLDEN_NUM_IMAGES = 6
GOLDEN_NUM_SAMPLES = 30
GOLDEN_SEED = 0
GOLDEN_INPUT_SEED = 20261126
# Float kernels differ across machines and thread counts (a timm backbone moves by ~5e-7 between batch sizes here):
# the tolerance is far above that noise and far below any real change of a detector.
GOLDEN_ATOL = 1e-4
FIELDS = ("probs", "std", "predictive_entropy", "mutual_information", "expected_entropy")
# Present for detectors with a domain gate (release 2.0.0 on); a record without them belongs to a gate-less detector.
DOMAIN_FIELDS = ("domain_score", "in_domain")
# Present for autoencoder detectors (issue 15): their reconstruction error is an output too, and must not change either.
AUTOENCODER_FIELDS = ("reconstruction_error",)


class GoldenMismatch(AssertionError):
    """A detector no longer gives its release's golden outputs."""


def golden_uint8(size: int, num_images: int = GOLDEN_NUM_IMAGES, seed: int = GOLDEN_INPUT_SEED) -> torch.Tensor:
    """Seeded uint8 images [N, 3, size, size]: random colour fields of 2, 4 and 8 px smoothly upscaled (image-like, not
    white noise), the second half with added grain. Pure torch on CPU, so every machine draws the same pixels."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(num_images):
        low = 2 ** (1 + i % 3)
        base = torch.rand(1, 3, low, low, generator=generator)
        image = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
        image = image + 0.08 * (i // 3) * torch.randn(1, 3, size, size, generator=generator)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images)


def golden_pixel_values(config) -> torch.Tensor:
    """The golden inputs of a detector: ``golden_uint8`` at its input size, normalised with its config; for a
    multi-view detector (K = ``config.num_views`` > 1) K times as many images, as [N, K, 3, S, S]."""
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    views = getattr(config, "num_views", 1)
    if views > 1:
        pixels = (golden_uint8(config.image_size, GOLDEN_NUM_IMAGES * views).float() / 255.0 - mean) / std
        return pixels.unflatten(0, (GOLDEN_NUM_IMAGES, views))
    return (golden_uint8(config.image_size).float() / 255.0 - mean) / std


@torch.no_grad()
def compute_golden(model) -> dict:
    """The golden record of ``model`` (eval mode): its outputs on the golden inputs, and the version they belong to."""
    was_training = model.training
    model.eval()
    try:
        out = model(golden_pixel_values(model.config), num_samples=GOLDEN_NUM_SAMPLES, seed=GOLDEN_SEED)
    finally:
        model.train(was_training)
    record = {
        "release_version": model.config.release_version,
        "inputs": {"kind": "hub_models.golden.golden_uint8", "num_images": GOLDEN_NUM_IMAGES,
                   "seed": GOLDEN_INPUT_SEED, "size": model.config.image_size},
        "num_samples": GOLDEN_NUM_SAMPLES,
        "seed": GOLDEN_SEED,
        "verdicts": model.verdicts(out),
    }
    record.update({name: getattr(out, name).cpu().tolist() for name in FIELDS})
    record.update({name: out[name].cpu().tolist() for name in (*DOMAIN_FIELDS, *AUTOENCODER_FIELDS)
                   if out.get(name) is not None})
    return record


def differences(expected: dict, actual: dict, atol: float = GOLDEN_ATOL) -> list[str]:
    """What differs between two golden records (empty when they agree within ``atol``)."""
    found = []
    for name in FIELDS:
        a, b = torch.tensor(expected[name]), torch.tensor(actual[name])
        if a.shape != b.shape:
            found.append(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        elif not torch.allclose(a, b, atol=atol, rtol=0):
            found.append(f"{name}: max |difference| {(a - b).abs().max().item():.3g} > {atol}")
    for name in (*DOMAIN_FIELDS, *AUTOENCODER_FIELDS):
        if (name in expected) != (name in actual):
            found.append(f"{name}: {'expected' if name in expected else 'not expected'}, "
                         f"{'given' if name in actual else 'missing'}")
        elif name in expected:
            a, b = torch.tensor(expected[name], dtype=torch.float64), torch.tensor(actual[name], dtype=torch.float64)
            # A distance of ~30-100: the same absolute float noise as the probabilities, relative to its size.
            if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=atol):
                found.append(f"{name}: {expected[name]} != {actual[name]}")
    if expected["verdicts"] != actual["verdicts"]:
        found.append(f"verdicts: {expected['verdicts']} != {actual['verdicts']}")
    return found


def read_golden(folder: str | Path) -> dict:
    path = Path(folder) / GOLDEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {GOLDEN_FILE}; a release is exported with its golden outputs")
    return json.loads(path.read_text())


def check_golden(model, folder: str | Path, atol: float = GOLDEN_ATOL) -> dict:
    """Raise ``GoldenMismatch`` unless ``model`` gives the golden outputs stored in ``folder`` under its own version."""
    expected = read_golden(folder)
    version = model.config.release_version
    if expected["release_version"] != version:
        raise GoldenMismatch(f"{folder}: golden outputs are of version {expected['release_version']!r}, the config says "
                             f"{version!r}")
    actual = compute_golden(model)
    found = differences(expected, actual, atol)
    if found:
        raise GoldenMismatch(f"{folder} (version {version}) no longer gives its golden outputs: " + "; ".join(found)
                             + ". If the change is meant, re-export the release with a new version.")
    return actual

