"""Also judge degraded copies (opt-in): answer only when a detector's verdict survives everyday degradation.

The CIFAKE detectors read pixel-level traces, and everyday laundering (a re-encode, a resize, a crop) rewrites them:
a laundered image can get a confident verdict that its traces no longer support. This rule asks the detector the
same question about a few degraded copies of the image and answers only when they all agree:

1. judge the original image (the detector's own processor, T and seed: exactly ``model.verdicts(model(...))``);
2. if that verdict is "outside what this detector was trained on" or "uncertain: needs human review", it stands
   (no copy can turn it into an answer, so no copy is judged: the rule costs nothing there);
3. otherwise make one degraded copy per kind in ``copies`` (``COPY_KINDS``), each from the ORIGINAL image (never a
   copy of a copy), and judge each copy with the same detector, processor, T and seed;
4. answer the original's verdict only when every copy gets that same verdict; any other copy verdict (the opposite
   answer, "uncertain", or "outside") makes it "uncertain: needs human review".

So the rule only ever withdraws answers: it never changes an answer into the opposite one, never answers where the
detector alone did not, and the share of images that get "outside" or "uncertain" can only rise.

Measured, and not offered to users (``benchmarks/results_copies.md``, ``python benchmarks/bench_copies.py``): with the
copies chosen on validation (``DEFAULT_COPIES``), the answers it withdraws on laundered CIFAKE test images are wrong
about 2.8 times as often as those it keeps, but it removes only 17% of the wrong answers, at 0.8-4 points of clean
coverage and 0.9-7 points on laundered sets, and leaves the weakest cells as they were (MobileNetV2 under blur: 92.7% ->
92.3% answered accuracy): the wrong answers that remain are stable under degradation. That misses the criterion
written before measuring, so neither ``bayesfake score`` nor the Space has a switch for it; the released detectors'
outputs are ``model(pixel_values)``'s, unchanged. The module stays for experiments and for that benchmark.

    from hub_models.copies import verdicts_with_copies
    judged = verdicts_with_copies(model, processor, ["photo.jpg"])       # copies=DEFAULT_COPIES
    judged.verdicts, judged.original, judged.copies                      # the rule's, the original's, each copy's

``judge_with_copies`` is the rule on any function from images to verdicts (a benchmark or a server that runs several
detectors with shared features passes its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .degradations import blur, crop_resize, down_up, jpeg
from .image_processing_bayesfake import load_image, to_rgb
from .modeling_bayesfake import VERDICT_FAKE, VERDICT_REAL, VERDICT_UNSURE, VERDICTS

ANSWERS = (VERDICT_FAKE, VERDICT_REAL)

# The degraded copies the rule can make, each from the original image at its own size (hub_models.degradations).
# Milder than the launderings a detector is measured under (train.laundering.LAUNDERINGS: JPEG 75 / 50, down-up x0.5,
# crop 75%, blur 1 px) or equal to them: a copy should move an answer that rests on fragile traces, not destroy the
# image. benchmarks/bench_copies.py chooses among them on validation.
COPY_KINDS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg90": lambda image: jpeg(image, 90),
    "jpeg75": lambda image: jpeg(image, 75),
    "downup0.75": lambda image: down_up(image, 0.75),
    "downup0.5": lambda image: down_up(image, 0.5),
    "crop90": lambda image: crop_resize(image, 0.90),
    "crop80": lambda image: crop_resize(image, 0.80),
    "blur0.5": lambda image: blur(image, 0.5),
}
# Chosen on the CIFAKE validation split (never test) by ``python benchmarks/bench_copies.py`` (stage 1: the best pooled
# answered accuracy on the laundered validation sets with no answering detector losing more than 5 points of clean
# coverage). A single down-up, crop or blur copy already costs one detector 11-25 points of clean validation coverage
# (three together 20-35): the detectors' answers on clean 32 px images move under resampling too. See
# benchmarks/results_copies.md.
DEFAULT_COPIES: tuple[str, ...] = ("jpeg90",)

VerdictsOf = Callable[[list[Image.Image]], list[str]]


def check_copies(copies: Sequence[str]) -> tuple[str, ...]:
    """``copies`` as a tuple of known kinds; ``ValueError`` for an unknown or repeated kind, or a single string."""
    if isinstance(copies, str):
        raise ValueError(f"copies must be a sequence of kinds (e.g. {list(DEFAULT_COPIES)}), not the string {copies!r}")
    copies = tuple(copies)
    unknown = [kind for kind in copies if kind not in COPY_KINDS]
    if unknown:
        raise ValueError(f"unknown copy kind(s) {unknown}; known: {list(COPY_KINDS)}")
    if len(set(copies)) != len(copies):
        raise ValueError(f"copies repeats a kind: {list(copies)}")
    return copies


def as_rgb(image) -> Image.Image:
    """An image as the processor reads it (path, bytes, PIL or uint8 HxW[xC] array) -> 8-bit RGB PIL at its own size
    (EXIF orientation, alpha over white, ... as ``image_processing_bayesfake.to_rgb``)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 HxW or HxWxC; got dtype {image.dtype}")
        image = Image.fromarray(image)
    elif torch.is_tensor(image):
        raise ValueError("pass PIL images, paths, bytes or uint8 numpy arrays: degraded copies are made from the "
                         "image itself, not from preprocessed tensors")
    return to_rgb(load_image(image))


