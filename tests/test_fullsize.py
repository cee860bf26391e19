"""The multi-view (full-size) detector: views of any image, phone-format inputs, the model's [B, K, 3, S, S] contract,
the wild validation split, and the released detector on phone-like files."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub_models import BayesFakeConfig, BayesFakeDetector, BayesFakeImageProcessor
from hub_models.golden import golden_pixel_values
from hub_models.image_processing_bayesfake import load_image
from train.wild import WildSplit, layout_features

pytestmark = pytest.mark.usefixtures("one_thread")

HUB_MODELS = Path(__file__).resolve().parent.parent / "hub_models"
# Every full-size release: each must take what a phone produces.
FULLSIZE_RELEASES = ("wild-effnetlite2-multiview", "wild-effnetlite0-multiview")
SIZE = 32


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def left_red_right_blue(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    return Image.fromarray(pixels)


def rotated_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view"), as phones write them: upright,
    its left half is red and its right half blue."""
    stored = left_red_right_blue(width, height).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(stored, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture
def processor():
    return BayesFakeImageProcessor(size=SIZE, view_layout="whole_corners", view_max_side=64)


def test_views_of_any_size_and_format(processor):
    image = left_red_right_blue(400, 300)
    for data in (encoded(image, "JPEG", quality=90), encoded(image, "PNG"), encoded(image, "WEBP", quality=90),
                 image, np.asarray(image)):
        out = processor(data)["pixel_values"]
        assert out.shape == (1, 5, 3, SIZE, SIZE)
        assert torch.isfinite(out).all()
        # view 1 is the top-left corner (red), view 2 the top-right corner (blue), at the 64 px copy's scale
        assert out[0, 1, 0].mean() > 0.9 and out[0, 1, 2].mean() < -0.9
        assert out[0, 2, 2].mean() > 0.9 and out[0, 2, 0].mean() < -0.9


def test_exif_rotation_honoured(processor):
    out = processor(rotated_jpeg(400, 300))["pixel_values"]
    assert out[0, 1, 0].mean() > 0.9  # top-left corner of the upright image is red
    assert out[0, 2, 2].mean() > 0.9  # top-right is blue


def test_jpeg_draft_decodes_a_phone_photo_small():
    data = encoded(left_red_right_blue(4000, 3000), "JPEG", quality=90)
    assert load_image(data).size == (4000, 3000)
    small = load_image(data, draft_size=(512, 260))
    assert small.size == (1000, 750)  # 1/4 scale: the smallest DCT scale with longer side >= 512, shorter >= 260
    out = BayesFakeImageProcessor(size=SIZE, view_layout="five_crop", view_max_side=64)(data)["pixel_values"]
    assert out.shape == (1, 5, 3, SIZE, SIZE)


def test_small_and_extreme_images_still_give_full_views(processor):
    for size in ((10, 7), (2000, 40)):
        out = processor(left_red_right_blue(*size))["pixel_values"]
        assert out.shape == (1, 5, 3, SIZE, SIZE)


def test_bad_files_are_clear_errors(processor):
    with pytest.raises(ValueError, match="not a readable image"):
        processor(b"definitely not an image")
    truncated = encoded(left_red_right_blue(200, 100), "JPEG")[:300]
    with pytest.raises(ValueError, match="not a readable image"):
        processor(truncated)
    with pytest.raises(ValueError, match="view_layout"):
        BayesFakeImageProcessor(size=SIZE, view_layout="tiles9")


def tiny_multiview(layout: str = "whole_corners") -> BayesFakeDetector:
    torch.manual_seed(0)
    config = BayesFakeConfig(backbone="tf_efficientnet_lite0", image_size=SIZE, head="mc_dropout", head_hidden=[8],
                             dropout=0.3, view_layout=layout, view_max_side=64)
    model = BayesFakeDetector(config).eval()
    with torch.no_grad():  # the head starts at zero (P = 0.5 everywhere): give it weights that sampling can move
        for parameter in model.head.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def test_model_averages_the_views_and_samples_only_the_head():
    model = tiny_multiview()
    x = BayesFakeImageProcessor.from_config(model.config)([left_red_right_blue(300, 200),
                                                           left_red_right_blue(90, 120)])["pixel_values"]
    assert x.shape == (2, 5, 3, SIZE, SIZE)
    out = model(x, num_samples=30, seed=1)
    per_view = torch.stack([model.backbone(x[:, k]) for k in range(5)], 1).mean(1)
    same = model.forward_features(per_view, num_samples=30, seed=1)
    torch.testing.assert_close(out.probs, same.probs, atol=1e-5, rtol=0)
    assert out.sample_probs.shape == (30, 2, 2) and out.sample_probs[:, 0, 1].std() > 0
    alone = model(x[1:], num_samples=30, seed=1)  # an image gives the same answer alone or in a batch
    torch.testing.assert_close(alone.probs[0], model(x, num_samples=30, seed=1).probs[1], atol=1e-5, rtol=0)


def test_model_refuses_the_wrong_layout():
    model = tiny_multiview()
    with pytest.raises(ValueError, match=r"\[B, 5, 3, 32, 32\]"):
        model(torch.zeros(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\[B, 5, 3, 32, 32\]"):
        model(torch.zeros(2, 6, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 5, 3, SIZE, SIZE), float("nan")))
    with pytest.raises(ValueError, match="view_layout"):
        BayesFakeConfig(view_layout="whole_corners")  # the from-scratch CNN has no multi-view mode


def test_golden_inputs_of_a_multiview_detector():
    model = tiny_multiview("five_crop")
    pixels = golden_pixel_values(model.config)
    assert pixels.shape == (6, 5, 3, SIZE, SIZE)
    assert model(pixels, num_samples=3).probs.shape == (6, 2)


def test_layout_features_are_the_mean_of_their_views():
    views = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    np.testing.assert_allclose(layout_features(views, "center"), views[:, 0])
    np.testing.assert_allclose(layout_features(views, "five_crop"), views[:, 1:].mean(1))
    np.testing.assert_allclose(layout_features(views, "whole_corners"), views[:, :5].mean(1))


def test_validation_split_holds_groups_out_whole():
    from train.fullsize import validation_split

    labels = np.array([0] * 40 + [1] * 60)
    sources = np.array(["A"] * 30 + ["B"] * 10 + ["web"] * 60)
    generators = np.array(["none"] * 40 + ["g1"] * 30 + ["g2"] * 30)
    data = WildSplit([b""] * 100, labels, sources, generators)
    fit, val = validation_split(data, ["B", "g2"], 0.2, seed=0)
    assert set(fit) | set(val) == set(range(100)) and not set(fit) & set(val)
    assert set(data.group[fit]) == {"A", "g1"}  # held-out groups never reach fitting
    assert (data.group[val] == "B").sum() == 10 and (data.group[val] == "g2").sum() == 30
    assert (data.group[val] == "A").sum() == 6 and (data.group[val] == "g1").sum() == 6
    fit2, val2 = validation_split(data, ["B", "g2"], 0.2, seed=0)
    assert (val == val2).all()
    with pytest.raises(ValueError, match="not in wild train"):
        validation_split(data, ["nope"], 0.2, seed=0)


@pytest.mark.parametrize("name", FULLSIZE_RELEASES)
def test_released_detector_accepts_what_a_phone_produces(name):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(HUB_MODELS / name, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(HUB_MODELS / name, trust_remote_code=True)
    photo = left_red_right_blue(4000, 3000)
    files = [rotated_jpeg(4000, 3000), encoded(photo.resize((1200, 900)), "PNG"),
             encoded(photo.resize((1600, 1200)), "WEBP", quality=80), encoded(photo, "JPEG", quality=85)]
    x = processor(files)["pixel_values"]
    assert x.shape == (4, model.config.num_views, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        out = model(x, num_samples=30)
    assert torch.isfinite(out.probs).all() and out.in_domain.shape == (4,)
    assert all(v in ("likely AI-generated", "likely real", "uncertain: needs human review",
                     "outside what this detector was trained on: no verdict") for v in model.verdicts(out))
    assert model.config.training_data == ["wild"]


def test_explain_gives_one_saliency_map_per_image_over_the_views():
    model = tiny_multiview()
    x = BayesFakeImageProcessor.from_config(model.config)([left_red_right_blue(300, 200)] * 2)["pixel_values"]
    why = model.explain(x, num_samples=8)
    assert why["saliency"].shape == (2, SIZE, SIZE) and why["saliency"].max() > 0
    torch.testing.assert_close(why["output"].probs, model(x, num_samples=8, seed=0).probs, atol=1e-5, rtol=0)


def test_space_does_not_warn_about_size_for_a_multiview_detector():
    from space.detectors import InputImage, domain_warnings

    image = InputImage("photo.jpg", Image.new("RGB", (4000, 3000)), "RGB", "JPEG", 1)
    assert domain_warnings(image, tiny_multiview().config) == []
    thumbnail_detector = BayesFakeConfig(image_size=32)
    assert any("far from the training data" in w for w in domain_warnings(image, thumbnail_detector))


def test_one_registry_of_view_layouts():
    from hub_models.configuration_bayesfake import VIEW_LAYOUTS, VIEW_NAMES

    assert VIEW_LAYOUTS["center"] == 1
    assert all(VIEW_LAYOUTS[name] == len(views) for name, views in VIEW_NAMES.items())
    assert set(VIEW_LAYOUTS) == {"center", *VIEW_NAMES}
    for layout in VIEW_NAMES:  # every layout the config accepts is one the processor cuts, and the other way round
        config = BayesFakeConfig(backbone="tf_efficientnet_lite0", image_size=SIZE, view_layout=layout,
                                 view_max_side=64)
        out = BayesFakeImageProcessor.from_config(config)(left_red_right_blue(400, 300))["pixel_values"]
        assert out.shape == (1, config.num_views, 3, SIZE, SIZE)


def test_fewer_view_layouts_cut_the_views_they_name():
    image = left_red_right_blue(400, 300)
    diagonal = BayesFakeImageProcessor(size=SIZE, view_layout="diagonal", view_max_side=64)(image)["pixel_values"]
    assert diagonal.shape == (1, 3, 3, SIZE, SIZE)
    assert diagonal[0, 0, 0].mean() > 0.9 and diagonal[0, 2, 2].mean() > 0.9  # top-left red, bottom-right blue
    pair = BayesFakeImageProcessor(size=SIZE, view_layout="whole_centre", view_max_side=64)(image)["pixel_values"]
    assert pair.shape == (1, 2, 3, SIZE, SIZE)
    # the whole view is resized and centre-cropped: half red, half blue; the centre crop straddles the boundary too
    assert abs(pair[0, 0, 0].mean() - pair[0, 0, 2].mean()) < 0.2
    np.testing.assert_allclose(layout_features(np.arange(12.0).reshape(1, 6, 2), "whole_centre"), [[5.0, 6.0]])


def synthetic_wild(n_per_group: int = 24, dim: int = 1280, seed: int = 0):
    """Features [N, dim] and a WildSplit of two real sources and three generators: FAKE features are shifted."""
    rng = np.random.default_rng(seed)
    groups = [("A", "none", 0), ("B", "none", 0), ("web", "g1", 1), ("web", "g2", 1), ("web", "g3", 1)]
    sources, generators, labels = (np.array([g[i] for g in groups for _ in range(n_per_group)]) for i in range(3))
    labels = labels.astype(np.int64)
    features = rng.normal(size=(len(labels), dim)).astype(np.float32) + 0.15 * labels[:, None]
    return features, WildSplit([b""] * len(labels), labels, sources, generators)


def test_leave_one_group_out_predicts_each_image_by_the_head_that_never_saw_its_group():
    from train.fullsize import fold_heads, group_folds, out_of_fold_predictions
    from train.prediction import predict

    features, data = synthetic_wild()
    folds = group_folds(data)
    assert len(folds) == 5
    for fit, held in folds:
        assert len(set(data.group[held])) == 1 and data.group[held][0] not in set(data.group[fit])
    model = tiny_multiview()
    cfg = {"epochs": 3, "lr": 1e-3, "weight_decay": 1e-3, "seed": 0}
    heads = fold_heads(model, features, data.labels, folds, [8], cfg)
    oof = out_of_fold_predictions(model, features, data.labels, folds, heads, keep_sample_logits=True)
    assert oof.sample_logits.shape == (30, len(data), 2)
    _, held = folds[3]
    model.head = heads[3]
    direct = predict(model, features[held], data.labels[held], progress=False)
    np.testing.assert_allclose(oof.p_fake[held], direct.p_fake, atol=1e-6)
    np.testing.assert_array_equal(oof.labels, data.labels)


def test_grouped_calibration_sets_every_fitted_value_and_keeps_the_final_head():
    from train.domain import attach_domain_gate, fit_domain_gate
    from train.fullsize import calibrate_grouped, fold_heads, group_folds, train_head

    features, data = synthetic_wild()
    model = tiny_multiview()
    cfg = {"epochs": 5, "lr": 1e-3, "weight_decay": 1e-3, "seed": 0, "alpha": 0.4, "delta": 0.1}
    folds = group_folds(data)
    heads = fold_heads(model, features, data.labels, folds, [8], cfg)
    train_head(model, features, data.labels, cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["seed"])
    attach_domain_gate(model, "features")
    fit_domain_gate(model, features, data.labels, progress=False)
    final_head, final_gate = model.head, model.domain_gate
    fitted = calibrate_grouped(model, features, data, folds, heads, cfg)
    assert model.head is final_head and model.domain_gate is final_gate and model.config.domain_gate == "features"
    assert model.config.domain_threshold == fitted["domain_threshold"] > 0
    assert model.config.calibration_temperature == fitted["calibration"]["temperature"] > 0
    assert 0 < model.config.threshold < 1
    assert fitted["abstention"]["alpha"] == 0.4 and fitted["calibration"]["certify_n"] == len(data) // 2
    out = model.forward_features(torch.from_numpy(features[:4]), num_samples=30)
    assert out.in_domain.shape == (4,) and len(model.verdicts(out)) == 4


def test_choose_layout_prefers_fewer_views_within_the_tolerance():
    from train.fullsize import choose_layout

    candidates = {"a": ("five_crop", [], None), "b": ("whole_centre", [], None), "c": ("diagonal", [], None)}
    scores = {"a": 0.900, "b": 0.897, "c": 0.880}
    assert choose_layout(scores, candidates, 0.0) == "a"
    assert choose_layout(scores, candidates, 0.005) == "b"
    assert choose_layout(scores, candidates, 0.05) == "b"


def test_spread_groups_are_dealt_over_the_folds_of_the_others():
    from train.fullsize import group_folds

    _, data = synthetic_wild(n_per_group=20)
    folds = group_folds(data, ["A"], seed=0)
    assert len(folds) == 4  # B, g1, g2, g3 held out whole; A's 20 images dealt over those 4 folds
    held_a = [int((data.group[held] == "A").sum()) for _, held in folds]
    assert sum(held_a) == 20 and min(held_a) == 5
    for fit, held in folds:
        whole = set(data.group[held]) - {"A"}
        assert len(whole) == 1 and not whole & set(data.group[fit])
    assert [list(h) for _, h in folds] == [list(h) for _, h in group_folds(data, ["A"], seed=0)]
    with pytest.raises(ValueError, match="spread_groups"):
        group_folds(data, ["nope"])


def test_speed_results_keep_one_section_per_detector(tmp_path):
    from benchmarks.bench_fullsize import replace_section

    path = tmp_path / "results.md"
    replace_section(path, "a 1.0.0", "## a 1.0.0\n\nfirst\n")
    replace_section(path, "design x", "## design x\n\nslow\n")
    replace_section(path, "a 1.0.0", "## a 1.0.0\n\nsecond\n")
    text = path.read_text()
    assert text.startswith("# Full-size detectors") and "first" not in text
    assert text.index("## a 1.0.0") < text.index("second") < text.index("## design x") < text.index("slow")


def test_group_rows_answer_nothing_when_the_rule_was_not_certified():
    """The per-generator / per-source table says what the detector's verdicts do: a detector whose reject rule could
    not be certified sends every image to review, whatever reject entropy its config still holds."""
    from train.fullsize import group_rows
    from train.prediction import Predictions

    _, data = synthetic_wild(n_per_group=4, dim=4)
    n = len(data)
    p_fake = np.where(data.labels == 1, 0.9, 0.1)
    entropy = np.full(n, 0.3)
    preds = Predictions(labels=data.labels, p_fake=p_fake, std_fake=np.zeros(n), predictive_entropy=entropy,
                        mutual_information=np.zeros(n), expected_entropy=entropy, num_samples=30)
    model = tiny_multiview()
    model.config.reject_entropy = 0.5
    model.config.abstention = {"certified": True}
    answered = {row["name"]: row["answered"] for row in group_rows(preds, data, model)}
    assert set(answered) == {"A", "B", "web", "g1", "g2", "g3"} and set(answered.values()) == {1.0}
    assert preds.answered_outcome(model)["sc/coverage"] == 1.0
    model.config.abstention = {"certified": False}
    rows = group_rows(preds, data, model)
    assert {row["answered"] for row in rows} == {0.0} and {row["uncertain"] for row in rows} == {1.0}
    assert preds.answered_outcome(model)["sc/coverage"] == 0.0
