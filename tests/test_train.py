"""Training pipeline: data sources, unreadable images, augmentation, resumable seeded training, the search table."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train.train as train_mod
from train.data import load_splits
from train.hpsearch import parse_grid, run_search, write_table
from train.train import TrainConfig, augment_batch, train


def make_image_folder(root, n_per_class=24, corrupt=2):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["REAL", "FAKE"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            base = rng.integers(0, 120, (32, 32, 3)) + 100 * label  # FAKE images are brighter: learnable
            Image.fromarray(base.astype(np.uint8)).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "FAKE" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def write_config(tmp_path, data, **overrides):
    cfg = dict(name="tiny", data=str(data), out_dir=str(tmp_path / "run"), epochs=2, batch_size=8,
               val_fraction=0.2, ckpt_every=2, val_samples=3, threads=1,
               model=dict(cnn_widths=[4, 8, 8], head_hidden=[8], head="mc_dropout", num_samples=4))
    cfg.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_image_folder_splits_skip_unreadable(image_folder, tmp_path, caplog):
    splits = load_splits(str(image_folder), val_fraction=0.2, seed=0, cache_dir=tmp_path / "cache")
    n = sum(len(y) for _, y in splits.values())
    assert n == 48  # the 2 corrupt files are skipped, not fatal
    assert "skipped 2 unreadable" in caplog.text
    for images, labels in splits.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert set(np.unique(labels)) == {0, 1}
    again = load_splits(str(image_folder), val_fraction=0.2, seed=0, cache_dir=tmp_path / "cache")
    for key in splits:  # from the cache, identical and with the same seeded split
        assert np.array_equal(splits[key][0], again[key][0])


def test_parquet_dataset_folder_loads_through_datasets(tmp_path):
    """A `datasets` folder of parquet shards (the CIFAKE layout) goes through the real load_dataset path."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(20):
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(buf, format="JPEG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"{i}.jpg"}, "label": i % 2})
    (tmp_path / "ds" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "data" / f"{split}-00000-of-00001.parquet")
    splits = load_splits(str(tmp_path / "ds"), val_fraction=0.25, seed=0, cache_dir=None)
    # stratified: round(10 x 0.25) = 2 per label
    assert len(splits["train"][1]) == 16 and len(splits["val"][1]) == 4 and len(splits["test"][1]) == 20


def test_augment_is_a_seeded_flip_and_translation():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    a = augment_batch(images, 2, torch.Generator().manual_seed(1))
    b = augment_batch(images, 2, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    no_shift = augment_batch(images, 0, torch.Generator().manual_seed(1))
    for i in range(2):  # with no padding each image is itself or its mirror
        assert torch.equal(no_shift[i], images[i]) or torch.equal(no_shift[i], images[i].flip(2))


def test_bad_config_fails_clearly(tmp_path, image_folder):
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_file(write_config(tmp_path, image_folder, learning_rate=1))
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig.from_file(write_config(tmp_path, image_folder), ["model.dropout=1.5"])
    with pytest.raises(ValueError, match="training_domain.*quote"):  # YAML reads an unquoted "a: b" as a mapping
        TrainConfig.from_file(write_config(tmp_path, image_folder), ["model.training_domain=CIFAKE: 32 px"])
    quoted = TrainConfig.from_file(write_config(tmp_path, image_folder), ["model.training_domain='CIFAKE: 32 px'"])
    assert quoted.model["training_domain"] == "CIFAKE: 32 px"


def test_interrupted_training_resumes_bit_exact(tmp_path, image_folder, monkeypatch):
    from hub_models.hub import check_repo_folder

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder)
    full = train(TrainConfig.from_file(path, [f"out_dir={tmp_path / 'full'}"]))
    check_repo_folder(full)
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    assert len(history["history"]) == 2 and "val/acc" in history["history"][0]

    # Interrupt the second run in epoch 2, after its step-2 checkpoint, then resume.
    cfg = TrainConfig.from_file(path, [f"out_dir={tmp_path / 'broken'}"])
    real_lr_at, calls = train_mod.lr_at, []

    def crash_in_last_step(step, steps_per_epoch, c):
        calls.append(step)
        if len(calls) == 6:  # 3 steps per epoch: the last step of epoch 2, after its step-2 checkpoint
            raise KeyboardInterrupt
        return real_lr_at(step, steps_per_epoch, c)

    monkeypatch.setattr(train_mod, "lr_at", crash_in_last_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    state = torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = train(cfg, resume=True)
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_extended_by_a_warm_restart_equals_the_longer_run(tmp_path, image_folder, monkeypatch):
    """A finished 2-epoch run resumed under a [2, 1]-cycle config is the 3-epoch [2, 1] run from scratch, bit-exact."""
    from safetensors.torch import load_file

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder)
    longer = ["epochs=3", "lr_cycles=[2, 1]", "lr_cycle_decay=0.5"]
    scratch = train(TrainConfig.from_file(path, [f"out_dir={tmp_path / 'scratch'}", *longer]))
    train(TrainConfig.from_file(path, [f"out_dir={tmp_path / 'short'}"]))
    # ckpt_every is how the run executes, not what it computes: a different value does not block the resume
    extended = train(TrainConfig.from_file(path, [f"out_dir={tmp_path / 'short'}", "ckpt_every=5", *longer]),
                     resume=True)
    a, b = load_file(scratch / "model.safetensors"), load_file(extended / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "short" / "history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]

    # A schedule whose first steps differ (one 4-epoch cycle) would not have reached that checkpoint: refused.
    with pytest.raises(ValueError, match="learning-rate schedule"):
        train(TrainConfig.from_file(path, [f"out_dir={tmp_path / 'short'}", "epochs=4"]), resume=True)
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig.from_file(path, [f"out_dir={tmp_path / 'short'}", "lr=0.1"]), resume=True)
    with pytest.raises(ValueError, match="summing to epochs"):
        TrainConfig.from_file(path, ["lr_cycles=[1, 1]", "epochs=3"])


def test_variational_training_and_search_table(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder, epochs=1, model=dict(
        cnn_widths=[4, 8, 8], head="variational", variational_scope="all", num_samples=4))
    monkeypatch.chdir(tmp_path)
    rows = run_search(str(path), parse_grid(["kl_weight=0.1,1", "model.prior_sigma=0.5"]), [], tmp_path / "search")
    assert len(rows) == 2 and {r["kl_weight"] for r in rows} == {"0.1", "1"}
    assert rows[0]["val/nll"] <= rows[1]["val/nll"]
    write_table(rows, tmp_path / "table.md", "t", "cmd")
    assert "| kl_weight | model.prior_sigma |" in (tmp_path / "table.md").read_text()
