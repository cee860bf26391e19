"""The autoencoder detector (issue 15): forward contract with reconstruction_error, the decoder and encoder run once
for any T, greyscale, the hybrid loss on known inputs, the frozen-classifier phase and partial unfreezing, the Youden
threshold, and a tiny training run through the one training loop, interrupted and resumed bit-exact."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from hub_models import BayesFakeConfig, BayesFakeDetector
from hub_models.modeling_bayesfake import LUMA
from train.autoencoder import AutoencoderTrainStep, build_loss, classifier_weight, freeze_encoder
from train.calibration import calibrate_on_validation, youden_threshold
from train.config import TrainConfig, load_config
from train.losses import HybridLoss, PerceptualDistance, focal_loss, ssim_per_image
from train.trainer import train

from test_train import load_weights, make_image_folder, same_weights, train_interrupted

TINY = "test_efficientnet"  # timm's ~0.1M-parameter test model: a real timm encoder with 'blocks', in milliseconds
SIZE = 32


def tiny_config(**overrides) -> BayesFakeConfig:
    kwargs = dict(backbone=TINY, image_size=SIZE, head="mc_dropout", head_hidden=[8], dropout=0.3, num_samples=8,
                  decoder_widths=[8, 8, 4, 4, 4])
    kwargs.update(overrides)
    return BayesFakeConfig(**kwargs)


def tiny_model(seed=0, **overrides) -> BayesFakeDetector:
    """A tiny autoencoder detector whose encoder holds timm's own initial weights (what loading pretrained weights
    does; the post-init He weights in eval mode give features too small for the samples to differ visibly)."""
    import timm

    torch.manual_seed(seed)
    model = BayesFakeDetector(tiny_config(**overrides))
    model.backbone.model.load_state_dict(timm.create_model(TINY, num_classes=0).state_dict())
    return model.eval()


def images(b=4, seed=1):
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_weights(tmp_path):
    """Pretrained-weights stand-in: the tiny timm model's own initial weights as a safetensors file."""
    import timm

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(timm.create_model(TINY).state_dict(), str(path))
    return str(path)


def test_forward_contract_and_reconstruction_error(one_thread):
    model = tiny_model()
    x = images()
    out = model(x, num_samples=8)
    assert out.probs.shape == (4, 2) and out.sample_probs.shape == (8, 4, 2)
    assert torch.allclose(out.probs.sum(-1), torch.ones(4))
    assert out.reconstruction_error.shape == (4,) and (out.reconstruction_error > 0).all()
    assert (out.sample_probs[0] - out.sample_probs[1]).abs().max() > 1e-5  # MC dropout samples differ
    shown = model.reconstruct(x)
    assert shown["reconstruction"].shape == (4, 3, SIZE, SIZE) and shown["error_map"].shape == (4, SIZE, SIZE)
    assert 0 <= shown["reconstruction"].min() and shown["reconstruction"].max() <= 1
    torch.testing.assert_close(shown["reconstruction_error"], out.reconstruction_error)
    # The error is the mean absolute difference from the image in [0, 1] (the processor's normalisation undone).
    target = (x * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out.reconstruction_error, (shown["reconstruction"] - target).abs().mean((1, 2, 3)))
    alone = model(x[2:3], num_samples=8)  # an image gets the same answer alone or in a batch
    torch.testing.assert_close(alone.probs, out.probs[2:3])
    torch.testing.assert_close(alone.reconstruction_error, out.reconstruction_error[2:3])
    assert model(x, num_samples=8).probs.equal(out.probs)  # seeded by config.sampling_seed
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full_like(x, math.nan))
    assert model.verdicts(out)  # the verdict rule is unchanged


