"""bayesfake score: streaming a folder or data set through the detectors into parquet, resumable, split across
processes. Everything runs on a handful of images made here, with the released 32 px CNN at a few samples."""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bayesfake import score as score_mod
from bayesfake.cli import main as cli_main
from bayesfake.score import iter_source, score, source_kind
from hub_models.hub import load_detector

DETECTOR = "bayesfake/cifake-mcdropout-cnn"
COLUMN = "cifake-mcdropout-cnn"
T = 4
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "space" / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}


def image_bytes(seed: int, fmt: str = "PNG", size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Five images in nested folders, a corrupt one, and a text file that is no image."""
    root = tmp_path / "images"
    (root / "b" / "deep").mkdir(parents=True)
    files = {"a.png": image_bytes(0), "b/c.jpg": image_bytes(1, "JPEG"), "b/deep/d.png": image_bytes(2, size=48),
             "e.webp": image_bytes(3, "WEBP"), "f.png": image_bytes(4, size=20), "broken.jpg": b"\xff\xd8 not really"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    return root, files


@pytest.fixture(scope="module")
def detector():
    return load_detector(DETECTOR)


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def run(source, out, **kwargs) -> dict:
    kwargs.setdefault("detectors", [DETECTOR])
    kwargs.setdefault("num_samples", T)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("threads", 1)
    return score(source, out, **kwargs)


def assert_same_rows(a: list[dict], b: list[dict], atol: float = 1e-5) -> None:
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            if isinstance(x[name], float) and isinstance(y[name], float):
                assert abs(x[name] - y[name]) <= atol, (x["key"], name, x[name], y[name])
            else:
                assert x[name] == y[name], (x["key"], name)


def test_folder_rows_are_keyed_hashed_and_equal_the_model(folder, tmp_path, detector):
    root, files = folder
    out = tmp_path / "results.parquet"
    summary = run(root, out, chunk_size=2, batch_size=3)
    rows = rows_of(out)
    # Recursive, sorted, images only; one row each, in stream order; the parts are merged away.
    assert [r["key"] for r in rows] == ["a.png", "b/c.jpg", "b/deep/d.png", "broken.jpg", "e.webp", "f.png"]
    assert [r["index"] for r in rows] == list(range(6))
    assert summary["scored"] == 6 and summary["errors"] == 1 and summary["rows"] == 6
    assert not score_mod.parts_dir(out).exists()
    model, processor = detector
    for row in rows:
        data = files[row["key"]]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["evidence_says"] == "none" and row["evidence_summary"]
        if row["key"] == "broken.jpg":  # unreadable: a row with the reason, no scores
            assert "not a readable image" in row["error"] and row[f"{COLUMN}/p_fake"] is None
            continue
        assert row["error"] is None
        with torch.no_grad():  # the model's own answer, alone, with its default seed, fed all its processor makes
            out_ = model(**processor(data, return_tensors="pt"), num_samples=T)
        assert row[f"{COLUMN}/p_fake"] == pytest.approx(out_.probs[0, 1].item(), abs=1e-5)
        assert row[f"{COLUMN}/std"] == pytest.approx(out_.std[0, 1].item(), abs=1e-5)
        for name in ("predictive_entropy", "mutual_information", "expected_entropy"):
            assert row[f"{COLUMN}/{name}"] == pytest.approx(getattr(out_, name)[0].item(), abs=1e-5)
        assert row[f"{COLUMN}/verdict"] == model.verdicts(out_)[0]
        assert row[f"{COLUMN}/num_samples"] == T
        # The domain check as the model gives it: null for a release without a gate (the columns are always there).
        if out_.in_domain is None:
            assert row[f"{COLUMN}/in_domain"] is None and row[f"{COLUMN}/domain_score"] is None
        else:
            assert row[f"{COLUMN}/in_domain"] is bool(out_.in_domain[0])
            assert row[f"{COLUMN}/domain_score"] == pytest.approx(out_.domain_score[0].item(), rel=1e-5)
        verdict = row[f"{COLUMN}/verdict"]
        assert row["headline"] == verdict  # one detector: its verdict is the answer
        assert row["headline_answered"] == ([COLUMN] if verdict in ("likely AI-generated", "likely real") else [])
        assert row["headline_abstained"] == ([COLUMN] if verdict == "uncertain: needs human review" else [])
        assert row["headline_outside"] == ([COLUMN] if verdict.startswith("outside") else [])
    broken = next(r for r in rows if r["key"] == "broken.jpg")
    assert broken["headline"] is None and broken["headline_answered"] is None  # nothing scored, no answer


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """Two tiny detectors with fitted domain gates (own features; own extractor fed domain_pixel_values)."""
    from test_space_app import export_gated_detectors

    return export_gated_detectors(tmp_path_factory.mktemp("gated"))


def gated_folder(root: Path) -> Path:
    """The CIFAKE examples (in the gates' domain: they were fitted on them) and two larger pictures."""
    from test_space_app import EXAMPLES

    root.mkdir()
    for path in sorted(EXAMPLES.glob("*")):
        if path.suffix in (".jpg", ".png"):
            shutil.copy(path, root / path.name)
    return root


def test_gated_detectors_write_their_domain_check_and_the_headline(gated, tmp_path):
    from hub_models.headline import headline

    root = gated_folder(tmp_path / "images")
    out = tmp_path / "gated.parquet"
    run(root, out, detectors=gated, evidence=False, batch_size=3)
    rows = rows_of(out)
    names = [Path(g).name for g in gated]
    assert len(rows) == 8 and all(r["error"] is None for r in rows)
    for folder, name in zip(gated, names):
        model, processor = load_detector(folder)
        for row in rows:
            inputs = processor((root / row["key"]).read_bytes(), return_tensors="pt")
            with torch.no_grad():
                out_ = model(**inputs, num_samples=T)
            assert row[f"{name}/domain_score"] == pytest.approx(out_.domain_score[0].item(), rel=1e-5)
            assert row[f"{name}/in_domain"] is bool(out_.in_domain[0])
            assert row[f"{name}/verdict"] == model.verdicts(out_)[0]
            if row["key"].startswith("cifake_"):
                assert row[f"{name}/in_domain"] is True
    for row in rows:
        combined = headline({name: row[f"{name}/verdict"] for name in names})
        assert (row["headline"], row["headline_answered"], row["headline_abstained"], row["headline_outside"]) == (
            combined.verdict, combined.answered, combined.abstained, combined.outside)
    # the extractor's gate was fed the processor's domain_pixel_values: a 640x480 picture scored from its thumbnail
    # alone would get another distance
    model, processor = load_detector(gated[1])
    inputs = processor((root / "synthetic_landscape_640x480.jpg").read_bytes(), return_tensors="pt")
    with torch.no_grad():
        thumbnail_only = model(inputs["pixel_values"], num_samples=T).domain_score[0].item()
    written = next(r for r in rows if r["key"] == "synthetic_landscape_640x480.jpg")[f"{names[1]}/domain_score"]
    assert abs(written - thumbnail_only) > 1e-3 * written


def test_detectors_share_one_frozen_lite0_pass_and_answer_as_alone(gated, tmp_path, monkeypatch):
    """A Lite0 head and two gated CNNs (whose gates ship the same ImageNet Lite0 at 128 px): the Lite0 network runs
    once per batch of images, not three times, and every detector writes what it answers alone."""
    import timm.models.efficientnet as effnet

    names = ["bayesfake/effnetlite0-linear", "bayesfake/cifake-mcdropout-cnn", "bayesfake/cifake-vi-bcnn"]
    root = gated_folder(tmp_path / "images")  # 8 images: CIFAKE examples and two larger pictures
    calls = []
    forward = effnet.EfficientNet.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(effnet.EfficientNet, "forward", counted)
    out = tmp_path / "shared.parquet"
    run(root, out, detectors=names, num_samples=None, evidence=False, batch_size=3)
    assert calls == [3, 3, 2]  # one Lite0 pass per batch, for all three detectors
    rows = rows_of(out)
    assert len(rows) == 8 and all(r["error"] is None for r in rows)
    for name in names:
        model, processor = load_detector(name)
        column = Path(name).name
        for row in rows:
            with torch.no_grad():
                alone = model(**processor((root / row["key"]).read_bytes(), return_tensors="pt"))
            assert row[f"{column}/p_fake"] == pytest.approx(alone.probs[0, 1].item(), abs=1e-5)
            assert row[f"{column}/domain_score"] == pytest.approx(alone.domain_score[0].item(), rel=1e-5)
            assert row[f"{column}/verdict"] == model.verdicts(alone)[0]


def test_rows_of_an_older_run_without_the_domain_and_headline_columns_are_kept(gated, tmp_path, caplog):
    """An OUT written before the domain and headline columns existed (and before the settings named the releases):
    a resume keeps its rows, leaves their domain columns null (not measured) and computes their headline from their
    verdicts; the new rows get everything."""
    root = gated_folder(tmp_path / "images")
    reference = tmp_path / "reference.parquet"
    run(root, reference, detectors=gated, evidence=False)
    (root / "synthetic_still_life_1024x768_rgba.png").unlink()  # the older run had one image fewer
    out = tmp_path / "old.parquet"
    run(root, out, detectors=gated, evidence=False)
    table = pq.read_table(out)
    settings = json.loads(table.schema.metadata[score_mod.SETTINGS_KEY])
    del settings["versions"]
    old = table.drop_columns([n for n in table.column_names if n.endswith(score_mod.ADDED_COLUMNS)])
    pq.write_table(old.replace_schema_metadata({score_mod.SETTINGS_KEY: json.dumps(settings).encode()}), out)
    shutil.copy(EXAMPLES_DIR / "synthetic_still_life_1024x768_rgba.png", root)
    with caplog.at_level("WARNING", logger=score_mod.__name__):
        summary = run(root, out, detectors=gated, evidence=False)
    assert summary["scored"] == 1 and summary["skipped"] == 7
    assert "7 rows written by an older bayesfake score lack" in caplog.text
    assert "do not record which release" in caplog.text
    rows, expected = rows_of(out), rows_of(reference)
    assert list(rows[0]) == list(expected[0])  # every column, in the order of a fresh run
    for row, want in zip(rows, expected):
        new = row["key"] == "synthetic_still_life_1024x768_rgba.png"
        for name, value in want.items():
            if name.endswith(("/in_domain", "/domain_score")) and not new:
                assert row[name] is None, (row["key"], name)  # not measured by the older run
            elif isinstance(value, float):
                assert row[name] == pytest.approx(value, abs=1e-5), (row["key"], name)
            else:
                assert row[name] == value, (row["key"], name)  # the headline too, from the same verdicts
    # An older OUT with nothing new to score is rewritten with the columns too.
    pq.write_table(old.replace_schema_metadata({score_mod.SETTINGS_KEY: json.dumps(settings).encode()}), out)
    (root / "synthetic_still_life_1024x768_rgba.png").unlink()
    assert run(root, out, detectors=gated, evidence=False)["scored"] == 0
    assert list(rows_of(out)[0]) == list(expected[0])
    # Rows of another release of a detector would mix two models: refused.
    table = pq.read_table(out)
    settings = json.loads(table.schema.metadata[score_mod.SETTINGS_KEY])
    settings["versions"][Path(gated[0]).name] = "0.0.1"
    pq.write_table(table.replace_schema_metadata({score_mod.SETTINGS_KEY: json.dumps(settings).encode()}), out)
    with pytest.raises(ValueError, match="other settings"):
        run(root, out, detectors=gated, evidence=False)


@pytest.fixture
def dataset_folder(tmp_path):
    """A Hub-style data set folder: README configs and parquet shards with image structs and a ClassLabel."""
    import datasets

    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["REAL", "FAKE"])})
    for split, seeds in (("train", [10, 11, 12]), ("test", [20, 21])):
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": image_bytes(s), "path": None} for s in seeds], "label": [s % 2 for s in seeds]},
            features=features)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*.parquet\n  - split: test\n    path: data/test-*.parquet\n"
                                    "---\n# tiny\n")
    return root


