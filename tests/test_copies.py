"""Judging degraded copies too (hub_models.copies): the rule, on real degradations, and on a real (tiny) detector."""

import numpy as np
import pytest
import torch
from PIL import Image

from hub_models import BayesFakeConfig, BayesFakeDetector, BayesFakeImageProcessor
from hub_models import degradations
from hub_models.copies import (COPY_KINDS, DEFAULT_COPIES, combine_verdicts, degraded_copies, judge_with_copies,
                               verdicts_with_copies)
from hub_models.modeling_bayesfake import VERDICT_FAKE, VERDICT_OUTSIDE, VERDICT_REAL, VERDICT_UNSURE


def noisy(size=32, seed=0):
    """Grey plus strong pixel noise: the fine texture that JPEG, resampling and blur remove."""
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)


def smooth(size=32):
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.clip(np.stack([200 * xx, 200 * yy, 100 + 50 * xx], -1), 0, 255).astype(np.uint8)


def flat(size=32, value=30):
    return np.full((size, size, 3), value, np.uint8)


class TextureDetector:
    """A stand-in detector that reads fine texture, as the CIFAKE detectors do: "likely AI-generated" when the mean
    absolute difference between neighbouring pixels is high, "likely real" when it is low, "outside" for a nearly
    uniform image. Counts the images it is asked about."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        words = []
        for image in images:
            a = np.asarray(image, dtype=np.float32)
            texture = np.abs(np.diff(a, axis=1)).mean()
            words.append(VERDICT_OUTSIDE if a.std() < 1 else VERDICT_FAKE if texture > 40 else VERDICT_REAL)
        return words


def test_the_rule_on_one_image():
    assert combine_verdicts(VERDICT_FAKE, [VERDICT_FAKE, VERDICT_FAKE]) == VERDICT_FAKE
    assert combine_verdicts(VERDICT_REAL, [VERDICT_REAL]) == VERDICT_REAL
    # A copy that flips the verdict, doubts it, or finds the copy outside the domain: abstain.
    for other in (VERDICT_REAL, VERDICT_UNSURE, VERDICT_OUTSIDE):
        assert combine_verdicts(VERDICT_FAKE, [VERDICT_FAKE, other]) == VERDICT_UNSURE
    # No answer stays what it was, whatever the copies say; no copies: the original's verdict.
    assert combine_verdicts(VERDICT_OUTSIDE, [VERDICT_FAKE]) == VERDICT_OUTSIDE
    assert combine_verdicts(VERDICT_UNSURE, [VERDICT_REAL]) == VERDICT_UNSURE
    assert combine_verdicts(VERDICT_FAKE, []) == VERDICT_FAKE
    with pytest.raises(ValueError, match="not a detector verdict"):
        combine_verdicts("probably fake", [])


def test_a_verdict_resting_on_texture_the_copies_remove_is_withdrawn():
    detector = TextureDetector()
    judged = judge_with_copies(detector, [noisy(), smooth(), flat()], ("jpeg75", "downup0.5", "crop90"))
    # The noise reads as "AI-generated" on the original; JPEG and resampling smooth it away, so the copies disagree.
    assert judged.original == [VERDICT_FAKE, VERDICT_REAL, VERDICT_OUTSIDE]
    assert judged.copies[0]["downup0.5"] == VERDICT_REAL
    assert judged.verdicts == [VERDICT_UNSURE, VERDICT_REAL, VERDICT_OUTSIDE]
    assert judged.withdrawn == [True, False, False]
    # Copies only of the two answered originals, each kind once: 3 originals + 2 x 3 copies were judged.
    assert judged.copies[2] == {} and judged.copies_judged == 6 and detector.seen == 3 + 6
    # No copies: the detector alone.
    assert judge_with_copies(TextureDetector(), [noisy(), smooth()], ()).verdicts == [VERDICT_FAKE, VERDICT_REAL]


def test_copies_are_made_from_the_original_at_its_own_size():
    image = Image.fromarray(noisy(size=40)[:, :30])
    made = degraded_copies(image, ("jpeg75", "crop90"))
    assert [copy.size for copy in made] == [(30, 40), (30, 40)]
    assert np.array_equal(np.asarray(made[0]), np.asarray(degradations.jpeg(image, 75)))
    assert np.array_equal(np.asarray(made[1]), np.asarray(degradations.crop_resize(image, 0.9)))
    # Training's launderings are the very same operations.
    from train import laundering

    assert laundering.jpeg is degradations.jpeg and laundering.down_up is degradations.down_up


def test_bad_arguments_are_clear_errors():
    detector = TextureDetector()
    with pytest.raises(ValueError, match="unknown copy kind"):
        judge_with_copies(detector, [noisy()], ("jpeg75", "jpeg5"))
    with pytest.raises(ValueError, match="not the string"):
        judge_with_copies(detector, [noisy()], "jpeg75")
    with pytest.raises(ValueError, match="repeats"):
        judge_with_copies(detector, [noisy()], ("jpeg75", "jpeg75"))
    with pytest.raises(ValueError, match="no images"):
        judge_with_copies(detector, [], DEFAULT_COPIES)
    with pytest.raises(ValueError, match="uint8"):
        judge_with_copies(detector, [noisy().astype(np.float32)], DEFAULT_COPIES)
    with pytest.raises(ValueError, match="preprocessed tensors"):
        judge_with_copies(detector, [torch.zeros(3, 32, 32)], DEFAULT_COPIES)
    with pytest.raises(ValueError, match="3 verdicts for 6 copies"):
        judge_with_copies(lambda images: [VERDICT_FAKE] * min(len(images), 3), [noisy(), noisy(1)],
                          ("jpeg75", "downup0.5", "crop90"))
    assert set(DEFAULT_COPIES) <= set(COPY_KINDS)


def test_on_a_real_detector_the_original_verdicts_are_the_detectors_own(tiny_config_kwargs, one_thread):
    torch.manual_seed(0)
    model = BayesFakeDetector(BayesFakeConfig(head="mc_dropout", **tiny_config_kwargs)).eval()
    processor = BayesFakeImageProcessor.from_config(model.config)
    images = [noisy(seed=i) for i in range(4)] + [smooth(), smooth(48)]
    with torch.no_grad():
        alone = model.verdicts(model(**processor(images)))
    assert verdicts_with_copies(model, processor, images, copies=()).verdicts == alone
    judged = verdicts_with_copies(model, processor, images, batch_size=4)
    assert judged.original == alone
    for original, verdict, copies in zip(judged.original, judged.verdicts, judged.copies):
        assert set(copies) == set(DEFAULT_COPIES)  # this detector has no gate nor reject rule: all are answers
        # Never the opposite answer: the original's, when every copy agrees, else "uncertain".
        assert verdict == (original if all(v == original for v in copies.values()) else VERDICT_UNSURE)
