"""The backbone x classifier study: classical heads with a calibrated, sampled predictive (train.classical), the
study's views of images (train.study_data), its resumable runner and report (train.study, train.study_report)."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from train.classical import (
    CLASSIFIERS,
    REDUCTIONS,
    ScoreCalibrator,
    fit_predict,
    members_to_predictions,
)
from train.metrics import calibration_metrics
from train.study import (BackboneUnavailable, Store, StudyConfig, deal_cells, load_backbone, load_study_config,
                         run_study)
from train.study_data import apply_geometry, view_images


def blobs(n=400, d=12, shift=1.2, seed=0):
    """Two Gaussian classes in d dimensions, means `shift` apart along every axis."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d)) + shift * y[:, None] / math.sqrt(d) * 3
    return x.astype(np.float32), y


@pytest.mark.parametrize("classifier", sorted(CLASSIFIERS))
def test_every_classifier_learns_and_reports_a_sampled_predictive(classifier, one_thread):
    x, y = blobs(300)
    xt, yt = blobs(200, seed=1)
    preds, info = fit_predict(classifier, x[:200], y[:200], x[200:], y[200:], {"test": (xt, yt)}, bootstrap=3)
    test = preds["test"]
    assert test.num_samples == 3 and len(test) == 200
    assert np.all((test.p_fake >= 0) & (test.p_fake <= 1))
    assert np.mean((test.p_fake >= 0.5) == yt) > 0.8  # well-separated classes
    assert np.all(test.mutual_information >= 0) and np.all(test.predictive_entropy <= math.log(2) + 1e-6)
    assert "val" in preds and "val_auc_choice" in info


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(reduction, one_thread):
    x, y = blobs(300, d=40)
    preds, _ = fit_predict("logistic", x[:200], y[:200], x[200:], y[200:], {"test": (x[200:], y[200:])},
                           reduction=reduction, reduction_dim=5, bootstrap=2)
    assert np.mean((preds["test"].p_fake >= 0.5) == y[200:]) > 0.8


def test_nan_features_are_an_error_not_a_verdict():
    x, y = blobs(100)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_predict("logistic", bad, y, x, y, {"test": (x, y)})
    with pytest.raises(ValueError, match="non-finite"):
        fit_predict("logistic", x, y, x, y, {"test": (bad, y)})
    with pytest.raises(ValueError, match="unknown classifier"):
        fit_predict("qda_typo", x, y, x, y, {})
    with pytest.raises(ValueError, match="both classes"):
        fit_predict("logistic", x, np.zeros_like(y), x, y, {})


def test_calibration_repairs_an_overconfident_score():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(np.int64)  # true P(FAKE) = sigmoid(z)
    overconfident = 8 * z  # a score 8x too sharp
    raw = members_to_predictions(y[2000:], (1 / (1 + np.exp(-overconfident[2000:])))[None])
    for method in ("sigmoid", "isotonic"):
        p = ScoreCalibrator(method).fit(overconfident[:2000], y[:2000]).predict(overconfident[2000:])
        fixed = members_to_predictions(y[2000:], p[None])
        assert calibration_metrics(fixed)["cal/ece"] < 0.04 < calibration_metrics(raw)["cal/ece"]


def test_members_disagreeing_is_epistemic_uncertainty():
    labels = np.array([0, 1, 1])
    agree = members_to_predictions(labels, np.array([[0.5, 0.9, 0.2]] * 4))
    assert np.allclose(agree.mutual_information, 0, atol=1e-6) and np.allclose(agree.std_fake, 0)
    split = members_to_predictions(labels, np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]]))
    assert split.mutual_information[0] == pytest.approx(math.log(2), abs=1e-5)  # all epistemic
    assert split.mutual_information[2] == pytest.approx(0, abs=1e-6)  # all aleatoric
    with pytest.raises(ValueError, match="NaN"):
        members_to_predictions(labels, np.array([[0.1, np.nan, 0.2]]))


