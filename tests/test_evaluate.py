"""Evaluation: metrics with known answers, temperature / threshold / reject fitting, reports, the end-to-end flow, and
the validation split read back from the run (refused when it does not match)."""

import json
import math

import numpy as np
import pytest
import torch

from hub_models import BayesFakeConfig, BayesFakeDetector
from train import evaluate
from train.calibration import choose_reject_entropy, choose_thresholds, fit_temperature, mc_log_predictive
from train.data import decode_processor, load_splits
from train.evaluate import calibrate_and_evaluate
from train.metrics import compute_metrics
from train.prediction import Predictions, predict
from train.report import write_report

from test_train import make_image_folder

PLOTS = {"reliability.png", "risk_coverage.png", "uncertainty_hist.png", "confusion_matrix.png", "roc.png"}


def make_preds(labels, p_fake, uncertainty=None) -> Predictions:
    """Hand-built predictions; one uncertainty array stands in for std, entropy and MI alike."""
    labels = np.asarray(labels, dtype=np.int64)
    p_fake = np.asarray(p_fake, dtype=np.float64)
    u = np.zeros(len(labels)) if uncertainty is None else np.asarray(uncertainty, dtype=np.float64)
    return Predictions(labels=labels, p_fake=p_fake, std_fake=u, predictive_entropy=u, mutual_information=u,
                       expected_entropy=np.zeros(len(labels)), num_samples=7)


def errors_flagged_preds(n=100, n_wrong=10) -> Predictions:
    """n images, n_wrong of them wrong, and the wrong ones are exactly the most uncertain ones."""
    labels = np.arange(n) % 2
    p_fake = np.where(labels == 1, 0.9, 0.1)
    wrong = np.zeros(n, bool)
    wrong[:n_wrong] = True
    p_fake[wrong] = 1.0 - p_fake[wrong]
    uncertainty = np.where(wrong, 0.6, 0.1) + np.linspace(0, 0.01, n)  # distinct values, errors all on top
    return make_preds(labels, p_fake, uncertainty)


def tiny_model(**kwargs) -> BayesFakeDetector:
    torch.manual_seed(0)
    return BayesFakeDetector(BayesFakeConfig(cnn_widths=[4, 8, 8], head_hidden=[8], head="mc_dropout",
                                             num_samples=4, **kwargs)).eval()


def random_split(n, seed, layout="NHWC"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    if layout == "NCHW":
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return images, np.arange(n, dtype=np.int64) % 2


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def test_perfect_predictions():
    labels = np.array([0, 1] * 10)
    m = compute_metrics(make_preds(labels, labels.astype(float)), threshold=0.5)
    for key in ("cls/acc", "cls/precision", "cls/recall", "cls/f1", "cls/auroc"):
        assert m[key] == 1.0, key
    assert m["cls/confusion_matrix"] == [[10, 0], [0, 10]]
    assert m["cal/ece"] == pytest.approx(0.0, abs=1e-9)
    assert m["cal/nll"] == pytest.approx(0.0, abs=1e-9)
    assert m["cal/brier"] == 0.0
    assert m["sc/aurc"] == 0.0
    assert all(m[f"sc/acc@reject{k}"] == 1.0 for k in (0, 5, 10, 20))
    # Error detection is undefined without errors: NaN, not a made-up number.
    assert math.isnan(m["sc/auroc_entropy"]) and math.isnan(m["sc/gap_mi"])
    assert (m["meta/n"], m["meta/threshold"], m["meta/num_samples"]) == (20, 0.5, 7)


def test_hand_computed_classification_and_threshold_is_inclusive():
    # Threshold 0.6: the 0.6 image is called FAKE (the detector's rule is p >= threshold).
    m = compute_metrics(make_preds([0, 0, 1, 1], [0.2, 0.6, 0.7, 0.4]), threshold=0.6)
    assert m["cls/confusion_matrix"] == [[1, 1], [1, 1]]
    assert (m["cls/acc"], m["cls/precision"], m["cls/recall"], m["cls/f1"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["cls/auroc"] == 0.75  # 3 of the 4 (FAKE, REAL) pairs ranked right
    assert m["cal/brier"] == pytest.approx((0.04 + 0.36 + 0.09 + 0.36) / 4)
    assert m["cal/nll"] == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.7, 0.4])))


def test_ece_is_top_label_confidence_minus_accuracy():
    labels = np.array([1] * 8 + [0] * 2)
    calibrated = compute_metrics(make_preds(labels, np.full(10, 0.8)), 0.5)
    assert calibrated["cal/ece"] == pytest.approx(0.0, abs=1e-6)  # 80% confident, 80% right
    half = compute_metrics(make_preds([1] * 5 + [0] * 5, np.full(10, 0.8)), 0.5)
    assert half["cal/ece"] == pytest.approx(0.3, abs=1e-6)  # 80% confident, 50% right
    # Top-label: P(FAKE) = 0.2 on REAL images is confidence 0.8 in REAL, just as well calibrated.
    mirrored = compute_metrics(make_preds(1 - labels, np.full(10, 0.2)), 0.5)
    assert mirrored["cal/ece"] == pytest.approx(0.0, abs=1e-6)


