"""Pretrained-backbone detectors: the Gaussian NB head, the feature path, explanations, and the frozen-head pipeline
(feature cache that resumes, head training and its resume, closed-form Gaussian NB, search table, release folder that
reproduces its report), all on a tiny random timm backbone."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from sklearn.naive_bayes import GaussianNB
from transformers import AutoModel

import train.features as features_mod
import train.trainer as trainer_mod
from hub_models import BayesFakeConfig, BayesFakeDetector, BayesFakeImageProcessor
from train import evaluate, frozen
from train import train as train_cli
from train.config import TrainConfig, load_config
from train.data import decode_processor, load_splits
from train.evaluate import evaluation_data
from train.features import preprocess_uint8
from train.search import parse_grid, run_search
from train.trainer import build_model, load_data, train

from test_train import make_image_folder, same_weights

TINY_TIMM = "test_efficientnet"  # timm's own ~100k-parameter test network, 256-d features


def timm_config(**overrides) -> BayesFakeConfig:
    kwargs = dict(backbone=TINY_TIMM, image_size=32, head="mc_dropout", head_hidden=[16], dropout=0.3, num_samples=6)
    kwargs.update(overrides)
    return BayesFakeConfig(**kwargs)


@pytest.fixture
def backbone_file(tmp_path):
    """A 'pretrained' weights file as ../shared/weights holds them: a timm state dict in safetensors."""
    import timm

    torch.manual_seed(0)
    path = tmp_path / "tiny_backbone.safetensors"
    save_file(timm.create_model(TINY_TIMM, num_classes=0).state_dict(), str(path))
    return path


def test_gaussian_nb_head_matches_scikit_learn(one_thread):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (300, 8)), rng.normal(0.7, 1.5, (200, 8))]).astype(np.float32)
    y = np.array([0] * 300 + [1] * 200)
    model = BayesFakeDetector(BayesFakeConfig(backbone=TINY_TIMM, head="gaussian_nb", dropout=0.0)).eval()
    head = type(model.head)(model.config, 8).fit(torch.from_numpy(x), torch.from_numpy(y))
    reference = GaussianNB().fit(x, y)
    ours = torch.softmax(head(torch.from_numpy(x)), -1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(x), atol=1e-4)
    np.testing.assert_allclose(head.theta.numpy(), reference.theta_, rtol=1e-5, atol=1e-6)
    assert not model.config.stochastic


def test_forward_equals_forward_features(one_thread):
    torch.manual_seed(0)
    model = BayesFakeDetector(timm_config()).eval()
    x = torch.randn(3, 3, 32, 32)
    from_pixels = model(x, num_samples=7, seed=3)
    from_features = model.forward_features(model.backbone(x), num_samples=7, seed=3)
    torch.testing.assert_close(from_pixels.sample_probs, from_features.sample_probs)
    with pytest.raises(ValueError, match=r"features must be a (non-empty )?float tensor \[B, 256\]"):
        model.forward_features(torch.zeros(2, 5))


def test_explain_gives_the_gradients_of_p_fake(one_thread):
    torch.manual_seed(0)
    model = BayesFakeDetector(timm_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.explain(x, num_samples=5, seed=1)
    assert out["saliency"].shape == (2, 32, 32) and (out["saliency"] >= 0).all() and out["saliency"].sum() > 0
    assert out["feature_gradient"].shape == out["feature_importance"].shape == (2, 256)
    # The feature gradient is d P(FAKE) / d features of the same seeded predictive.
    feats = model.backbone(x).detach().requires_grad_(True)
    p_fake = model.forward_features(feats, num_samples=5, seed=1).probs[:, 1]
    torch.testing.assert_close(p_fake.detach(), out["p_fake"])
    (grad,) = torch.autograd.grad(p_fake.sum(), feats)
    torch.testing.assert_close(out["feature_gradient"], grad)
    torch.testing.assert_close(out["feature_importance"], (feats * grad).abs().detach())
    assert all(p.grad is None for p in model.parameters())  # explaining leaves a training loop's grads alone
    # It also returns the predictive it differentiated: the forward pass, so one run gives verdict and reasons.
    with torch.no_grad():
        forward = model(x, num_samples=5, seed=1)
    for key in ("probs", "sample_probs", "std", "predictive_entropy", "mutual_information", "expected_entropy"):
        torch.testing.assert_close(out["output"][key], forward[key])
        assert not out["output"][key].requires_grad
    # The scratch CNN with every layer variational explains too (its features differ per sample).
    vi = BayesFakeDetector(BayesFakeConfig(cnn_widths=[4, 8, 8], head="variational", variational_scope="all")).eval()
    assert vi.explain(x, num_samples=3)["saliency"].shape == (2, 32, 32)


def write_frozen_config(tmp_path, data, weights, **overrides):
    cfg = dict(name="tiny-frozen", data=str(data), features=True, backbone_weights=str(weights),
               out_dir=str(tmp_path / "run"), max_train=0, val_fraction=0.2, epochs=3, batch_size=8, val_samples=4,
               optimizer="adam", lr=1e-3, lr_schedule="constant", drop_last=False, threads=1,
               model=dict(backbone=TINY_TIMM, image_size=48, head="mc_dropout", head_hidden=[16], dropout=0.3,
                          num_samples=6))
    cfg.update(overrides)
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_frozen_pipeline_releases_a_model_that_reproduces_its_report(tmp_path, backbone_file, monkeypatch, one_thread):
    """train.train on a frozen-backbone config, then train.evaluate on its final folder (the split read back from
    the run, the features from the training's cache), then the release reproduces the report from pixels."""
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=20, corrupt=0)
    cfg = load_config(write_frozen_config(tmp_path, data, backbone_file, decode_size=32))
    result = train(cfg, progress=False)
    assert len(result.history) == 3 and result.val[0].dtype == np.float32  # trained and validated on features
    export = tmp_path / "hub" / "tiny-frozen"
    report = evaluate.main([str(result.final), "--split", "test", "--export", str(export), "--command", "pytest"])
    assert "feature_pca.png" in report["plots"] and (export / "feature_pca.png").is_file()
    assert json.loads((export / "train_history.json").read_text()) == result.record
    assert json.loads((export / "eval_report.json").read_text())["metrics"] == report["metrics"]
    # train, val and test features, each extracted once: evaluation reused the validation features of training.
    assert len(list((tmp_path / "cache" / "features").glob("*/*"))) == 3

    # The released folder is the whole detector (backbone weights included): from the pixels a user sends, it gives
    # what the report measured on the feature cache.
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    assert model.config.calibration_temperature == report["calibration"]["temperature"]
    images, labels = load_splits(str(data), decode_processor(model.config, 32), 0.2, 0)["test"]
    cached, cached_labels = evaluation_data(model, result.record, "test", progress=False)["test"]
    np.testing.assert_array_equal(labels, cached_labels)
    with torch.no_grad():
        pixels = preprocess_uint8(BayesFakeImageProcessor.from_config(model.config), images)
        assert pixels.shape[-1] == 48  # decoded at 32 px, resized by the processor as at inference
        from_pixels = model(pixels, seed=0)
        from_cache = model.forward_features(torch.from_numpy(cached), seed=0)
    torch.testing.assert_close(from_pixels.probs, from_cache.probs, atol=1e-5, rtol=1e-4)
    accuracy = ((from_pixels.probs[:, 1] >= model.config.threshold).numpy() == labels).mean()
    assert accuracy == pytest.approx(report["metrics"]["cls/acc"])