def test_datasets_folder_and_parquet_file_sources(dataset_folder, tmp_path):
    out = tmp_path / "all.parquet"
    run(dataset_folder, out, evidence=False)
    rows = rows_of(out)
    assert [r["key"] for r in rows] == ["train/0", "train/1", "train/2", "test/0", "test/1"]
    assert [r["label"] for r in rows] == ["REAL", "FAKE", "REAL", "REAL", "FAKE"]
    assert [r["sha256"] for r in rows[3:]] == [hashlib.sha256(image_bytes(s)).hexdigest() for s in (20, 21)]
    only_test = tmp_path / "test.parquet"
    run(dataset_folder, only_test, evidence=False, split="test")
    assert_same_rows([{**r, "index": r["index"] - 3, "key": r["key"]} for r in rows[3:]],
                     [{**r} for r in rows_of(only_test)])
    # One parquet file read in record batches: keys are FILE_STEM/ROW, same answers for the same bytes.
    single = tmp_path / "single.parquet"
    run(dataset_folder / "data" / "test-00000-of-00001.parquet", single, evidence=False)
    got = rows_of(single)
    assert [r["key"] for r in got] == ["test-00000-of-00001/0", "test-00000-of-00001/1"]
    assert [r[f"{COLUMN}/p_fake"] for r in got] == pytest.approx([r[f"{COLUMN}/p_fake"] for r in rows[3:]], abs=1e-6)
    assert [r["label"] for r in got] == ["0", "1"]  # a bare parquet file has no class names


