"""The "perceptual_mahalanobis" reconstruction error (hub_models.modeling_bayesfake.ReconstructionErrorDensity,
train.reconstruction_density): what it measures, that it is fitted on the training images and refuses unfitted, and
that it survives save and load; and the parameter-free "perceptual_deep". Tiny timm encoder
(tests/test_autoencoder.py's), a few 32 px images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

from hub_models import BayesFakeDetector
from hub_models.modeling_bayesfake import ERROR_DENSITY_STAGES, ERROR_LOG_FLOOR, perceptual_error_vector
from train.reconstruction_density import fit_reconstruction_density, reconstruction_error_vectors

from test_autoencoder import SIZE, tiny_config, tiny_model, tiny_weights  # noqa: F401 (a fixture)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """uint8 [n, SIZE, SIZE, 3]: random 4x4 colour fields upsampled (smooth, like an upsampled small image)."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    up = torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def noisy_images(n: int, seed: int) -> np.ndarray:
    """uint8 [n, SIZE, SIZE, 3]: pixel noise (detail at every scale, unlike the smooth images)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def pixels(model, images: np.ndarray) -> torch.Tensor:
    from hub_models import BayesFakeImageProcessor

    processor = BayesFakeImageProcessor.from_config(model.config)
    return processor.normalize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2))


def test_error_vector_is_the_log_mean_squared_feature_error_per_channel():
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 2, 2, 2, generator=g)]  # B = 2: r then t
    vector = perceptual_error_vector(stages)
    assert vector.shape == (2, 5)
    for b in range(2):
        expected = []
        for stage in stages:
            for c in range(stage.shape[1]):
                expected.append(float(((stage[b, c] - stage[b + 2, c]) ** 2).mean()))
        np.testing.assert_allclose(vector[b].numpy(), np.log(np.array(expected) + ERROR_LOG_FLOOR), rtol=1e-5)
    same = perceptual_error_vector([torch.cat([s[:2], s[:2]]) for s in stages])  # a perfect reconstruction
    torch.testing.assert_close(same, torch.full((2, 5), float(np.log(ERROR_LOG_FLOOR))))


def test_error_vector_reads_the_encoders_first_stages(one_thread):
    import timm

    model = tiny_model()
    x = pixels(model, smooth_images(3, 0))
    _, r, t = model.autoencode(x)
    vector = model.reconstruction_error_vector(r, t)
    channels = [info["num_chs"] for info in timm.create_model(model.config.backbone).feature_info]
    channels = channels[:ERROR_DENSITY_STAGES]
    assert vector.shape == (3, sum(channels)) == (3, model.error_vector_dim())
    stages = model.backbone.model.forward_intermediates(
        (torch.cat([r, t]) - torch.tensor(model.config.image_mean).view(1, 3, 1, 1))
        / torch.tensor(model.config.image_std).view(1, 3, 1, 1), indices=list(range(ERROR_DENSITY_STAGES)),
        intermediates_only=True)
    torch.testing.assert_close(vector, perceptual_error_vector(stages), rtol=1e-4, atol=1e-4)


def test_fitted_density_scores_the_mahalanobis_distance_and_flags_unlike_images(tmp_path, one_thread):
    model = tiny_model()
    train = smooth_images(200, 1)
    fit_reconstruction_density(model, train, max_images=160, progress=False)
    assert model.config.reconstruction_metric == "perceptual_mahalanobis"
    assert int(model.reconstruction_density.fitted_on) == 160
    # the same seeded subset, scored independently: sklearn's Ledoit-Wolf, scipy's Mahalanobis distance
    subset = train[np.sort(np.random.default_rng(0).choice(200, size=160, replace=False))]
    vectors = reconstruction_error_vectors(model, subset, progress=False)
    lw = LedoitWolf().fit(vectors)
    test = np.concatenate([smooth_images(6, 2), noisy_images(6, 3)])
    out = model(pixels(model, test), num_samples=4)
    expected = [mahalanobis(v, vectors.mean(0), lw.precision_) for v in reconstruction_error_vectors(model, test,
                                                                                                      progress=False)]
    np.testing.assert_allclose(out.reconstruction_error.numpy(), expected, rtol=1e-3)
    torch.testing.assert_close(model.reconstruct(pixels(model, test))["reconstruction_error"], out.reconstruction_error)
    # images unlike the training images (noise vs smooth fields) have errors unlike theirs
    assert out.reconstruction_error[6:].min() > out.reconstruction_error[:6].max()
    # save and load keep the density and the outputs
    model.save_pretrained(tmp_path / "ae")
    again = BayesFakeDetector.from_pretrained(tmp_path / "ae").eval()
    assert int(again.reconstruction_density.fitted_on) == 160
    torch.testing.assert_close(again(pixels(model, test), num_samples=4).reconstruction_error, out.reconstruction_error)


def test_unfitted_density_and_bad_input_are_errors(one_thread):
    model = tiny_model(reconstruction_metric="perceptual_mahalanobis")
    x = pixels(model, smooth_images(2, 0))
    with pytest.raises(ValueError, match="fitted_on = 0"):
        model(x, num_samples=2)
    model.reconstruction_density = None
    with pytest.raises(ValueError, match="needs the fitted error density"):
        model.reconstruct(x)
    with pytest.raises(ValueError, match="uint8"):
        fit_reconstruction_density(tiny_model(), smooth_images(4, 0).astype(np.float32))
    with pytest.raises(ValueError, match="more training images than dimensions"):
        fit_reconstruction_density(tiny_model(), smooth_images(8, 0), progress=False)
    model = tiny_model()
    fit_reconstruction_density(model, smooth_images(130, 0), progress=False)
    nan = model.reconstruction_density.mean.new_full((1, model.error_vector_dim()), float("nan"))
    with pytest.raises(ValueError, match="NaN|finite"):
        model.reconstruction_density.distance(nan)


def test_needs_an_autoencoder_on_a_timm_encoder():
    with pytest.raises(ValueError, match="autoencoder detector on a timm encoder"):
        BayesFakeDetector(tiny_config(reconstruction_metric="perceptual_mahalanobis", decoder_widths=[]))
    assert BayesFakeDetector(tiny_config()).reconstruction_density is None  # other metrics: no new weights


def test_evaluate_fits_the_density_on_the_runs_train_split_for_the_release(tmp_path, tiny_weights, monkeypatch,
                                                                            one_thread):
    from test_autoencoder import images, write_ae_config
    from test_train import make_image_folder
    from train.config import load_config
    from train.data import decode_processor
    from train.evaluate import main as evaluate, read_run_record, recorded_splits
    from train.trainer import train

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_per_class=120, corrupt=0)
    run = train(load_config(write_ae_config(tmp_path, data, tiny_weights), ["epochs=1"]), progress=False)
    evaluate([str(run.final), "--split", "val", "--num-samples", "4", "--reconstruction-metric",
              "perceptual_mahalanobis", "--export", str(tmp_path / "release")])
    released = BayesFakeDetector.from_pretrained(tmp_path / "release").eval()
    assert released.config.reconstruction_metric == "perceptual_mahalanobis"
    # fitted on the run's own train split, at the detector's input size, nothing else
    _, record = read_run_record(run.final)
    train_images = recorded_splits(record, decode_processor(released.config, 0))["train"][0]
    assert int(released.reconstruction_density.fitted_on) == len(train_images)
    vectors = reconstruction_error_vectors(released, train_images, progress=False)
    torch.testing.assert_close(released.reconstruction_density.mean, torch.from_numpy(vectors.mean(0)).float(),
                               rtol=1e-4, atol=1e-4)
    x = images(2).clamp(-1, 1)
    torch.testing.assert_close(released(x, num_samples=4).reconstruction_error,
                               released.reconstruct(x)["reconstruction_error"])


def test_perceptual_deep_is_the_quantile_pooled_distance_of_the_deeper_stages(one_thread):
    from hub_models.modeling_bayesfake import DEEP_PERCEPTUAL_QUANTILE, DEEP_PERCEPTUAL_STAGES

    model = tiny_model(reconstruction_metric="perceptual_deep")
    x = pixels(model, np.concatenate([smooth_images(3, 0), noisy_images(2, 1)]))
    out, shown = model(x, num_samples=4), model.reconstruct(x)
    r, t = shown["reconstruction"], shown["target"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.config.image_mean, model.config.image_std))
    stages = model.backbone.model.forward_intermediates((torch.cat([r, t]) - mean) / std, indices=5,
                                                       intermediates_only=True)
    expected = np.zeros(len(x))
    for index in DEEP_PERCEPTUAL_STAGES:
        features = stages[index].detach().double().numpy()
        a, b = features[:len(x)], features[len(x):]
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        per_position = ((a - b) ** 2).sum(1).reshape(len(x), -1)
        expected += np.quantile(per_position, DEEP_PERCEPTUAL_QUANTILE, axis=1)
    np.testing.assert_allclose(out.reconstruction_error.numpy(), expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(shown["reconstruction_error"], out.reconstruction_error)
    torch.testing.assert_close(model(x[3:4], num_samples=4).reconstruction_error, out.reconstruction_error[3:4])
    model.config.reconstruction_metric = "perceptual"  # not the mean over the first stages
    assert not torch.allclose(out.reconstruction_error, model.reconstruction_score(r, t))
