"""BayesFakeConfig: every validated field refuses a bad value at construction, with a message naming it."""

import math

import pytest

from hub_models.configuration_bayesfake import HEAD_KINDS, SCRATCH_CNN, BayesFakeConfig

# (field overrides, field named in the error). Each is the smallest change from a valid config that breaks one rule.
BAD_VALUES = [
    (dict(backbone=""), "backbone"),
    (dict(backbone=3), "backbone"),
    (dict(cnn_widths=[8, 8]), "cnn_widths"),
    (dict(cnn_widths=[8, 0, 8]), "cnn_widths"),
    (dict(head="bayes"), "head"),
    (dict(head_hidden=[8, 0]), "head_hidden"),
    (dict(head="gaussian_nb", head_hidden=[8]), "head_hidden"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=math.nan), "dropout"),
    (dict(head="mc_dropout", dropout=0.0), "dropout"),
    (dict(variational_layer="gaussian"), "variational_layer"),
    (dict(variational_scope="backbone"), "variational_scope"),
    (dict(head="variational", variational_scope="all", backbone="resnet18"), "variational_scope"),
    (dict(prior_sigma=0.0), "prior_sigma"),
    (dict(prior_sigma=-1.0), "prior_sigma"),
    (dict(prior_sigma=math.inf), "prior_sigma"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=2.5), "num_samples"),
    (dict(num_samples=True), "num_samples"),
    (dict(num_samples="30"), "num_samples"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.0), "threshold"),
    (dict(threshold=math.nan), "threshold"),
    (dict(calibration_temperature=0.0), "calibration_temperature"),
    (dict(calibration_temperature=-1.0), "calibration_temperature"),
    (dict(calibration_temperature=math.inf), "calibration_temperature"),
    (dict(reject_entropy=0.0), "reject_entropy"),
    (dict(reject_entropy=-0.5), "reject_entropy"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=32.0), "image_size"),
    (dict(image_size=True), "image_size"),
    (dict(source_image_size=0), "source_image_size"),
    (dict(source_image_size=32.0), "source_image_size"),
    (dict(image_mean=[0.5, 0.5]), "image_mean"),
    (dict(image_std=[0.5, 0.5]), "image_std"),
    (dict(image_std=[0.5, 0.0, 0.5]), "image_std"),
    (dict(resample="box"), "resample"),
    (dict(training_domain={"CIFAKE": "32x32 photos"}), "training_domain"),  # what YAML makes of an unquoted "a: b"
    (dict(num_labels=3), "num_labels"),
    (dict(id2label={0: "REAL", 1: "FAKE", 2: "OTHER"}), "num_labels"),
]


@pytest.mark.parametrize("overrides,field", BAD_VALUES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_VALUES)])
def test_bad_value_raises_clear_value_error(overrides, field):
    with pytest.raises(ValueError, match=rf"BayesFakeConfig\.{field}="):
        BayesFakeConfig(**overrides)


def test_every_validated_field_is_covered():
    validated = {
        "backbone", "cnn_widths", "head", "head_hidden", "dropout", "variational_layer", "variational_scope",
        "prior_sigma", "num_samples", "threshold", "calibration_temperature", "reject_entropy", "image_size",
        "source_image_size", "image_mean", "image_std", "resample", "training_domain", "num_labels",
    }
    assert validated == {field for _, field in BAD_VALUES}


def test_training_image_size_is_the_source_size_else_the_input_size():
    assert BayesFakeConfig(image_size=64).training_image_size == 64
    config = BayesFakeConfig(image_size=128, source_image_size=32)
    assert config.training_image_size == 32 and config.image_size == 128
    assert BayesFakeConfig.from_dict(config.to_dict()).training_image_size == 32


def test_defaults():
    config = BayesFakeConfig()
    assert config.id2label == {0: "REAL", 1: "FAKE"}
    assert config.label2id == {"REAL": 0, "FAKE": 1}
    assert config.num_labels == 2
    assert config.model_type == "bayesfake"
    assert config.backbone == SCRATCH_CNN
    assert config.head in HEAD_KINDS
    assert config.reject_entropy is None
    assert config.metrics == {}
    assert config.stochastic
    assert not BayesFakeConfig(head="deterministic").stochastic


@pytest.mark.parametrize("head", HEAD_KINDS)
def test_valid_values_accepted(head, tiny_config_kwargs):
    hidden = [] if head == "gaussian_nb" else [8]
    config = BayesFakeConfig(head=head, dropout=0.0 if head != "mc_dropout" else 0.2, reject_entropy=0.5,
                             variational_scope="all", variational_layer="flipout",
                             **{**tiny_config_kwargs, "head_hidden": hidden})
    assert config.cnn_widths == [4, 8, 8] and config.head_hidden == hidden
    # A timm backbone is fine with a head-only variational scope (the model is not built here).
    BayesFakeConfig(backbone="resnet18", head=head, dropout=0.1)


def test_save_load_round_trip(tmp_path, tiny_config_kwargs):
    config = BayesFakeConfig(head="variational", variational_layer="flipout", variational_scope="all",
                             prior_mu=0.1, prior_sigma=0.5, threshold=0.4, calibration_temperature=1.3,
                             reject_entropy=0.6, metrics={"cls/acc": 0.9}, training_domain="CIFAKE 32x32",
                             image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4], **tiny_config_kwargs)
    config.save_pretrained(tmp_path)
    loaded = BayesFakeConfig.from_pretrained(tmp_path)
    for key in ("head", "variational_layer", "variational_scope", "prior_mu", "prior_sigma", "threshold",
                "calibration_temperature", "reject_entropy", "metrics", "training_domain", "image_mean", "image_std",
                "cnn_widths", "head_hidden", "num_samples"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.id2label == {0: "REAL", 1: "FAKE"}
    assert loaded.label2id == {"REAL": 0, "FAKE": 1}


def test_invalid_file_refused_on_load(tmp_path, tiny_config_kwargs):
    """A hand-edited config.json with a bad value fails at load, not later at inference."""
    import json

    BayesFakeConfig(**tiny_config_kwargs).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["threshold"] = 1.5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"BayesFakeConfig\.threshold="):
        BayesFakeConfig.from_pretrained(tmp_path)