def hub_dataset_in_local_cache(dataset_folder, cache, repo_id):
    """Put a data set where ``datasets.load_dataset(repo_id)`` finds it offline: the layout an earlier online load of
    a Hub parquet data set leaves in the datasets cache (``NAMESPACE___NAME/default/0.0.0/COMMIT``, arrow files and
    dataset_info.json), made here by the same parquet builder, since the Hub cannot be reached."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["REAL", "FAKE"])})
    files = {split: str(dataset_folder / "data" / f"{split}-00000-of-00001.parquet") for split in ("train", "test")}
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name="default", hash="0123456789abcdef",
                      data_files=files, features=features)
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")
    (config_dir,) = (cache / f"{namespace}___{name}").glob("default*")
    config_dir.rename(config_dir.parent / "default")


def test_a_hub_dataset_id_is_read_offline_from_the_local_cache(dataset_folder, tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "datasets-cache"
    hub_dataset_in_local_cache(dataset_folder, cache, "bayesfake-tests/tiny")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert source_kind("bayesfake-tests/tiny") == "datasets"
    by_id = tmp_path / "by_id.parquet"
    run("bayesfake-tests/tiny", by_id, evidence=False)
    by_folder = tmp_path / "by_folder.parquet"
    run(dataset_folder, by_folder, evidence=False)
    assert [r["key"] for r in rows_of(by_id)] == ["train/0", "train/1", "train/2", "test/0", "test/1"]
    assert_same_rows(rows_of(by_id), rows_of(by_folder))
    with pytest.raises(Exception, match="bayesfake-tests/missing"):
        run("bayesfake-tests/missing", tmp_path / "missing.parquet", evidence=False)


def test_iter_source_streams_a_folder_lazily(folder):
    stream = iter_source(folder[0])
    first = next(stream)
    assert first.key == "a.png" and first.data == folder[1]["a.png"] and first.index == 0
    assert [r.key for r in stream][-1] == "f.png"


def test_a_killed_run_resumes_with_no_row_lost_or_duplicated(folder, tmp_path, monkeypatch):
    reference = tmp_path / "reference.parquet"
    run(folder[0], reference, chunk_size=2, evidence=False)
    out = tmp_path / "results.parquet"
    written = []
    real_write = score_mod.write_part

    def dies_on_third_part(table, where, name):
        if len(written) == 2:  # as a kill -9 would: a half-written temporary file, no rename, nothing more
            (where / (name + ".tmp")).write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt("killed")
        written.append(name)
        return real_write(table, where, name)

    monkeypatch.setattr(score_mod, "write_part", dies_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        run(folder[0], out, chunk_size=2, evidence=False)
    assert not out.exists() and len(list(score_mod.parts_dir(out).glob("*.parquet"))) == 2
    monkeypatch.setattr(score_mod, "write_part", real_write)
    summary = run(folder[0], out, chunk_size=2, evidence=False)
    assert summary["skipped"] == 4 and summary["scored"] == 2
    assert_same_rows(rows_of(out), rows_of(reference))
    # Done: a rerun scores nothing; a new image is scored alone and merged in; other settings are refused.
    assert run(folder[0], out, evidence=False)["scored"] == 0
    (folder[0] / "g.png").write_bytes(image_bytes(9))
    assert run(folder[0], out, evidence=False)["scored"] == 1
    keys = [r["key"] for r in rows_of(out)]
    assert sorted(keys) == sorted([r["key"] for r in rows_of(reference)] + ["g.png"]) and len(set(keys)) == len(keys)
    with pytest.raises(ValueError, match="other settings"):
        run(folder[0], out, evidence=False, num_samples=T + 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(source, out):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # accelerate's torchrun-style launcher (--multi_gpu) starts N processes; without a GPU they run on the CPU
    # and meet over gloo (accelerate launch --cpu starts one process only).
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "bayesfake", "score", str(source), "--out", str(out), "--detectors", DETECTOR,
           "--num-samples", str(T), "--chunk-size", "1", "--no-evidence", "--threads", "1", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_two_processes_split_the_work_and_merge_to_the_single_process_answer(folder, tmp_path):
    root, _ = folder
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(root / "a.png", lone / "a.png")
    out = tmp_path / "two.parquet"
    # Fewer images than processes: one process has nothing to do and still meets the other at the end.
    log = launch_two(lone, out)
    assert '"world_size": 2' in log and [r["key"] for r in rows_of(out)] == ["a.png"]
    # Then the folder grows to six (an uneven split of the five new ones); the run resumes on both processes.
    for path in root.rglob("*"):
        if path.is_file() and path.name != "a.png":
            target = lone / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    launch_two(lone, out)
    single = tmp_path / "single.parquet"
    run(lone, single, evidence=False, chunk_size=1)
    two, one = rows_of(out), rows_of(single)
    assert sorted(r["key"] for r in two) == sorted(r["key"] for r in one)
    assert len({r["key"] for r in two}) == len(two) == 6
    by_key = {r["key"]: r for r in two}
    assert_same_rows([{**by_key[r["key"]], "index": r["index"]} for r in one], one)


def test_the_command_reaches_score(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["score", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--no-evidence" in text and "--num-samples" in text
