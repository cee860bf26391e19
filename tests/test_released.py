"""The released detector folders: complete, shipping exactly the package's code, loadable offline by repo id."""

import json

import pytest
import torch

from hub_models.hub import CODE_FILES, DEFAULT_REPO_IDS, HUB_MODELS_DIR, bundled_folder, check_repo_folder, load_detector


@pytest.mark.parametrize("repo_id", DEFAULT_REPO_IDS)
def test_released_folder_ships_the_package_code_and_loads(repo_id):
    folder = check_repo_folder(bundled_folder(repo_id))
    for name in CODE_FILES:  # a Hub repo needs its own copy; it must never drift from the one source of truth
        assert (folder / name).read_bytes() == (HUB_MODELS_DIR / name).read_bytes(), f"{folder / name} drifted"
    model, processor = load_detector(repo_id)
    # The config carries the metrics its own report measured (the Space and the card show them).
    report = json.loads((folder / "eval_report.json").read_text())
    assert model.config.metrics["cls/acc"] == pytest.approx(report["metrics"]["cls/acc"]) and report["split"] == "test"
    assert model.config.metrics["cls/acc"] > 0.75  # every released detector is far better than chance on CIFAKE
    # The training record that ships with the weights is the run that made them (same architecture).
    history = json.loads((folder / "train_history.json").read_text())
    trained = (history.get("train_config") or history["config"])["model"]
    for key in ("backbone", "head", "head_hidden", "cnn_widths", "image_size"):
        if key in trained:
            assert trained[key] == getattr(model.config, key), f"{folder}/train_history.json: {key} differs"
    x = processor(sorted((HUB_MODELS_DIR.parent / "space" / "examples").glob("*.jpg"))[:2], return_tensors="pt")
    with torch.no_grad():
        out = model(x["pixel_values"], num_samples=4, seed=0)
    assert out.probs.shape == (2, 2) and torch.allclose(out.probs.sum(1), torch.ones(2))


def test_results_table_has_a_row_per_released_detector():
    from hub_models.hub import RELEASED
    from train.results_table import table

    lines = table().splitlines()
    assert len(lines) == 2 + len(RELEASED)
    assert all(f"`{name}`" in line for name, line in zip(RELEASED, lines[2:]))