def test_geometries_and_transforms_give_backbone_sized_squares():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :150] = 255  # left half white
    image = Image.fromarray(wide)
    assert apply_geometry(image, "centre", 32, "bicubic").shape == (32, 32, 3)
    squash = apply_geometry(image, "squash", 32, "bicubic")
    assert squash[:, :14].mean() > 250 and squash[:, 18:].mean() < 5  # the whole frame, squeezed
    left, right = apply_geometry(image, "crop1", 64, "bicubic"), apply_geometry(image, "crop2", 64, "bicubic")
    assert left.mean() > 250 and right.mean() < 5  # top-left vs top-right corner at the stored resolution
    with pytest.raises(ValueError, match="unknown geometry"):
        apply_geometry(image, "crop9", 32, "bicubic")

    class Images:
        images = [_jpeg(wide)]

        def __len__(self):
            return 1

    for transform in ("none", "blur", "jitter", "jpeg", "resize"):
        assert view_images(Images(), transform, "lowres", 32, "bicubic", 0).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown transform"):
        view_images(Images(), "sharpen", "centre", 32, "bicubic", 0)


def _jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_unavailable_and_unknown_backbones_fail_clearly(tmp_path):
    with pytest.raises(BackboneUnavailable, match="not obtainable offline"):
        load_backbone("clip_vitb16", "../shared/weights")
    with pytest.raises(ValueError, match="unknown backbone"):
        StudyConfig(backbones=["resnet9000"])
    config = tmp_path / "c.yaml"
    config.write_text("name: x\nbootstrapp: 3\n")
    with pytest.raises(ValueError, match="unknown study config key"):
        load_study_config(config)


def test_store_ignores_a_torn_last_line(tmp_path):
    store = Store(tmp_path / "r.jsonl")
    store.put("a", {"x": 1})
    with open(tmp_path / "r.jsonl", "a") as handle:
        handle.write('{"id": "b", "x"')  # killed mid-write
    assert Store(tmp_path / "r.jsonl").records == {"a": {"id": "a", "x": 1}}


def test_two_workers_on_one_store_see_each_others_cells(tmp_path):
    mine, other = Store(tmp_path / "r.jsonl"), Store(tmp_path / "r.jsonl")
    other.put("c", {"x": 2})
    assert mine.get("c") is None
    mine.refresh()
    assert mine.get("c") == {"id": "c", "x": 2}


def _dataset(folder, splits: dict[str, list[tuple[int, str, str]]], size, seed):
    """A parquet data set in the layout of ../shared/data (image {bytes, path}, label, source, generator, sha1)."""
    rng = np.random.default_rng(seed)
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        images, labels, sources, generators, sha1s = [], [], [], [], []
        for i, (label, source, generator) in enumerate(rows):
            h, w = size if label == 0 else (size[0], size[0])
            base = rng.integers(0, 255, size=(h, w, 3)) if label == 1 else np.full((h, w, 3), rng.integers(60, 200))
            data = _jpeg(base.astype(np.uint8))
            images.append({"bytes": data, "path": f"{i}.jpg"})
            labels.append(label)
            sources.append(source)
            generators.append(generator)
            sha1s.append(f"{split}{i:05d}")
        table = pa.table({"image": images, "label": labels, "source": sources, "generator": generators,
                          "sha1": sha1s})
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")


def _tiny_study(tmp_path, monkeypatch, store: str = "store.jsonl", report: str = "report") -> StudyConfig:
    """A tiny study on synthetic parquet data with the released CIFAKE CNN's trunk (32 px, fast)."""
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    if not (tmp_path / "cifake").exists():
        cifake = [(i % 2, "c", "none" if i % 2 == 0 else "sd") for i in range(40)]
        _dataset(tmp_path / "cifake", {"train": cifake, "test": cifake[:20]}, (32, 32), 0)
        wild_train = [(0, "photos", "none")] * 16 + [(1, "gen", "gen-a")] * 8 + [(1, "gen", "gen-b")] * 8
        wild_test = [(0, "other-photos", "none")] * 8 + [(1, "gen", "gen-c")] * 8
        _dataset(tmp_path / "wild", {"train": wild_train, "test": wild_test}, (48, 64), 1)
    return StudyConfig(cifake=str(tmp_path / "cifake"), wild=str(tmp_path / "wild"), cifake_train=16, cifake_val=10,
                       cifake_test=12, wild_val_fraction=0.25, backbones=["cifake_cnn", "dino_vitb16"],
                       classifiers=["knn3"], reductions=["none", "pca"], reduction_dims=[2, 4],
                       bootstrap=2, logo_backbones=["cifake_cnn"], logo_classifiers=["logistic"],
                       shortcut_backbones=["cifake_cnn"], shortcut_classifiers=["logistic"],
                       transform_backbones=["cifake_cnn"], transform_classifiers=["logistic"],
                       transforms=["none", "jpeg"], crops_backbones=["cifake_cnn"], crops_classifiers=["logistic"],
                       store=str(tmp_path / store), out_dir=str(tmp_path / report))


