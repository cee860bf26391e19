"""The released detector folders: one source for their code, immutable outputs (golden), loadable offline by repo id,
and exportable as self-contained Hub repos that load in a process that cannot import this project."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hub_models.export import write_hub_folder
from hub_models.golden import FIELDS, check_golden, golden_pixel_values
from hub_models.hub import (
    CODE_FILES,
    RELEASED_REPO_IDS,
    HUB_MODELS_DIR,
    RELEASED,
    bundled_folder,
    check_repo_folder,
    load_detector,
)

@pytest.mark.parametrize("repo_id", RELEASED_REPO_IDS)
def test_released_folder_ships_the_package_code_and_loads(repo_id):
    folder = check_repo_folder(bundled_folder(repo_id))
    for name in CODE_FILES:  # one source: the bundled folder links to the package's code, git holds it once
        assert (folder / name).is_symlink() and os.readlink(folder / name) == f"../{name}", f"{folder / name}"
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


@pytest.mark.parametrize("name", RELEASED)
def test_released_outputs_are_the_golden_ones(name):
    """A change of code or weights that moves a release's outputs fails here until it is re-exported on purpose with a
    new version (hub_models.export refuses to overwrite the goldens of a version)."""
    folder = bundled_folder(f"bayesfake/{name}")
    model, _ = load_detector(folder)
    assert model.config.release_version, f"{name}: a release has a version"
    check_golden(model, folder)
    assert f"Version: {model.config.release_version}." in (folder / "README.md").read_text()


def test_frozen_backbone_stored_once():
    """The heads on the frozen EfficientNet-Lite0 share one byte-identical backbone shard (one blob in git)."""
    shards = {name: (HUB_MODELS_DIR / name / "model-backbone.safetensors").read_bytes()
              for name in RELEASED if name.startswith("effnetlite0-")}
    assert len(shards) == 5 and len(set(shards.values())) == 1


FRESH_PROCESS = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoProject(importlib.abc.MetaPathFinder):  # this process must not be able to import the project
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hub_models", "train", "space", "bayesfake"):
                raise ImportError(f"the project is not importable here: {name}")

    sys.meta_path.insert(0, NoProject())
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
    from PIL import Image

    try:
        import hub_models
        raise SystemExit("hub_models was importable")
    except ImportError:
        pass
    answers = {}
    for folder, inputs in json.loads(sys.argv[1]).items():
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)) is type(model)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert processor(Image.new("RGB", (50, 40)))["pixel_values"].shape[-1] == model.config.image_size
        with torch.no_grad():
            out = model(torch.load(inputs), num_samples=30, seed=0)
        scores = pipeline("image-classification", model=folder, trust_remote_code=True)(Image.new("RGB", (50, 40)))
        answers[folder] = {"module": type(model).__module__, "verdicts": model.verdicts(out), "pipeline": scores,
                           **{k: getattr(out, k).tolist() for k in %r}}
    print(json.dumps(answers))
""" % (FIELDS,))


def test_exported_releases_load_in_a_process_that_cannot_import_the_project(tmp_path):
    """Each release exported to a Hub-ready folder (code as real files) loads through the Auto classes and the
    pipeline in a fresh Python (clean PYTHONPATH, another working directory, the project's packages blocked), and
    answers exactly as the in-repo load."""
    jobs, expected = {}, {}
    for name in RELEASED:
        out = write_hub_folder(bundled_folder(f"bayesfake/{name}"), tmp_path / "hub" / name)
        assert not any(p.is_symlink() for p in out.iterdir())
        model, _ = load_detector(out)
        x = golden_pixel_values(model.config)
        torch.save(x, tmp_path / f"{name}.pt")
        with torch.no_grad():
            expected[str(out)] = model(x, num_samples=30, seed=0)
        jobs[str(out)] = str(tmp_path / f"{name}.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # The same number of threads as here: a reduction split over another number of threads (the int8 CNN's pooling)
    # rounds differently, by ~1e-6, which is not what this test is about.
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    done = subprocess.run([sys.executable, str(script), json.dumps(jobs)], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, answer in answers.items():
        assert answer["module"].startswith("transformers_modules."), answer["module"]  # the folder's own code
        out = expected[folder]
        for field in FIELDS:
            torch.testing.assert_close(torch.tensor(answer[field]), getattr(out, field), atol=1e-6, rtol=0)
        assert {r["label"] for r in answer["pipeline"]} == {"REAL", "FAKE"}