def test_feature_cache_resumes_after_an_interruption(tmp_path, backbone_file, monkeypatch, one_thread):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(features_mod, "CHUNK", 4)
    data = make_image_folder(tmp_path / "data", n_per_class=10, corrupt=0)
    cfg = load_config(write_frozen_config(tmp_path, data, backbone_file))
    model, _ = build_model(cfg)
    calls = {"n": 0}
    forward = model.backbone.forward

    def crash_on_third_chunk(x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model.backbone, "forward", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        load_data(cfg, model, progress=False)
    folders = list((tmp_path / "cache" / "features").glob("*/train"))
    assert len(folders) == 1 and len(list(folders[0].glob("chunk_*.npy"))) == 2  # the two finished chunks are kept
    calls["n"] = -1000  # no more crashes
    resumed = load_data(cfg, model, progress=False)
    assert calls["n"] < -990  # the two cached chunks were not recomputed: only the rest ran
    fresh, _ = build_model(cfg)
    processor = decode_processor(fresh.config)
    splits = load_splits(str(data), processor, 0.2, 0)
    for split, (feats, labels) in {"train": resumed.train, "val": resumed.val}.items():
        with torch.no_grad():
            expected = fresh.backbone(preprocess_uint8(BayesFakeImageProcessor.from_config(fresh.config),
                                                       splits[split][0]))
        np.testing.assert_allclose(np.asarray(feats), expected.numpy(), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(labels), splits[split][1])
    # Another decode size is another set of images: never served from this cache.
    other = load_config(write_frozen_config(tmp_path, data, backbone_file, decode_size=32))
    load_data(other, fresh, progress=False)
    assert len(list((tmp_path / "cache" / "features").glob("*/train"))) == 2


def test_a_feature_run_resumes_bit_exact(tmp_path, backbone_file, monkeypatch, one_thread):
    """The same loop, checkpoints and resume as a pixel run: interrupted in epoch 2 and resumed, a head trained on
    cached features equals the uninterrupted one bit for bit."""
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    path = write_frozen_config(tmp_path, data, backbone_file, ckpt_every=2)
    full = train(load_config(path, [f"out_dir={tmp_path / 'full'}"]), progress=False)
    real_lr_at, calls = trainer_mod.lr_at, []

    def crash(step, steps_per_epoch, c):
        calls.append(step)
        if len(calls) == steps_per_epoch + 3:  # in epoch 2, after its step-2 checkpoint
            raise KeyboardInterrupt
        return real_lr_at(step, steps_per_epoch, c)

    cfg = load_config(path, [f"out_dir={tmp_path / 'broken'}"])
    monkeypatch.setattr(trainer_mod, "lr_at", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    resumed = train(cfg, resume=True, progress=False)
    assert same_weights(full.model.state_dict(), resumed.model.state_dict())
    assert [h["val/nll"] for h in full.history] == [h["val/nll"] for h in resumed.history]
    # Only the head trained: the backbone is the pretrained file's, bit for bit.
    from safetensors.torch import load_file

    pretrained = load_file(str(backbone_file))
    assert all(torch.equal(v.cpu(), pretrained[k]) for k, v in resumed.model.backbone.model.state_dict().items())


def test_a_feature_run_is_adam_on_the_heads_sampled_logits(tmp_path, backbone_file, monkeypatch, one_thread):
    """What a frozen-backbone config computes, written out by hand (the loop of the former train.frozen, which trained
    the released heads): re-seeded, Adam at a constant rate over every batch of epoch_order, the partial last one
    included, cross-entropy of one dropout draw of the head's raw logits. The shared trainer gives it bit for bit."""
    import torch.nn.functional as F
    from accelerate import Accelerator

    from train.data import epoch_order

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    cfg = load_config(write_frozen_config(tmp_path, data, backbone_file, batch_size=5, weight_decay=1e-3))
    device = Accelerator().device  # where the trainer runs
    model, _ = build_model(cfg)
    x, y = (t.to(device) for t in load_data(cfg, model, progress=False).train)
    model.to(device)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for epoch in range(cfg.epochs):
        model.head.train()
        for idx in epoch_order(len(y), cfg.seed, epoch).split(cfg.batch_size):
            logits = model.sample_head_logits(x[idx], len(idx), 1, stochastic=True)[0]
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    assert len(y) % cfg.batch_size != 0  # the partial batch is in there
    assert same_weights(model.head.state_dict(), train(cfg, progress=False).model.head.state_dict())


def test_gaussian_nb_is_fitted_in_closed_form_by_the_same_entry_point(tmp_path, backbone_file, monkeypatch,
                                                                       one_thread):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    path = write_frozen_config(tmp_path, data, backbone_file, gnb_var_smoothing=0.01,
                               model=dict(backbone=TINY_TIMM, image_size=48, head="gaussian_nb", head_hidden=[],
                                          dropout=0.0, num_samples=1))
    train_cli.main([str(path)])  # python -m train.train CONFIG, on a frozen-backbone config
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1] and history["split"]["val_sha256"]
    cfg = load_config(path)
    features, labels = load_data(cfg, build_model(cfg)[0], progress=False).train
    reference = GaussianNB(var_smoothing=0.01).fit(features.numpy(), labels.numpy())
    model = AutoModel.from_pretrained(tmp_path / "run" / "final", trust_remote_code=True)
    np.testing.assert_allclose(model.head.theta.numpy(), reference.theta_, rtol=1e-5, atol=1e-6)


def test_frozen_search_table(tmp_path, backbone_file, monkeypatch, one_thread):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    path = write_frozen_config(tmp_path, data, backbone_file, epochs=2)
    # The command written before the merge still works: python -m train.frozen CONFIG --grid ... --out TABLE
    frozen.main([str(path), "--grid", "model.dropout=0.1,0.5", "model.head_hidden=[8],[16]", "--set", "threads=1",
                 "--out", "table.md"])
    rows = json.loads((tmp_path / "table.json").read_text())
    assert len(rows) == 4 and rows[0]["val/nll_calibrated"] <= rows[-1]["val/nll_calibrated"]
    assert "python -m train.hpsearch" in (tmp_path / "table.md").read_text()
    # Every point trained on the same cached features: one extraction of train and one of val.
    assert len(list((tmp_path / "cache" / "features").glob("*/*"))) == 2
    grid = parse_grid(["model.dropout=0.1,0.5", "model.head_hidden=[8],[16]"])
    assert run_search(str(path), grid, ["threads=1"], tmp_path / "runs" / "search" / "tiny-frozen") == rows


@pytest.mark.parametrize("name, size, width", [("legacy_xception.tf_in1k", 299, 2048),
                                               ("vit_small_patch16_224.dino", 224, 384),
                                               ("vit_base_patch16_clip_224.openai", 224, 768)])
def test_xception_dino_and_clip_backbones_work_by_name(name, size, width, one_thread):
    """The original work's backbones build by timm name and run the whole contract; offline, fetching their ImageNet
    weights by name fails with an error that says what to do (the shared weights cover EfficientNet/MobileNetV2)."""
    model = BayesFakeDetector(BayesFakeConfig(backbone=name, image_size=size, head="mc_dropout", head_hidden=[8],
                                              num_samples=3)).eval()
    assert model.backbone.num_features == width
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), seed=0)
    assert out.sample_probs.shape == (3, 1, 2)
    with pytest.raises(RuntimeError, match="needs the model hub, or pass a local weights file"):
        features_mod.load_backbone_weights(model, "timm")