def test_uncertainty_that_flags_exactly_the_errors():
    m = compute_metrics(errors_flagged_preds(n=100, n_wrong=10), threshold=0.5)
    assert m["cls/acc"] == pytest.approx(0.9)
    for suffix in ("std", "entropy", "mi"):
        assert m[f"sc/auroc_{suffix}"] == 1.0
        assert m[f"sc/gap_{suffix}"] > 0.4
    accs = [m[f"sc/acc@reject{k}"] for k in (0, 5, 10, 20)]
    assert accs == pytest.approx([0.9, 90 / 95, 1.0, 1.0])
    assert m["sc/f1@reject10"] == 1.0 and m["sc/f1@reject0"] < 1.0
    # The oracle curve: no risk until the 90 correct images are all kept, then (k - 90) / k.
    kept = np.arange(1, 101)
    assert m["sc/aurc"] == pytest.approx(np.mean(np.clip(kept - 90, 0, None) / kept))


def test_uninformative_uncertainty_scores_chance():
    preds = errors_flagged_preds()
    preds.predictive_entropy = np.full(len(preds), 0.3)  # ties everywhere: no ranking information
    assert compute_metrics(preds, 0.5)["sc/auroc_entropy"] == 0.5


# ----------------------------------------------------------------------------------------------------------------------
# Calibration


def synthetic_sample_logits(n=4000, t=10, seed=0):
    """Sampled logits [T, N, 2] whose MC predictive is calibrated at temperature 1, and labels drawn from it."""
    gen = torch.Generator().manual_seed(seed)
    centre = 2.0 * torch.randn(n, generator=gen)
    diff = centre + 0.7 * torch.randn(t, n, generator=gen)
    logits = torch.stack([torch.zeros_like(diff), diff], dim=-1)
    p_fake = mc_log_predictive(logits, 1.0).exp()[:, 1]
    labels = torch.bernoulli(p_fake, generator=gen).long()
    return logits, labels


def test_fit_temperature_recovers_a_known_temperature():
    logits, labels = synthetic_sample_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(3.0 * logits, labels) == pytest.approx(3.0, rel=0.1)  # overconfident by 3x
    assert fit_temperature((logits / 2.0).numpy(), labels.numpy()) == pytest.approx(0.5, rel=0.1)


def test_choose_thresholds_beats_one_half_on_shifted_scores():
    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    # Every P(FAKE) is below 0.5, but FAKE scores sit higher: 0.5 flags nothing; a tuned threshold separates well.
    p_fake = np.where(labels == 1, rng.uniform(0.15, 0.35, 400), rng.uniform(0.0, 0.2, 400))
    preds = make_preds(labels, p_fake)
    thresholds = choose_thresholds(preds)
    assert set(thresholds) == {"0.5", "f1_optimal", "youden_j", "chosen"}
    assert thresholds["chosen"] == thresholds["f1_optimal"]
    assert 0.15 <= thresholds["f1_optimal"] <= 0.2 and 0.15 <= thresholds["youden_j"] <= 0.2
    assert compute_metrics(preds, thresholds["chosen"])["cls/f1"] > 0.8 > compute_metrics(preds, 0.5)["cls/f1"]
    assert choose_thresholds(preds, rule="youden_j")["chosen"] == thresholds["youden_j"]
    with pytest.raises(ValueError):
        choose_thresholds(preds, rule="best")


def test_thresholds_stay_inside_the_open_unit_interval():
    # Perfectly separated 0/1 scores put the curve's optimum on 1.0, which the config would refuse.
    labels = np.array([0, 1] * 5)
    thresholds = choose_thresholds(make_preds(labels, labels.astype(float)))
    assert all(0.0 < v < 1.0 for v in thresholds.values())
    BayesFakeConfig(threshold=thresholds["chosen"])


def test_choose_reject_entropy_sends_the_requested_share_to_review():
    entropy = np.linspace(0.0, math.log(2), 1001)
    preds = make_preds(np.arange(1001) % 2, np.full(1001, 0.5), entropy)
    reject = choose_reject_entropy(preds, reject_rate=0.10)
    assert np.mean(entropy > reject) == pytest.approx(0.10, abs=0.002)
    # All-certain validation still gives a positive value the config accepts.
    certain = choose_reject_entropy(make_preds([0, 1] * 5, [0.0, 1.0] * 5), reject_rate=0.10)
    assert BayesFakeConfig(reject_entropy=certain).reject_entropy > 0
    with pytest.raises(TypeError):
        choose_reject_entropy(preds, 0.5)  # keyword-only: a stray threshold can never pass as the rate


