"""The released detector folders: complete, shipping exactly the package's code, loadable offline by repo id."""

import pytest
import torch

from hub_models.hub import CODE_FILES, DEFAULT_REPO_IDS, HUB_MODELS_DIR, bundled_folder, check_repo_folder, load_detector


@pytest.mark.parametrize("repo_id", DEFAULT_REPO_IDS)
def test_released_folder_ships_the_package_code_and_loads(repo_id):
    folder = check_repo_folder(bundled_folder(repo_id))
    for name in CODE_FILES:  # a Hub repo needs its own copy; it must never drift from the one source of truth
        assert (folder / name).read_bytes() == (HUB_MODELS_DIR / name).read_bytes(), f"{folder / name} drifted"
    model, processor = load_detector(repo_id)
    assert model.config.metrics["cls/acc"] > 0.9
    x = processor(sorted((HUB_MODELS_DIR.parent / "space" / "examples").glob("*.jpg"))[:2], return_tensors="pt")
    with torch.no_grad():
        out = model(x["pixel_values"], num_samples=4, seed=0)
    assert out.probs.shape == (2, 2) and torch.allclose(out.probs.sum(1), torch.ones(2))