def degraded_copies(image, copies: Sequence[str] = DEFAULT_COPIES) -> list[Image.Image]:
    """One degraded copy of ``image`` per kind of ``copies``, each made from the image itself, at its own size."""
    original = as_rgb(image)
    return [COPY_KINDS[kind](original) for kind in check_copies(copies)]


def combine_verdicts(original: str, copies: Sequence[str]) -> str:
    """The rule on one image: the original's verdict where it is no answer; else that answer when every copy gives
    it too; else "uncertain: needs human review"."""
    for verdict in (original, *copies):
        if verdict not in VERDICTS:
            raise ValueError(f"not a detector verdict: {verdict!r} (expected one of {list(VERDICTS)})")
    if original not in ANSWERS:
        return original
    return original if all(verdict == original for verdict in copies) else VERDICT_UNSURE


@dataclass
class CopiesJudgement:
    """What the rule decided, per image: ``verdicts`` (the rule's), ``original`` (the detector's on the image alone,
    which the rule never turns into the opposite answer) and ``copies`` (kind -> verdict for each copy judged; empty
    where the original was no answer, since then no copy is judged)."""

    verdicts: list[str]
    original: list[str]
    copies: list[dict[str, str]] = field(default_factory=list)

    @property
    def withdrawn(self) -> list[bool]:
        """Where the copies withdrew the original's answer."""
        return [o in ANSWERS and v not in ANSWERS for o, v in zip(self.original, self.verdicts)]

    @property
    def copies_judged(self) -> int:
        """How many copies were run through the detector (the extra cost over judging the originals alone)."""
        return sum(len(c) for c in self.copies)


def judge_with_copies(verdicts_of: VerdictsOf, images: Sequence, copies: Sequence[str] = DEFAULT_COPIES,
                      original: Sequence[str] | None = None) -> CopiesJudgement:
    """The rule (module docstring) with ``verdicts_of``: a function from a list of RGB PIL images to their verdicts
    (one of ``VERDICTS`` each, as ``model.verdicts`` gives). ``original``: the originals' verdicts when the caller
    already has them (they are then not judged again). Copies are made only of the images whose original verdict is
    an answer, and judged in one call of ``verdicts_of``."""
    copies = check_copies(copies)
    images = list(images)
    if not images:
        raise ValueError("no images given")
    rgb = [as_rgb(image) for image in images]
    original = list(verdicts_of(rgb) if original is None else original)
    if len(original) != len(rgb):
        raise ValueError(f"{len(rgb)} images but {len(original)} original verdicts")
    answered = [i for i, verdict in enumerate(original) if verdict in ANSWERS] if copies else []
    made = [COPY_KINDS[kind](rgb[i]) for i in answered for kind in copies]
    said = list(verdicts_of(made)) if made else []
    if len(said) != len(made):
        raise ValueError(f"verdicts_of gave {len(said)} verdicts for {len(made)} copies")
    per_image: list[dict[str, str]] = [{} for _ in rgb]
    for j, i in enumerate(answered):
        per_image[i] = dict(zip(copies, said[j * len(copies):(j + 1) * len(copies)]))
    verdicts = [combine_verdicts(o, list(c.values())) for o, c in zip(original, per_image)]
    return CopiesJudgement(verdicts=verdicts, original=original, copies=per_image)


def detector_verdicts(model, processor, num_samples: int | None = None, seed: int | None = None,
                      batch_size: int = 64, **forward_kwargs) -> VerdictsOf:
    """``verdicts_of`` for one detector: its processor (with the gate's own input where it has one), then
    ``model(..., num_samples, seed)`` in batches of ``batch_size`` on the model's device, then ``model.verdicts``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = next(model.parameters()).device

    def verdicts_of(images: list[Image.Image]) -> list[str]:
        words = []
        for start in range(0, len(images), batch_size):
            inputs = processor(images[start:start + batch_size])
            inputs = {key: value.to(device) for key, value in inputs.items()}
            with torch.inference_mode():
                out = model(**inputs, num_samples=num_samples, seed=seed, **forward_kwargs)
            words += model.verdicts(out)
        return words

    return verdicts_of


def verdicts_with_copies(model, processor, images: Sequence, copies: Sequence[str] = DEFAULT_COPIES,
                         num_samples: int | None = None, seed: int | None = None,
                         batch_size: int = 64) -> CopiesJudgement:
    """The rule for one detector and its processor on ``images`` (paths, bytes, PIL images or uint8 arrays):
    ``judge_with_copies(detector_verdicts(model, processor, num_samples, seed), images, copies)``. With
    ``copies=()`` it is the detector alone."""
    return judge_with_copies(detector_verdicts(model, processor, num_samples, seed, batch_size), images, copies)