def test_encoder_and_decoder_run_once_for_any_number_of_samples(one_thread):
    model = tiny_model()
    calls = {"encoder": 0, "decoder": 0, "head": 0}
    # The encoder's first layer counts its passes, whatever path reaches it.
    for name, module in (("encoder", model.backbone.model.conv_stem), ("decoder", model.decoder),
                         ("head", model.head)):
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    model(images(), num_samples=30)
    assert calls == {"encoder": 1, "decoder": 1, "head": 1}


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="decoder_widths"):
        BayesFakeConfig(decoder_widths=[8, 4])  # the from-scratch CNN has no feature map to decode
    with pytest.raises(ValueError, match="greyscale"):
        BayesFakeConfig(greyscale=True)
    with pytest.raises(ValueError, match="threshold_rule"):
        BayesFakeConfig(threshold_rule="median")
    with pytest.raises(ValueError, match="decoder_widths"):
        tiny_config(decoder_widths=[8, 0])


def test_greyscale_detector_sees_luminance_only(one_thread):
    model = tiny_model(greyscale=True)
    x = images().clamp(-1, 1)  # real pixels: in [0, 1] once the processor's normalisation is undone
    rgb01 = x * 0.5 + 0.5
    luma = (rgb01 * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    grey_input = (luma.expand(-1, 3, -1, -1) - 0.5) / 0.5  # the same image with its colour removed
    a, b = model(x), model(grey_input)
    torch.testing.assert_close(a.probs, b.probs)
    torch.testing.assert_close(a.reconstruction_error, b.reconstruction_error)
    shown = model.reconstruct(x)
    assert shown["reconstruction"].shape == (4, 1, SIZE, SIZE)
    torch.testing.assert_close(shown["target"], luma.clamp(0, 1))
    assert not torch.allclose(tiny_model(greyscale=False)(x).probs, a.probs)


def test_save_and_load_keep_the_outputs(tmp_path, one_thread):
    model = tiny_model(greyscale=True)
    model.save_pretrained(tmp_path / "ae")
    again = BayesFakeDetector.from_pretrained(tmp_path / "ae").eval()
    x = images()
    a, b = model(x), again(x)
    torch.testing.assert_close(a.probs, b.probs)
    torch.testing.assert_close(a.reconstruction_error, b.reconstruction_error)


def test_reconstruction_metrics_measure_what_they_say(tiny_weights, one_thread):
    """"highpass" is the error of the images' 3x3-Gaussian residuals (torchvision's blur), "perceptual" the training
    loss's PerceptualDistance on the encoder's own first stages (equal when they hold the same weights); forward and
    reconstruct report the same number, alone or in a batch; the metric survives save and load."""
    from safetensors.torch import load_file
    from torchvision.transforms.functional import gaussian_blur

    x = images().clamp(-1, 1)
    for metric in ("highpass", "perceptual"):
        model = tiny_model(reconstruction_metric=metric)
        model.backbone.model.load_state_dict(load_file(tiny_weights), strict=False)
        out, shown = model(x, num_samples=4), model.reconstruct(x)
        r, t = shown["reconstruction"], shown["target"]
        if metric == "highpass":
            residual = [image - gaussian_blur(image, kernel_size=3, sigma=1.0) for image in (r, t)]
            expected = (residual[0] - residual[1]).abs().mean((1, 2, 3))
        else:
            expected = PerceptualDistance(TINY, tiny_weights, [0.5] * 3, [0.5] * 3).eval()(r, t)
        torch.testing.assert_close(out.reconstruction_error, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(shown["reconstruction_error"], out.reconstruction_error)
        assert not torch.allclose(out.reconstruction_error, (r - t).abs().mean((1, 2, 3)))  # not the plain L1
        torch.testing.assert_close(model(x[1:2], num_samples=4).reconstruction_error, out.reconstruction_error[1:2])
    with pytest.raises(ValueError, match="reconstruction_metric"):
        tiny_config(reconstruction_metric="ssim")


def test_golden_outputs_of_an_autoencoder_hold_its_reconstruction_error(tmp_path, one_thread):
    """A release's golden record keeps the reconstruction error: a decoder that changes only it is caught."""
    from hub_models.export import export_detector
    from hub_models.golden import check_golden, compute_golden, differences, read_golden

    model = tiny_model()
    folder = export_detector(model, tmp_path / "ae", version="1.0.0")
    golden = read_golden(folder)
    assert len(golden["reconstruction_error"]) == len(golden["probs"])
    check_golden(BayesFakeDetector.from_pretrained(folder).eval(), folder)
    with torch.no_grad():
        model.decoder.out.bias.add_(0.5)  # the head never reads the decoder: only the reconstruction moves
    changed = compute_golden(model)
    assert changed["probs"] == golden["probs"]
    assert [d.split(":")[0] for d in differences(golden, changed)] == ["reconstruction_error"]


def test_released_detector_outputs_have_no_reconstruction_error(one_thread):
    model = BayesFakeDetector(BayesFakeConfig(cnn_widths=[4, 8, 8], head_hidden=[8], num_samples=4)).eval()
    assert model.decoder is None and model(torch.randn(2, 3, 32, 32)).reconstruction_error is None


# ----------------------------------------------------------------------------------------------------------------------
# Losses


def test_focal_loss_known_values():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0])
    # p = 0.5 for both: CE = log 2, (1 - p_t)^2 = 1/4; alpha weighs FAKE 0.25, REAL 0.75: mean = 0.5 * log 2 / 4.
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)) / 2
    assert focal_loss(logits, labels, gamma=2.0, alpha=0.25).item() == pytest.approx(expected, rel=1e-6)
    # gamma 0, no alpha: label-smoothed binary cross-entropy = two-class cross-entropy with the same smoothing.
    logits = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(16) % 2
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0, alpha=None, label_smoothing=0.1),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))
    # A confident right answer costs far less under focal loss than under cross-entropy (gamma down-weights it).
    sure = torch.tensor([[-4.0, 4.0]])
    assert focal_loss(sure, torch.tensor([1]), 2.0, None) < 1e-3 * focal_loss(sure, torch.tensor([1]), 0.0, None)