def test_study_runs_end_to_end_resumes_and_reports(tmp_path, monkeypatch, one_thread):
    """Every experiment runs, a rerun computes nothing and reuses every cell, the report is written, DINO is refused
    with its reason."""
    cfg = _tiny_study(tmp_path, monkeypatch)
    first = run_study(cfg, progress=False)
    # main: 2 train sets x 2 reductions; crops 1; shortcut 2; logo 2 generators; transform 2 train sets x 2
    assert first["computed"] == 4 + 1 + 2 + 2 + 4 and first["reused"] == 0
    assert "dino_vitb16" in first["refused"] and "not obtainable offline" in first["refused"]["dino_vitb16"]
    second = run_study(cfg, progress=False)
    assert second["computed"] == 0 and second["reused"] == first["computed"]
    # --report-only: the report again from the store, no invocation recorded (the line below still counts two)
    assert run_study(cfg, progress=False, report_only=True)["computed"] == 0
    report = (tmp_path / "report" / "results.md").read_text()
    for section in ("train on A, test on B", "Shortcut check", "Leave one generator out", "Five crops",
                    "Transforms at train time"):
        assert section in report
    assert "2 recorded invocation(s)" in report
    rows = (tmp_path / "report" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"acc", "auroc", "ece", "err_auroc"} <= set(header)
    assert len(rows) > 1 + 4
    assert list((tmp_path / "report").glob("heatmap_acc_train-wild_test-wild.png"))
    records = [json.loads(line) for line in (tmp_path / "store.jsonl").read_text().splitlines()]
    logo = [r for r in records if r.get("cell", {}).get("experiment") == "logo"]
    assert {r["cell"]["holdout"] for r in logo} == {"gen-a", "gen-b"}
    for record in logo:  # the held-out generator is tested, never trained on
        assert list(record["results"]) == ["val", f"heldout:{record['cell']['holdout']}"]


def test_worker_processes_share_the_cells_and_give_the_same_results(tmp_path, monkeypatch, one_thread):
    """``workers=2``: two processes on one store compute every cell exactly once (claimed, never twice), and each cell's
    results are those of the one-process run (seeded per cell, whoever runs it)."""
    one = run_study(_tiny_study(tmp_path, monkeypatch, "one.jsonl", "one"), progress=False)
    two = run_study(_tiny_study(tmp_path, monkeypatch, "two.jsonl", "two"), progress=False, workers=2)
    assert two["computed"] == one["computed"] == 13 and two["reused"] == 0

    def cells(name):
        records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return [r for r in records if "cell" in r]

    ran = cells("two.jsonl")
    assert len(ran) == len({r["id"] for r in ran}) == 13  # no cell ran twice
    expected = {r["id"]: r["results"] for r in cells("one.jsonl")}
    assert {r["id"]: r["results"] for r in ran} == expected
    report = (tmp_path / "two" / "results.md").read_text()
    assert "2 worker process(es)" in report
    with pytest.raises(ValueError, match="workers"):
        run_study(_tiny_study(tmp_path, monkeypatch, "bad.jsonl", "bad"), progress=False, workers=0)


def test_cells_are_dealt_by_backbone_heaviest_first():
    cells = [dict(experiment="main", backbone=b, train=t, classifier="lda", reduction="none", train_tf="none",
                  test_tf="none", geometry="centre", holdout="")
             for b in ("cifake_cnn", "mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite2")
             for t in ("wild", "cifake")]
    dealt = deal_cells(cells, 2)
    backbones = [{c["backbone"] for c in part} for part in dealt]
    assert backbones == [{"tf_efficientnet_lite2", "cifake_cnn"}, {"mobilenetv2_100", "tf_efficientnet_lite0"}]
    assert sorted(map(json.dumps, [c for part in dealt for c in part])) == sorted(map(json.dumps, cells))
