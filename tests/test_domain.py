"""The domain gate: fitted, thresholded, in the output contract, in the verdicts, saved and loaded, and its errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hub_models import BayesFakeConfig, BayesFakeDetector, BayesFakeImageProcessor
from hub_models.export import export_detector
from hub_models.golden import compute_golden, differences
from hub_models.modeling_bayesfake import VERDICT_OUTSIDE, VERDICTS
from train.calibration import certify_reject_rule
from train.domain import attach_domain_gate, choose_domain_threshold, domain_scores, fit_domain_gate


def images(n, seed, size=16, smooth=True):
    """uint8 images: smooth colour fields (the "domain") or white noise (far outside it)."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    low = rng.random((n, 3, 4, 4)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(size, size), mode="bilinear")
    return (up.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def pixels(model, uint8):
    return BayesFakeImageProcessor.from_config(model.config).normalize_uint8(torch.from_numpy(uint8).permute(0, 3, 1, 2))


def features(n, seed, direction):
    """Synthetic backbone features [n, 8] around one direction (the gate L2-normalises them: direction is what
    counts), so the test controls what is in and out of the domain."""
    rng = np.random.default_rng(seed)
    mean = np.ones(8, np.float32)
    mean[direction] = 4.0
    return (mean + 0.3 * rng.standard_normal((n, 8))).astype(np.float32)


@pytest.fixture
def gated(tiny_config_kwargs, one_thread):
    torch.manual_seed(0)
    model = BayesFakeDetector(BayesFakeConfig(image_size=16, domain_gate="features", training_data=["toy"],
                                              **tiny_config_kwargs)).eval()
    assert model.backbone.num_features == 8
    fit_domain_gate(model, features(400, 0, direction=0), np.arange(400) % 2, progress=False)
    choose_domain_threshold(model, features(200, 1, direction=0), progress=False)
    return model


def test_gate_scores_in_the_output_and_outside_gets_no_verdict(gated):
    inside = gated.forward_features(torch.from_numpy(features(50, 2, direction=0)), num_samples=4)
    outside = gated.forward_features(torch.from_numpy(features(50, 3, direction=5)), num_samples=4)
    assert inside.domain_score.shape == (50,) and inside.in_domain.dtype == torch.bool
    assert inside.in_domain.float().mean() >= 0.9 and not outside.in_domain.any()
    assert torch.equal(inside.in_domain, inside.domain_score <= gated.config.domain_threshold)
    both = gated.forward_features(torch.from_numpy(np.r_[features(3, 4, 0), features(3, 5, 5)]), num_samples=4)
    verdicts = gated.verdicts(both)
    assert set(verdicts) <= set(VERDICTS)
    assert [v == VERDICT_OUTSIDE for v in verdicts] == (~both.in_domain).tolist()
    assert verdicts[3:] == [VERDICT_OUTSIDE] * 3


def test_threshold_lets_99_percent_of_validation_through(gated):
    val = features(200, 1, direction=0)
    assert (domain_scores(gated, val, progress=False) <= gated.config.domain_threshold).mean() >= 0.99


def test_forward_features_and_explain_give_the_same_gate(gated):
    x = pixels(gated, images(6, 4))
    out = gated(x, num_samples=4, seed=1)
    explained = gated.explain(x, num_samples=4, seed=1)["output"]
    assert torch.allclose(explained.domain_score, out.domain_score, atol=1e-5)
    assert gated.verdicts(explained) == gated.verdicts(out)
    via_features = gated.forward_features(gated.backbone(x), num_samples=4, seed=1)
    assert torch.allclose(out.domain_score, via_features.domain_score, atol=1e-5)
    assert torch.allclose(out.probs, via_features.probs, atol=1e-6)


def test_missing_statistics_or_threshold_is_an_error_never_a_verdict(tiny_config_kwargs, gated):
    unfitted = BayesFakeDetector(BayesFakeConfig(image_size=16, domain_gate="features", domain_threshold=3.0,
                                                 **tiny_config_kwargs)).eval()
    with pytest.raises(ValueError, match="missing its domain statistics"):
        unfitted(torch.zeros(1, 3, 16, 16))
    gated.config.domain_threshold = None
    with pytest.raises(ValueError, match="no config.domain_threshold"):
        gated(torch.zeros(1, 3, 16, 16))


def test_nan_features_are_an_error(gated):
    with pytest.raises(ValueError, match="NaN"):
        gated.forward_features(torch.full((1, gated.backbone.num_features), float("nan")))


def test_verdicts_need_in_domain_from_a_gated_detector(gated):
    out = gated(pixels(gated, images(2, 5)), num_samples=2)
    out["in_domain"] = None
    with pytest.raises(ValueError, match="in_domain"):
        gated.verdicts(out)


def test_release_round_trip_keeps_the_gate_and_refuses_lost_statistics(gated, tmp_path):
    gated.config.release_version = "2.0.0"
    folder = export_detector(gated, tmp_path / "release")
    golden = json.loads((folder / "golden_outputs.json").read_text())
    assert {"domain_score", "in_domain"} <= set(golden)
    loaded = BayesFakeDetector.from_pretrained(folder).eval()
    assert differences(golden, compute_golden(loaded)) == []
    assert (folder / "model-domain.safetensors").is_file()
    (folder / "model-domain.safetensors").unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("domain_gate.")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="domain_gate"):
        BayesFakeDetector.from_pretrained(folder)