def test_hybrid_loss_parts_on_known_inputs(tiny_weights):
    target = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    perceptual = PerceptualDistance(TINY, tiny_weights, [0.5] * 3, [0.5] * 3)
    loss = HybridLoss(0.84, 0.15, 2.0, 2.0, None, perceptual=perceptual)
    logits, labels = torch.zeros(2, 2), torch.tensor([0, 1])
    perfect = loss(target, target, logits, labels, class_weight=0.0)
    assert perfect.l1.item() == 0 and perfect.ssim.item() == pytest.approx(1.0, abs=1e-5)
    assert perfect.perceptual.item() == pytest.approx(0.0, abs=1e-6) and perfect.classification is None
    assert perfect.total.item() == pytest.approx(0.0, abs=1e-5)
    grey = torch.full_like(target, 0.5)  # off by |target - 0.5| everywhere
    parts = loss(grey, target, logits, labels, class_weight=0.5)
    assert parts.l1.item() == pytest.approx((target - 0.5).abs().mean().item(), rel=1e-6)
    assert parts.ssim.item() == pytest.approx(ssim_per_image(grey, target).mean().item())
    focal = focal_loss(logits, labels, 2.0, None)
    pixel = 0.84 * (1 - parts.ssim) + 0.16 * parts.l1 + 0.15 * parts.perceptual
    assert parts.perceptual.item() > 0
    assert parts.total.item() == pytest.approx((2.0 * pixel + 0.5 * focal).item(), rel=1e-6)


def test_classifier_weight_is_frozen_then_ramps():
    cfg = TrainConfig(name="w", class_weight=2.0, classifier_frozen_fraction=0.1, classifier_ramp_fraction=0.2)
    weights = [classifier_weight(s, 100, cfg) for s in range(100)]
    assert weights[:10] == [0.0] * 10
    assert weights[10] == pytest.approx(0.1) and weights[19] == pytest.approx(1.0)
    assert weights[29:] == [2.0] * 71 and all(b >= a for a, b in zip(weights, weights[1:]))