def test_fine_tuning_starts_from_the_pretrained_backbone(tmp_path, backbone_file, monkeypatch, one_thread):
    """train.train with backbone_weights: the whole detector trains, starting from the given ImageNet weights."""
    from safetensors.torch import load_file

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=12, corrupt=0)
    base = dict(name="tiny-ft", data=str(data), backbone_weights=str(backbone_file), epochs=1, batch_size=8,
                val_fraction=0.2, val_samples=2, threads=1, model=dict(backbone=TINY_TIMM, image_size=32,
                                                                       head="mc_dropout", head_hidden=[8]))
    pretrained = load_file(str(backbone_file))

    frozen_lr = TrainConfig(**{**base, "lr": 0.0, "out_dir": str(tmp_path / "lr0")})
    model = AutoModel.from_pretrained(train(frozen_lr, progress=False).final, trust_remote_code=True)
    params = dict(model.backbone.model.named_parameters())
    assert all(torch.equal(params[k], pretrained[k]) for k in params)  # lr 0: exactly the file's weights

    tuned = TrainConfig(**{**base, "lr": 1e-2, "out_dir": str(tmp_path / "ft")})
    model = AutoModel.from_pretrained(train(tuned, progress=False).final, trust_remote_code=True)
    params = dict(model.backbone.model.named_parameters())
    assert any(not torch.equal(params[k], pretrained[k]) for k in params)  # the backbone itself was trained
