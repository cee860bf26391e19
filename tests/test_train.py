"""Training pipeline: data sources, unreadable images, the decode cache and the recorded validation split,
augmentation, config checks, resumable seeded training (bit-exact, atomic checkpoints), the search table."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train.trainer as trainer_mod
from hub_models import BayesFakeConfig, BayesFakeDetector, BayesFakeImageProcessor
from train import search
from train.config import TrainConfig, load_config
from train.data import augment_batch, decode_processor, load_split_arrays, load_splits
from train.metrics import nll
from train.prediction import predict
from train.search import parse_grid, run_search, write_table
from train.trainer import STATE_FILE, find_checkpoint, train

PROCESSOR_32 = BayesFakeImageProcessor(size=32)


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
    splits = load_splits(str(image_folder), PROCESSOR_32, val_fraction=0.2, seed=0, cache_dir=tmp_path / "cache")
    n = sum(len(y) for _, y in splits.values())
    assert n == 48  # the 2 corrupt files are skipped, not fatal
    assert "skipped 2 unreadable" in caplog.text
    for images, labels in splits.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert set(np.unique(labels)) == {0, 1}
    again = load_splits(str(image_folder), PROCESSOR_32, val_fraction=0.2, seed=0, cache_dir=tmp_path / "cache")
    for key in splits:  # from the cache, identical and with the same seeded split
        assert np.array_equal(splits[key][0], again[key][0])
    assert again.record == splits.record and splits.record["val_size"] == len(splits["val"][1])
    other = load_splits(str(image_folder), PROCESSOR_32, val_fraction=0.2, seed=1, cache_dir=tmp_path / "cache")
    assert other.record["val_sha256"] != splits.record["val_sha256"]


def test_decode_cache_is_keyed_by_every_preprocessing_field(image_folder, tmp_path):
    """Two detectors that differ only in resample decode differently, so they never share a cached array; mean and std
    apply after uint8 (normalize_uint8), so they do share one."""
    cache = tmp_path / "cache"
    bicubic = BayesFakeConfig(image_size=20, resample="bicubic")
    nearest = BayesFakeConfig(image_size=20, resample="nearest")
    a = load_split_arrays(str(image_folder), decode_processor(bicubic), cache)["train"][0]
    b = load_split_arrays(str(image_folder), decode_processor(nearest), cache)["train"][0]
    assert len(list(cache.glob("*.npz"))) == 2 and not np.array_equal(a, b)
    fresh = load_split_arrays(str(image_folder), decode_processor(nearest), cache_dir=None)["train"][0]
    assert np.array_equal(b, fresh)  # the cached array is what that processor decodes
    other_norm = BayesFakeConfig(image_size=20, resample="nearest", image_mean=[0.1] * 3, image_std=[0.2] * 3)
    load_split_arrays(str(image_folder), decode_processor(other_norm), cache)
    assert len(list(cache.glob("*.npz"))) == 2
    # A feature run decodes small (decode_size) with the detector's own filter and normalisation.
    small = decode_processor(BayesFakeConfig(image_size=64, resample="nearest", image_mean=[0.1] * 3), decode_size=16)
    assert (small.size, small.resample, small.image_mean) == (16, "nearest", [0.1] * 3)


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
    splits = load_splits(str(tmp_path / "ds"), PROCESSOR_32, val_fraction=0.25, seed=0, cache_dir=None)
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
        load_config(write_config(tmp_path, image_folder, learning_rate=1))
    path = write_config(tmp_path, image_folder)
    with pytest.raises(ValueError, match="dropout"):
        load_config(path, ["model.dropout=1.5"])
    with pytest.raises(ValueError, match="training_domain.*quote"):  # YAML reads an unquoted "a: b" as a mapping
        load_config(path, ["model.training_domain=CIFAKE: 32 px"])
    quoted = load_config(path, ["model.training_domain='CIFAKE: 32 px'"])
    assert quoted.model["training_domain"] == "CIFAKE: 32 px"
    # Each field's type and range is checked by name (these two used to train on everything / blame lr_cycles).
    with pytest.raises(ValueError, match=r"^max_train must be >= 0"):
        load_config(path, ["max_train=-5"])
    with pytest.raises(ValueError, match=r"^epochs must be an integer; got 'abc'"):
        load_config(path, ["epochs=abc"])
    for item, message in [("lr=fast", "^lr must be a number"), ("augment=3", "^augment must be true or false"),
                          ("batch_size=0", "^batch_size must be >= 1"), ("val_fraction=1", "^val_fraction must be in"),
                          ("epochs=2.5", "^epochs must be an integer"), ("seed=true", "^seed must be an integer"),
                          ("optimizer=sgd", "^optimizer must be one of"), ("lr_cycles=3", "^lr_cycles must be a list"),
                          ("decode_size=16", "decode_size applies to feature runs"),
                          ("features=true", "backbone_weights must name")]:
        with pytest.raises(ValueError, match=message):
            load_config(path, [item])
    with pytest.raises(ValueError, match="closed form on cached features"):
        load_config(path, ["model.head=gaussian_nb", "model.head_hidden=[]", "model.dropout=0"])
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        load_config(path, ["epoch=3"])
    with pytest.raises(ValueError, match="lr must be a number"):
        TrainConfig(name="x", lr=None)  # built in code, checked the same way
    assert load_config(path, ["weight_decay=1e-9"]).weight_decay == 1e-9  # YAML 1.1 reads 1e-9 as a string


def load_weights(folder):
    return BayesFakeDetector.from_pretrained(folder).state_dict()


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def train_interrupted(monkeypatch, cfg, at_step: int) -> None:
    """Run ``train(cfg)`` and kill it (KeyboardInterrupt) at its ``at_step``-th optimisation step (counted from 1),
    before that step runs: what a Ctrl-C or a lost machine does mid-epoch."""
    real_lr_at, calls = trainer_mod.lr_at, []

    def crash_at_step(step, steps_per_epoch, c):
        calls.append(step)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real_lr_at(step, steps_per_epoch, c)

    monkeypatch.setattr(trainer_mod, "lr_at", crash_at_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)


def checkpoint_position(out_dir) -> tuple[int, int]:
    state = json.loads((find_checkpoint(out_dir / "checkpoint") / STATE_FILE).read_text())
    return state["epoch"], state["step"]


def test_interrupted_training_resumes_bit_exact(tmp_path, image_folder, monkeypatch, one_thread):
    from hub_models.hub import check_repo_folder

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder)
    full = train(load_config(path, [f"out_dir={tmp_path / 'full'}"]), progress=False)
    check_repo_folder(full.final)
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    assert len(history["history"]) == 2 and "val/acc" in history["history"][0]
    # The validation split is recorded in the run and ships in the model folder.
    expected = load_splits(str(image_folder), PROCESSOR_32, 0.2, 0).record
    assert history["split"] == expected and json.loads((full.final / "train_history.json").read_text()) == history
    # Validation scores with the one NLL: recomputed from the final model, the last epoch's number comes back.
    preds = predict(full.model, *full.val, num_samples=3, progress=False)
    assert history["history"][-1]["val/nll"] == pytest.approx(nll(preds.labels, preds.p_fake), abs=1e-12)

    # Interrupt the second run in epoch 2, after its step-2 checkpoint, then resume.
    cfg = load_config(path, [f"out_dir={tmp_path / 'broken'}"])
    train_interrupted(monkeypatch, cfg, at_step=6)  # 3 steps per epoch: the last step of epoch 2
    assert checkpoint_position(tmp_path / "broken") == (1, 2)
    resumed = train(cfg, resume=True, progress=False)
    assert same_weights(load_weights(full.final), load_weights(resumed.final))
    untimed = [[{k: v for k, v in h.items() if k != "train_seconds"} for h in r.history] for r in (full, resumed)]
    assert untimed[0] == untimed[1]  # the same validation numbers, epoch by epoch
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_config(path, [f"out_dir={tmp_path / 'never'}"]), resume=True, progress=False)


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one(tmp_path, image_folder, monkeypatch, one_thread):
    """save_state writes into a temp folder that is renamed only once complete: a kill in the middle of a save leaves
    the previous checkpoint, and the resumed run still equals the uninterrupted one bit for bit."""
    from accelerate import Accelerator

    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder)
    full = train(load_config(path, [f"out_dir={tmp_path / 'full'}"]), progress=False)
    cfg = load_config(path, [f"out_dir={tmp_path / 'run'}"])
    real_save, saves = Accelerator.save_state, []

    def killed_during_third_save(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        result = real_save(self, output_dir, **kwargs)
        if len(saves) == 3:  # step 2 of epoch 1, end of epoch 1, step 2 of epoch 2: killed once its files are out
            (tmp_path / "run" / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Accelerator, "save_state", killed_during_third_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert all(s.endswith("checkpoint.tmp") for s in saves)
    assert checkpoint_position(tmp_path / "run") == (1, 0)  # the end of epoch 1, intact
    # A kill between the two renames leaves only checkpoint.old: that one is resumed.
    shutil.move(tmp_path / "run" / "checkpoint", tmp_path / "run" / "checkpoint.old")
    assert checkpoint_position(tmp_path / "run") == (1, 0)
    resumed = train(cfg, resume=True, progress=False)
    assert same_weights(load_weights(full.final), load_weights(resumed.final))
    assert not (tmp_path / "run" / "checkpoint.old").exists() and not (tmp_path / "run" / "checkpoint.tmp").exists()


def test_finished_run_extended_by_a_warm_restart_equals_the_longer_run(tmp_path, image_folder, monkeypatch, one_thread):
    """A finished 2-epoch run resumed under a [2, 1]-cycle config is the 3-epoch [2, 1] run from scratch, bit-exact."""
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder)
    longer = ["epochs=3", "lr_cycles=[2, 1]", "lr_cycle_decay=0.5"]
    scratch = train(load_config(path, [f"out_dir={tmp_path / 'scratch'}", *longer]), progress=False)
    train(load_config(path, [f"out_dir={tmp_path / 'short'}"]), progress=False)
    # ckpt_every is how the run executes, not what it computes: a different value does not block the resume
    extended = train(load_config(path, [f"out_dir={tmp_path / 'short'}", "ckpt_every=5", *longer]), resume=True,
                     progress=False)
    assert same_weights(load_weights(scratch.final), load_weights(extended.final))
    history = json.loads((tmp_path / "short" / "history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]

    # A schedule whose first steps differ (one 4-epoch cycle) would not have reached that checkpoint: refused.
    with pytest.raises(ValueError, match="learning-rate schedule"):
        train(load_config(path, [f"out_dir={tmp_path / 'short'}", "epochs=4"]), resume=True, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(load_config(path, [f"out_dir={tmp_path / 'short'}", "lr=0.1"]), resume=True, progress=False)
    with pytest.raises(ValueError, match="summing to epochs"):
        load_config(path, ["lr_cycles=[1, 1]", "epochs=3"])


def test_variational_training_and_search_table(tmp_path, image_folder, monkeypatch, one_thread):
    monkeypatch.setenv("BAYESFAKE_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path, image_folder, epochs=1, model=dict(
        cnn_widths=[4, 8, 8], head="variational", variational_scope="all", num_samples=4))
    monkeypatch.chdir(tmp_path)
    grid = parse_grid(["kl_weight=0.1,1", "model.prior_sigma=0.5"])
    rows = run_search(str(path), grid, [], tmp_path / "search")
    assert len(rows) == 2 and {r["kl_weight"] for r in rows} == {"0.1", "1"}
    assert rows[0]["val/nll_calibrated"] <= rows[1]["val/nll_calibrated"]
    assert all(r["temperature"] > 0 and 0 <= r["val/ece_calibrated"] <= 1 for r in rows)
    write_table(rows, tmp_path / "table.md", "t", "cmd")
    assert "| kl_weight | model.prior_sigma | val/acc | val/nll | val/nll_calibrated |" in (
        tmp_path / "table.md").read_text()
    # Finished points are not trained again: an interrupted search goes on where it stopped.
    monkeypatch.setattr(search, "train", lambda *a, **k: pytest.fail("a finished point was re-trained"))
    assert run_search(str(path), grid, [], tmp_path / "search") == rows


def test_nll_is_sklearns_clipped_log_loss():
    """The committed search tables were scored with log_loss on P(FAKE) clipped to [1e-7, 1 - 1e-7]: the one NLL
    gives the same number, to < 1e-7 per image (it leaves confident right answers unclipped)."""
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    p_fake = np.concatenate([rng.uniform(0, 1, 990), [0.0, 1.0, 1e-9, 1 - 1e-9, 1e-12, 0.5, 1e-7, 1 - 1e-7, 0.3, 1]])
    reference = log_loss(labels, np.clip(p_fake, 1e-7, 1 - 1e-7), labels=[0, 1])
    assert nll(labels, p_fake) == pytest.approx(reference, abs=1e-7)
    assert nll([0, 1], [0.0, 1.0]) == 0.0 and nll([1], [0.0]) == pytest.approx(-np.log(1e-7))