def test_frozen_phase_trains_decoder_only_and_partial_unfreezing_keeps_early_blocks(tiny_weights, one_thread):
    cfg = TrainConfig(name="f", backbone_weights=tiny_weights, perceptual_weight=0.15, unfreeze_blocks=2,
                      model=dict(backbone=TINY, image_size=SIZE, decoder_widths=[8, 8, 4, 4, 4]))
    model = tiny_model()
    frozen = freeze_encoder(model, cfg.unfreeze_blocks)
    blocks = model.backbone.model.blocks
    assert frozen[-1] is blocks[len(blocks) - 3] and model.backbone.model.conv_stem in frozen
    step = AutoencoderTrainStep(model, frozen).train()
    assert not blocks[0].training and blocks[-1].training and not model.backbone.model.bn1.training
    loss_fn = build_loss(cfg, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = images(8), torch.arange(8) % 2
    for class_weight in (0.0, 1.0):  # step 1: classifier frozen; step 2: it trains
        model.head.requires_grad_(class_weight > 0)
        logits, reconstruction, target = step(x)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(reconstruction, target, logits, y, class_weight).total.backward()
        optimizer.step()
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        head_changed = any(k.startswith("head.") for k in changed)
        assert head_changed == (class_weight > 0)
        assert any(k.startswith("decoder.") for k in changed)
        assert any(k.startswith(f"backbone.model.blocks.{len(blocks) - 1}.") for k in changed)
        early = [k for k in changed if k.startswith(("backbone.model.blocks.0.", "backbone.model.conv_stem",
                                                     "backbone.model.bn1"))]
        assert early == []  # frozen weights and their BatchNorm statistics stay as loaded


# ----------------------------------------------------------------------------------------------------------------------
# Youden threshold and the training loop


def test_youden_threshold_is_the_configs_rule(one_thread):
    labels = np.array([0, 0, 0, 1, 1, 1])
    p_fake = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.9])
    # Flag p >= 0.7: TPR 2/3, FPR 0 (J = 2/3); p >= 0.4: TPR 1, FPR 1/3 (J = 2/3); ties go to roc_curve's first.
    assert youden_threshold(labels, p_fake) in (0.7, 0.4)
    model = tiny_model(threshold_rule="youden_j")
    rng = np.random.default_rng(0)
    val = rng.integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8), np.arange(40) % 2
    summary = calibrate_on_validation(model, *val, num_samples=4, progress=False)
    assert summary["calibration"]["threshold_rule"] == "youden_j"
    assert model.config.threshold == summary["thresholds"]["youden_j"]


def write_ae_config(tmp_path, data, weights, **overrides):
    cfg = dict(name="tiny-ae", data=str(data), out_dir=str(tmp_path / "run"), epochs=2, batch_size=8,
               val_fraction=0.2, ckpt_every=2, val_samples=3, threads=1, backbone_weights=weights, lr=1e-3,
               perceptual_weight=0.15, unfreeze_blocks=2, classifier_frozen_fraction=0.2,
               model=dict(backbone=TINY, image_size=SIZE, head="mc_dropout", head_hidden=[8], num_samples=4,
                          decoder_widths=[8, 8, 4, 4, 4], threshold_rule="youden_j"))
    cfg.update(overrides)
    path = tmp_path / "ae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_run_resumes_bit_exact(tmp_path, tiny_weights, monkeypatch, one_thread):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)  # 24 images: 19 train, 5 val
    path = write_ae_config(tmp_path, data, tiny_weights)
    full = train(load_config(path, [f"out_dir={tmp_path / 'full'}"]), progress=False)
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    assert len(history["history"]) == 2 and history["train_config"]["ssim_share"] == 0.84
    loaded = BayesFakeDetector.from_pretrained(full.final).eval()
    assert loaded.config.threshold_rule == "youden_j" and loaded.decoder is not None
    x = images(2)
    assert loaded(x).reconstruction_error.shape == (2,)
    cfg = load_config(path, [f"out_dir={tmp_path / 'broken'}"])
    train_interrupted(monkeypatch, cfg, at_step=3)  # 2 steps per epoch: killed before the first of epoch 2
    resumed = train(cfg, resume=True, progress=False)
    assert same_weights(load_weights(full.final), load_weights(resumed.final))
    with pytest.raises(ValueError, match="features: false"):
        load_config(path, ["features=true"])