# ----------------------------------------------------------------------------------------------------------------------
# Prediction with a real (tiny) model


def test_predict_is_batched_seeded_and_matches_its_raw_logits():
    model = tiny_model(calibration_temperature=2.0)
    images, labels = random_split(10, seed=1)
    preds = predict(model, images, labels, num_samples=5, batch_size=4, progress=False, keep_sample_logits=True)
    assert preds.p_fake.shape == (10,) and preds.sample_logits.shape == (5, 10, 2)
    assert preds.std_fake.max() > 0  # MC dropout samples differ
    assert np.all(preds.mutual_information >= 0)
    # The raw logits are the very samples the model averaged, before its temperature.
    tempered = mc_log_predictive(torch.from_numpy(preds.sample_logits), 2.0).exp()[:, 1].numpy()
    np.testing.assert_allclose(tempered, preds.p_fake, atol=1e-5)
    again = predict(model, np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, num_samples=5, batch_size=4,
                    progress=False)
    np.testing.assert_array_equal(again.p_fake, preds.p_fake)  # same seed, same draws; NCHW input accepted
    with pytest.raises(ValueError):
        predict(model, images.astype(np.float32), labels, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Report and the whole flow


def test_write_report_writes_json_markdown_and_plots(tmp_path):
    preds = errors_flagged_preds()
    metrics = compute_metrics(preds, 0.5)
    report = write_report(metrics, preds, tmp_path, "demo", extra={"split": "val", "calibration": {"temperature": 1.5}})
    assert set(report["plots"]) == PLOTS
    for name in [*PLOTS, "report.json", "report.md"]:
        assert (tmp_path / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["name"] == "demo" and saved["split"] == "val" and saved["dataset"] == "CIFAKE"
    assert saved["metrics"]["cls/acc"] == pytest.approx(0.9) and saved["thresholds"] == {"chosen": 0.5}
    markdown = (tmp_path / "report.md").read_text()
    assert "`sc/auroc_mi`" in markdown and "temperature" in markdown and "![roc](roc.png)" in markdown


def test_undefined_metrics_are_written_as_null(tmp_path):
    labels = np.array([0, 1] * 5)
    preds = make_preds(labels, labels.astype(float))
    write_report(compute_metrics(preds, 0.5), preds, tmp_path, "perfect")
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and json.loads(text)["metrics"]["sc/auroc_entropy"] is None


def test_calibrate_and_evaluate_end_to_end(tmp_path):
    model = tiny_model()
    splits = {"val": random_split(40, seed=2), "test": random_split(30, seed=3)}
    report = calibrate_and_evaluate(model, splits, tmp_path, num_samples=4, batch_size=16, progress=False)
    config = model.config
    assert config.calibration_temperature == report["calibration"]["temperature"] > 0
    assert config.threshold == report["thresholds"]["chosen"] and 0 < config.threshold < 1
    assert config.reject_entropy == report["calibration"]["reject_entropy"] > 0
    assert report["calibration"]["val_nll_after"] <= report["calibration"]["val_nll_before"] + 1e-6
    assert report["metrics"]["meta/n"] == 30 and report["metrics"]["meta/threshold"] == config.threshold
    assert (tmp_path / "report.md").is_file() and all((tmp_path / p).is_file() for p in PLOTS)
    config.validate_bayesfake()


def test_certified_gated_evaluation_with_laundered_and_off_domain_sets(tmp_path, one_thread):
    """alpha: validation halves (fit / certify), the gate fitted on train, the rule certified, the stress report."""
    from train.offdomain import stress_sets

    model = tiny_model(domain_gate="features")
    train_images, train_labels = random_split(80, seed=1)
    splits = {"val": random_split(60, seed=2), "test": random_split(30, seed=3)}
    stress = stress_sets(model, *splits["test"], wild=None, launder_images_n=12)
    report = calibrate_and_evaluate(model, splits, tmp_path, num_samples=4, batch_size=16, progress=False,
                                    alpha=0.01, delta=0.1, gate_train=(train_images, train_labels), stress=stress)
    config = model.config
    assert report["domain_gate"]["fitted_on"] == 80 and config.domain_threshold == report["domain_gate"]["threshold"]
    # A random net cannot reach a 1% error bound on 30 images: nothing certified, everything in domain to review.
    assert config.abstention["calibration_n"] + config.abstention["calibration_out_of_domain"] == 30
    assert config.abstention["certified"] is False and config.reject_entropy is None
    assert report["metrics"]["sc/coverage"] == 0.0
    assert set(report["stress"]) == {"clean", "laundered/jpeg75", "laundered/jpeg50", "laundered/downup0.5",
                                     "laundered/crop75", "laundered/blur1"}
    assert report["stress"]["laundered/jpeg50"]["meta/n"] == 12
    assert 0.0 <= report["stress"]["laundered/blur1"]["ood/auroc"] <= 1.0
    assert "## Laundered and off-domain images" in (tmp_path / "report.md").read_text()
    config.validate_bayesfake()


def trained_folder(tmp_path, record_split: bool = True):
    """A tiny detector exported as training leaves it: OUT/final with train_history.json recording its split."""
    from hub_models.export import export_detector

    data = make_image_folder(tmp_path / "data", n_per_class=60, corrupt=0)
    model = tiny_model()
    model_dir = export_detector(model, tmp_path / "run" / "final")
    split = load_splits(str(data), decode_processor(model.config), val_fraction=0.3, seed=4).record
    train_config = {"data": str(data), "val_fraction": 0.3, "seed": 4}
    record = {"train_config": train_config, "history": [], **({"split": split} if record_split else {})}
    (model_dir / "train_history.json").write_text(json.dumps(record))
    return model_dir, record


def test_cli_calibrates_evaluates_and_exports(tmp_path, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    model_dir, record = trained_folder(tmp_path)
    out, exported = tmp_path / "eval", tmp_path / "released"
    report = evaluate.main([str(model_dir), "--out", str(out), "--export", str(exported), "--max-eval", "30",
                            "--num-samples", "3"])
    assert report["metrics"]["meta/n"] == 30 and report["name"] == "released"
    assert report["calibration"]["val_n"] == 30  # the recorded split (36 images) re-derived, then subsampled
    assert json.loads((out / "report.json").read_text())["metrics"]["cls/acc"] == report["metrics"]["cls/acc"]
    reloaded = AutoModel.from_pretrained(exported, trust_remote_code=True)
    assert reloaded.config.threshold == pytest.approx(report["thresholds"]["chosen"])
    assert reloaded.config.calibration_temperature == pytest.approx(report["calibration"]["temperature"])
    assert reloaded.config.metrics["cls/acc"] == report["metrics"]["cls/acc"]
    assert (exported / "reliability.png").is_file()
    assert "python -m train.evaluate" in (exported / "README.md").read_text()
    assert json.loads((exported / "train_history.json").read_text()) == record  # the record ships with the weights


def test_cli_evaluates_and_exports_in_int8(tmp_path, monkeypatch):
    """--int8-calibration: the backbone is quantized on training images before anything is fitted, and the export
    reloads as the same int8 network (the metrics were measured on what users load)."""
    from transformers import AutoModel

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    model_dir, _ = trained_folder(tmp_path)
    exported = tmp_path / "released"
    evaluate.main([str(model_dir), "--out", str(tmp_path / "eval"), "--export", str(exported), "--max-eval", "30",
                   "--num-samples", "3", "--int8-calibration", "20"])
    reloaded = AutoModel.from_pretrained(exported, trust_remote_code=True).eval()
    assert reloaded.config.int8_backbone and reloaded.is_quantized
    assert set(reloaded.backbone.int8_observers)  # the calibrated observers shipped as weights


def test_evaluation_refuses_a_validation_split_other_than_the_recorded_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    model_dir, record = trained_folder(tmp_path)
    model = tiny_model()
    splits = evaluate.evaluation_data(model, record, "test", progress=False)
    expected = load_splits(record["train_config"]["data"], decode_processor(model.config), 0.3, 4)
    assert np.array_equal(splits["val"][0], expected["val"][0]) and len(splits["test"][1]) == 36
    # The data changed under the run (an image removed): another validation split, refused.
    next((tmp_path / "data" / "REAL").glob("*.png")).unlink()
    with pytest.raises(ValueError, match="not the one the run recorded"):
        evaluate.main([str(model_dir), "--out", str(tmp_path / "eval")])
    with pytest.raises(ValueError, match="recorded its validation split with seed=4; got 5"):
        evaluate.evaluation_data(model, record, "test", split_seed=5)
    # No record: the split must be given by hand.
    (model_dir / "train_history.json").unlink()
    with pytest.raises(ValueError, match="pass --val-fraction and --split-seed"):
        evaluate.main([str(model_dir), "--out", str(tmp_path / "eval")])
    # A record written before the hash existed gives its config's fraction and seed, unchecked (with a warning).
    legacy = evaluate.evaluation_data(model, {"train_config": record["train_config"]}, "test", progress=False)
    assert len(legacy["val"][1]) == 36 and "unchecked" in caplog.text  # round(59 x 0.3) + round(60 x 0.3)