def test_extractor_gate_reads_domain_pixel_values_from_the_processor(tiny_config_kwargs, tmp_path, one_thread):
    import timm

    name = "mobilenetv3_small_050"
    weights = tmp_path / "extractor.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(name, pretrained=False, num_classes=0).state_dict(), weights)
    # ImageNet normalisation for the detector, (0.5, 0.5) for the gate: the gate's input must not be re-normalised.
    model = BayesFakeDetector(BayesFakeConfig(image_size=16, image_mean=[0.485, 0.456, 0.406],
                                              image_std=[0.229, 0.224, 0.225], **tiny_config_kwargs)).eval()
    attach_domain_gate(model, name, str(weights), image_size=32)
    train = images(120, 0, size=32)  # the originals: the gate reads them at 32 px, the detector at 16
    fit_domain_gate(model, train, np.arange(120) % 2, progress=False)
    choose_domain_threshold(model, images(100, 1, size=32), progress=False)
    processor = BayesFakeImageProcessor.from_config(model.config)
    batch = processor([img for img in images(3, 2, size=64)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["domain_pixel_values"].shape == (3, 3, 32, 32)
    out = model(**batch, num_samples=2, seed=0)
    assert out.domain_score.shape == (3,)
    with torch.no_grad():  # exactly the extractor on the processor's gate input, nothing re-normalised on the way
        direct = model.domain_gate.distance(model.domain_gate.extractor(batch["domain_pixel_values"]))
    assert torch.allclose(out.domain_score, direct, atol=1e-5)
    explained = model.explain(batch["pixel_values"], num_samples=2, seed=0,
                              domain_pixel_values=batch["domain_pixel_values"])["output"]
    assert torch.allclose(explained.domain_score, out.domain_score, atol=1e-5)
    assert torch.equal(explained.in_domain, out.in_domain)
    precomputed = model.domain_gate.features(batch["domain_pixel_values"])
    via_features = model(batch["pixel_values"], num_samples=2, seed=0, domain_features=precomputed)
    assert torch.allclose(via_features.domain_score, out.domain_score, atol=1e-5)
    with pytest.raises(ValueError, match="domain_features must be"):
        model(batch["pixel_values"], domain_features=precomputed[:, :5])
    with pytest.raises(ValueError, match="domain_pixel_values must be"):
        model(batch["pixel_values"], domain_pixel_values=batch["domain_pixel_values"][:, :, :16, :16])
    with pytest.raises(ValueError, match="NaN"):
        model(batch["pixel_values"], domain_pixel_values=torch.full_like(batch["domain_pixel_values"], float("nan")))


def test_certified_rule_is_stored_and_nothing_certified_means_review(gated):
    val = features(300, 6, direction=0)
    labels = np.arange(300) % 2  # a random tiny net: far too weak for a 1% error bound
    record = certify_reject_rule(gated, val, labels, alpha=0.01, delta=0.1, num_samples=4, progress=False)
    assert record["certified"] is False and gated.config.abstention == record
    assert gated.answers_anything is False
    out = gated.forward_features(torch.from_numpy(val[:10]), num_samples=4)
    expected = [VERDICT_OUTSIDE if not inside else "uncertain: needs human review" for inside in out.in_domain]
    assert gated.verdicts(out) == expected