def test_evaluate_sets_the_chosen_reconstruction_metric_in_the_release(tmp_path, tiny_weights, monkeypatch,
                                                                        one_thread):
    from train.evaluate import main as evaluate

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    run = train(load_config(write_ae_config(tmp_path, data, tiny_weights), ["epochs=1"]), progress=False)
    evaluate([str(run.final), "--split", "val", "--num-samples", "4", "--reconstruction-metric", "perceptual",
              "--export", str(tmp_path / "release")])
    released = BayesFakeDetector.from_pretrained(tmp_path / "release").eval()
    assert released.config.reconstruction_metric == "perceptual"
    shown = released.reconstruct(images(2).clamp(-1, 1))
    expected = PerceptualDistance(TINY, tiny_weights, [0.5] * 3, [0.5] * 3).eval()(shown["reconstruction"],
                                                                                  shown["target"])
    # the encoder's first stages stayed frozen in training: the release's own error is the loss's perceptual term
    torch.testing.assert_close(shown["reconstruction_error"], expected, rtol=1e-4, atol=1e-6)


def test_optuna_study_is_budgeted_resumable_and_reports(tmp_path, tiny_weights, monkeypatch, one_thread):
    import optuna

    from train import optuna_search

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    path = write_ae_config(tmp_path, data, tiny_weights)
    storage, root = str(tmp_path / "study.db"), tmp_path / "trials"
    # A budget that runs out during the first trial: it stops after its first epoch and is queued again.
    study = optuna_search.run_study(str(path), [], 1e-4, storage, root, trials=3)
    first = study.trials[0]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert (root / optuna_search.trial_folder(root, first.params).name / "checkpoint").is_dir()
    # Continued with more budget (same SQLite file): the queued trial resumes from its checkpoint, then one more.
    resumed = []
    real_train = optuna_search.train
    monkeypatch.setattr(optuna_search, "train", lambda cfg, resume, **kw: resumed.append(resume) or
                        real_train(cfg, resume=resume, **kw))
    study = optuna_search.run_study(str(path), [], 30, storage, root, trials=2)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert resumed == [True, False] and len(done) == 2 and done[0].params == first.params
    assert all(math.isfinite(t.value) and t.user_attrs["threshold_rule"] == "youden_j" for t in done)
    spent = study.user_attrs[optuna_search.SPENT_KEY]
    assert spent > 0
    plot = optuna_search.write_results(study, tmp_path / "results" / "optuna.md", "the command")
    table = (tmp_path / "results" / "optuna.md").read_text()
    assert "alpha_r (ssim_share)" in table and "Parameter importance" in table and plot.stat().st_size > 1000
    rows = json.loads((tmp_path / "results" / "optuna.json").read_text())["trials"]
    assert rows[0]["val/nll_calibrated"] == min(t.value for t in done)
    # A spent budget starts nothing.
    again = optuna_search.run_study(str(path), [], spent / 60, storage, root, trials=2)
    assert len(again.trials) == len(study.trials)


def test_domain_gate_on_a_greyscale_autoencoders_own_features_scores_what_forward_scores(one_thread):
    """The gate is fitted and thresholded on the features the forward pass reads (the luminance's), so its scores in
    training-side code equal the model's own domain_score."""
    from hub_models import BayesFakeImageProcessor
    from train.domain import attach_domain_gate, choose_domain_threshold, domain_scores, fit_domain_gate

    model = tiny_model(greyscale=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, SIZE, SIZE, 3), dtype=np.uint8)
    attach_domain_gate(model, "features")
    fit_domain_gate(model, pixels[:40], np.arange(40) % 2, progress=False)
    choose_domain_threshold(model, pixels[40:], progress=False)
    processor = BayesFakeImageProcessor.from_config(model.config)
    x = processor.normalize_uint8(torch.from_numpy(pixels[40:]).permute(0, 3, 1, 2))
    out = model(x)
    np.testing.assert_allclose(out.domain_score.numpy(), domain_scores(model, pixels[40:], progress=False),
                               rtol=1e-5)
    assert out.reconstruction_error.shape == (20,) and out.in_domain.sum() >= 19
