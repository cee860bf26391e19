"""Everyday laundering (train.laundering) and training with it: the named launderings and the seeded random one, the
``launder`` and ``init_from`` config fields, bit-exact resume of a laundered run, fine-tuning from a saved detector."""

import numpy as np
import pytest
import torch

from hub_models import BayesFakeDetector
from train.config import load_config
from train.laundering import LAUNDERINGS, launder_images, random_launder
from train.trainer import build_model, train

from test_train import (checkpoint_position, image_folder, load_weights, same_weights,  # noqa: F401
                        train_interrupted, write_config)


def photo_like(n=4, size=32, seed=0):
    """Smooth colour gradients plus mild noise: detail for JPEG and blur to remove, as in a small photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + 40 * yy, b * yy + 30, c * (1 - xx)], axis=-1)
        images.append(np.clip(base + rng.normal(0, 25, base.shape), 0, 255))
    return np.stack(images).astype(np.uint8)


def test_each_laundering_keeps_shape_and_dtype_and_changes_the_pixels():
    images = photo_like(3, size=24)
    assert sorted(LAUNDERINGS) == ["blur1", "crop75", "downup0.5", "jpeg50", "jpeg75"]
    for name in LAUNDERINGS:
        out = launder_images(images, name)
        assert out.shape == images.shape and out.dtype == np.uint8, name
        assert (out != images).any(axis=(1, 2, 3)).all(), f"{name} left an image unchanged"
    assert np.array_equal(launder_images(images, "jpeg50"), launder_images(images, "jpeg50"))  # no randomness
    # Odd, non-square sizes come back at their own size.
    odd = photo_like(2, size=15)[:, :, :11]
    assert all(launder_images(odd, name).shape == odd.shape for name in LAUNDERINGS)


def test_stronger_jpeg_changes_more():
    images = photo_like(6)
    error = {name: np.abs(launder_images(images, name).astype(int) - images).mean() for name in ("jpeg75", "jpeg50")}
    assert error["jpeg50"] > error["jpeg75"] > 0


def test_random_launder_is_seeded_and_probability_zero_is_the_identity():
    images = photo_like(16)
    a = random_launder(images, 0.5, np.random.default_rng(3))
    b = random_launder(images, 0.5, np.random.default_rng(3))
    assert a.shape == images.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, random_launder(images, 0.5, np.random.default_rng(4)))
    changed = (a != images).any(axis=(1, 2, 3))
    assert 0 < changed.sum() < len(images)  # some laundered, some left as they were
    assert np.array_equal(random_launder(images, 0.0, np.random.default_rng(3)), images)
    everything = random_launder(images, 1.0, np.random.default_rng(3))
    assert (everything != images).any(axis=(1, 2, 3)).sum() >= len(images) - 1  # a JPEG 100 may change next to nothing
    assert np.array_equal(images, photo_like(16))  # the input is not modified in place


def test_bad_names_shapes_and_probabilities_raise():
    images = photo_like(2)
    with pytest.raises(ValueError, match=r"unknown laundering 'jpeg40'; known: \['blur1', 'crop75'"):
        launder_images(images, "jpeg40")
    for bad in (images[0], images.astype(np.float32), images[..., :1], torch.from_numpy(images)):
        with pytest.raises(ValueError, match=r"uint8 RGB images as a numpy array \[N, H, W, 3\]"):
            launder_images(bad, "jpeg75")
        with pytest.raises(ValueError, match=r"uint8 RGB images"):
            random_launder(bad, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="probability must be in"):
        random_launder(images, 1.5, np.random.default_rng(0))


def test_launder_and_init_from_config_checks(tmp_path, image_folder):  # noqa: F811
    path = write_config(tmp_path, image_folder)
    assert load_config(path, ["launder=0.5"]).launder == 0.5
    for item, message in [("launder=1.5", "^launder must be in"), ("launder=-0.1", "^launder must be in"),
                          ("launder=yes", "^launder must be a number"),
                          (f"init_from={tmp_path / 'nothing'}", "^init_from must name a detector folder")]:
        with pytest.raises(ValueError, match=message):
            load_config(path, [item])
    with pytest.raises(ValueError, match="launder applies to pixel runs"):
        load_config(path, ["features=true", "backbone_weights=timm", "launder=0.5"])


def test_laundered_run_resumes_bit_exact(tmp_path, image_folder, monkeypatch, one_thread):  # noqa: F811
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder, epochs=1, launder=0.5)
    full = train(load_config(path, [f"out_dir={tmp_path / 'full'}"]), progress=False)
    assert full.record["train_config"]["launder"] == 0.5
    plain = train(load_config(path, [f"out_dir={tmp_path / 'plain'}", "launder=0"]), progress=False)
    assert not same_weights(load_weights(full.final), load_weights(plain.final))  # the laundering is applied

    cfg = load_config(path, [f"out_dir={tmp_path / 'broken'}"])
    train_interrupted(monkeypatch, cfg, at_step=3)  # 3 steps per epoch: the last step, after the step-2 checkpoint
    assert checkpoint_position(tmp_path / "broken") == (0, 2)
    resumed = train(cfg, resume=True, progress=False)
    assert same_weights(load_weights(full.final), load_weights(resumed.final))
    with pytest.raises(ValueError, match="different config"):  # another laundering share is another run
        train(load_config(path, [f"out_dir={tmp_path / 'broken'}", "launder=0.6"]), resume=True, progress=False)


def test_init_from_copies_the_weights_but_not_the_calibration(tmp_path, image_folder):  # noqa: F811
    path = write_config(tmp_path, image_folder)
    cfg = load_config(path)
    source = BayesFakeDetector(cfg.model_config())
    with torch.no_grad():  # weights no seeded initialisation gives
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    source.config.calibration_temperature, source.config.threshold, source.config.reject_entropy = 1.7, 0.64, 0.2
    source.save_pretrained(tmp_path / "release")

    model, loaded = build_model(load_config(path, [f"init_from={tmp_path / 'release'}"]))
    assert loaded == f"init_from {tmp_path / 'release'}"
    assert same_weights(source.state_dict(), model.state_dict())
    assert not same_weights(source.state_dict(), build_model(cfg)[0].state_dict())
    # The calibration is the run's (refitted by the evaluation), not the release's.
    assert (model.config.calibration_temperature, model.config.threshold, model.config.reject_entropy) == (1.0, 0.5,
                                                                                                          None)
    with pytest.raises(ValueError, match=r"architecture differs.*cnn_widths: \[4, 8, 8\] there, \[4, 8, 16\] here"):
        build_model(load_config(path, [f"init_from={tmp_path / 'release'}", "model.cnn_widths=[4, 8, 16]"]))
    with pytest.raises(ValueError, match=r"architecture differs.*head: 'mc_dropout' there, 'variational' here"):
        build_model(load_config(path, [f"init_from={tmp_path / 'release'}", "model.head=variational"]))
    with pytest.raises(ValueError, match="backbone_weights would be overwritten"):
        load_config(path, [f"init_from={tmp_path / 'release'}", "backbone_weights=timm"])
