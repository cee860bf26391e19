"""Export to a Hub repo folder, and loading it back through the real Hugging Face code paths, offline."""

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

import hub_models.export as export
from hub_models.configuration_bayesfake import BayesFakeConfig
from hub_models.export import AUTO_MAP, ReleaseChangedError, export_detector, main, publish, write_hub_folder
from hub_models.golden import GOLDEN_FILE, GoldenMismatch, check_golden
from hub_models.hub import (
    CODE_FILES,
    HUB_MODELS_DIR,
    IncompleteRepoError,
    check_repo_folder,
    load_detector,
    resolve,
    seed_hub_cache,
)
from hub_models.modeling_bayesfake import BayesFakeDetector

REPORT = {
    "dataset": "CIFAKE",
    "split": "test",
    "metrics": {"cls/acc": 0.91, "cls/f1": 0.9, "cls/auroc": 0.97, "cal/ece": 0.031, "cal/nll": 0.24,
                "cal/brier": 0.07, "sc/aurc": 0.02, "sc/auroc_entropy": 0.85, "note": "not a number"},
}
CARD_TYPES = {"accuracy": 0.91, "f1": 0.9, "roc_auc": 0.97, "ece": 0.031, "nll": 0.24, "brier": 0.07, "aurc": 0.02,
              "error_detection_auroc": 0.85}
# (head, scope, layer) of the detectors round-tripped: the two released kinds and both variational layer families.
ROUND_TRIP = [
    ("mc_dropout", "head", "reparameterization"),
    ("variational", "head", "flipout"),
    ("variational", "all", "reparameterization"),
    ("variational", "all", "flipout"),
]
ROUND_TRIP_IDS = ["-".join(k) for k in ROUND_TRIP]


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    """Offline for real (whatever the environment said when huggingface_hub was imported); one thread for tiny nets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_detector(head="variational", scope="all", layer="flipout", seed=0, **overrides):
    kwargs = dict(cnn_widths=[4, 8, 8], head_hidden=[8], num_samples=8, image_size=16, prior_mu=0.05,
                  prior_sigma=0.5, training_domain="CIFAKE 32x32 test images")
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = BayesFakeConfig(head=head, variational_scope=scope, variational_layer=layer, **kwargs)
    return BayesFakeDetector(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported variational (all layers, flipout) detector, shared read-only by the loading tests."""
    base = tmp_path_factory.mktemp("export")
    plot = base / "reliability.png"
    Image.new("RGB", (4, 4)).save(plot)
    model = tiny_detector()
    folder = export_detector(model, base / "tiny", report=REPORT, plots=[plot], command="python -m train.train x.yaml",
                             repo_id="someorg/tiny")
    return folder


@pytest.fixture
def writable(exported, tmp_path):
    """A private copy of the exported folder, for tests that break it."""
    return shutil.copytree(exported, tmp_path / "copy")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that both huggingface_hub and transformers read (the constant is read once, at import)."""
    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def images(b=2, size=16):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------------
# The exported folder


def test_export_writes_a_complete_repo(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_report.json",
            "reliability.png", *CODE_FILES} <= names
    assert check_repo_folder(exported) == exported
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert config["model_type"] == "bayesfake"
    assert config["metrics"] == {k: v for k, v in REPORT["metrics"].items() if isinstance(v, float)}
    assert config["id2label"] == {"0": "REAL", "1": "FAKE"}
    for name in CODE_FILES:
        assert (exported / name).read_bytes() == (HUB_MODELS_DIR / name).read_bytes(), name
    processor = json.loads((exported / "preprocessor_config.json").read_text())
    assert processor["size"] == 16
    assert processor["auto_map"]["AutoImageProcessor"] == "image_processing_bayesfake.BayesFakeImageProcessor"
    assert json.loads((exported / "eval_report.json").read_text()) == REPORT


def test_model_card_metadata(exported):
    card = ModelCard.load(exported / "README.md")
    data = card.data
    assert data.license == "mit"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert {"custom_code", "uncertainty", "variational"} <= set(data.tags)
    assert data.datasets == ["cifake"]
    assert data.model_name == "someorg/tiny"
    results = {r.metric_type: r for r in data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == pytest.approx(CARD_TYPES)
    assert {(r.task_type, r.dataset_name, r.dataset_split) for r in results.values()} == {
        ("image-classification", "CIFAKE", "test")}
    assert "model-index" in (exported / "README.md").read_text().split("---")[1]
    text = card.text
    assert 'repo = "someorg/tiny"' in text
    assert "python -m train.train x.yaml" in text
    assert "![reliability.png](reliability.png)" in text
    assert "CIFAKE 32x32 test images" in text


def test_pipeline_is_repeatable_and_batch_independent(exported):
    """pipeline() samples with config.sampling_seed: the same image gets the same scores on every call, alone or
    with other images (it used to give 0.564, 0.615, 0.613 on repeated calls)."""
    classify = pipeline("image-classification", model=str(exported), trust_remote_code=True)
    red, grey = Image.new("RGB", (30, 20), (200, 30, 30)), Image.new("RGB", (20, 20), (90, 90, 90))
    def scores(result):
        return {r["label"]: r["score"] for r in result}

    first = scores(classify(red))
    assert scores(classify(red)) == first
    together = classify([grey, red])
    assert scores(together[1]) == pytest.approx(first, abs=1e-6)


def test_missing_or_unexpected_tensor_refuses_to_load(writable):
    from safetensors.torch import load_file, save_file

    weights = load_file(writable / "model.safetensors")
    missing = dict(weights)
    dropped = sorted(missing)[0]
    del missing[dropped]
    save_file(missing, writable / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"do not match .*missing keys: {dropped}"):
        AutoModel.from_pretrained(writable, trust_remote_code=True)
    save_file({**weights, "head.extra": torch.zeros(3)}, writable / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected keys: head.extra"):
        AutoModel.from_pretrained(writable, trust_remote_code=True)
    weights[dropped] = torch.zeros(1, *weights[dropped].shape[1:]) if weights[dropped].dim() else torch.zeros(2)
    save_file(weights, writable / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="mismatched|ignore_mismatched_sizes"):
        AutoModel.from_pretrained(writable, trust_remote_code=True)


def test_nan_weights_refuse_to_load(writable):
    from safetensors.torch import load_file, save_file

    weights = load_file(writable / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and k.startswith("head."))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, writable / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"weight {name} holds .* NaN"):
        AutoModel.from_pretrained(writable, trust_remote_code=True)


def test_golden_outputs_guard_the_release(tmp_path):
    """Export writes golden outputs; a changed model fails the check and cannot be re-exported under its version."""
    model = tiny_detector("mc_dropout", "head")
    folder = export_detector(model, tmp_path / "rel", version="1.0.0")
    golden = json.loads((folder / GOLDEN_FILE).read_text())
    assert golden["release_version"] == "1.0.0" and len(golden["verdicts"]) == 6
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert loaded.config.release_version == "1.0.0"
    check_golden(loaded, folder)
    assert "Version: 1.0.0" in (folder / "README.md").read_text()
    with torch.no_grad():
        loaded.head.layers[-1].bias[1] += 0.5  # one class only: a shift of both would cancel in softmax
    with pytest.raises(GoldenMismatch, match="no longer gives its golden outputs"):
        check_golden(loaded, folder)
    with pytest.raises(ReleaseChangedError, match="needs a new version"):
        export_detector(loaded, folder)
    assert json.loads((folder / GOLDEN_FILE).read_text()) == golden  # refused before writing anything
    export_detector(loaded, folder, version="1.1.0", notes="head bias moved on purpose")
    again = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    check_golden(again, folder)
    assert "head bias moved on purpose" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="release_version"):
        export_detector(again, folder, version="v2")


def test_timm_backbone_is_stored_as_a_shared_shard(tmp_path):
    """Two heads on one frozen backbone: byte-identical backbone shards, and each loads back exactly."""
    kwargs = dict(backbone="mobilenetv2_050", image_size=32, head_hidden=[8])
    torch.manual_seed(0)
    first = BayesFakeDetector(BayesFakeConfig(head="mc_dropout", **kwargs)).eval()
    torch.manual_seed(1)
    second = BayesFakeDetector(BayesFakeConfig(head="variational", **kwargs)).eval()
    second.backbone.load_state_dict(first.backbone.state_dict())
    a = export_detector(first, tmp_path / "a")
    b = export_detector(second, tmp_path / "b")
    assert not (a / "model.safetensors").exists()
    assert (a / "model-backbone.safetensors").read_bytes() == (b / "model-backbone.safetensors").read_bytes()
    assert (a / "model-head.safetensors").read_bytes() != (b / "model-head.safetensors").read_bytes()
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k, v in index.items() if v == "model-head.safetensors"} == {
        k for k in first.state_dict() if k.startswith("head.")}
    for model, folder in ((first, a), (second, b)):
        loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
        check_golden(loaded, folder)
    (a / "model-head.safetensors").unlink()
    with pytest.raises(IncompleteRepoError, match="model-head.safetensors"):
        check_repo_folder(a)


def test_write_hub_folder_resolves_links(exported, tmp_path):
    linked = tmp_path / "linked"
    shutil.copytree(exported, linked)
    for name in CODE_FILES:
        (linked / name).unlink()
        (linked / name).symlink_to(HUB_MODELS_DIR / name)
    out = write_hub_folder(linked, tmp_path / "hub")
    assert not any(p.is_symlink() for p in out.iterdir())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in linked.iterdir()}
    with pytest.raises(FileExistsError):
        write_hub_folder(linked, out)


def test_model_card_without_report(tmp_path):
    folder = export_detector(tiny_detector("mc_dropout", "head"), tmp_path / "plain")
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit"
    assert not card.data.eval_results
    assert "bayesfake/plain" in card.text  # default repo id: the project org and the folder name
    assert not (folder / "eval_report.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Loading the folder through the Auto classes and the pipeline


def test_auto_classes_load_the_folder(exported):
    config = AutoConfig.from_pretrained(exported, trust_remote_code=True)
    assert type(config).__name__ == "BayesFakeConfig" and config.head == "variational"
    for auto in (AutoModel, AutoModelForImageClassification):
        model = auto.from_pretrained(exported, trust_remote_code=True).eval()
        assert type(model).__name__ == "BayesFakeDetector"
        with torch.no_grad():
            out = model(images(), num_samples=4, seed=0)
        assert out.probs.shape == (2, 2)
    processor = AutoImageProcessor.from_pretrained(exported, trust_remote_code=True)
    assert type(processor).__name__ == "BayesFakeImageProcessor"
    assert processor(Image.new("RGB", (30, 20)))["pixel_values"].shape == (1, 3, 16, 16)


def test_pipeline(exported):
    classify = pipeline("image-classification", model=str(exported), trust_remote_code=True)
    result = classify(Image.new("RGB", (30, 20), (200, 30, 30)))
    assert {r["label"] for r in result} == {"REAL", "FAKE"}
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= r["score"] <= 1 for r in result)


def test_load_detector_from_folder(exported):
    model, processor = load_detector(exported)
    assert not model.training
    pixel_values = processor(Image.new("RGB", (30, 20)))["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values, num_samples=3, seed=0)
    assert out.sample_probs.shape == (3, 1, 2)
    assert model.verdicts(out)[0] in ("likely AI-generated", "likely real")


# ----------------------------------------------------------------------------------------------------------------------
# The transformers-5 trap: non-persistent prior buffers come back as torch.empty_like garbage unless re-filled


@pytest.mark.parametrize("kind", ROUND_TRIP, ids=ROUND_TRIP_IDS)
def test_round_trip_is_bit_exact(kind, tmp_path):
    model = tiny_detector(*kind)
    folder = export_detector(model, tmp_path / "rt")
    x = images()
    with torch.no_grad():
        kl_before = model.kl_divergence()
        before = model(x, num_samples=6, seed=3)
    # Fill fresh allocations with garbage so that an unfilled buffer cannot come back right by luck.
    loaded = {}
    for name, kwargs in (("remote", dict(trust_remote_code=True)), ("device_map", dict(trust_remote_code=True,
                                                                                       device_map="auto"))):
        loaded[name] = AutoModel.from_pretrained(folder, **kwargs).eval()
    loaded["direct"] = BayesFakeDetector.from_pretrained(folder).eval()
    for name, again in loaded.items():
        with torch.no_grad():
            assert torch.equal(again.kl_divergence(), kl_before), name
            after = again(x, num_samples=6, seed=3)
        for field in ("probs", "sample_probs", "std", "predictive_entropy", "mutual_information", "logits"):
            assert torch.equal(getattr(after, field), getattr(before, field)), (name, field)
        state, state_again = model.state_dict(), again.state_dict()
        assert state.keys() == state_again.keys(), name
        for key in state:
            assert torch.equal(state[key], state_again[key]), (name, key)
        for layer in again.bayesian_layers():
            for buf in ("prior_weight_mu", "prior_bias_mu"):
                if getattr(layer, buf, None) is not None:
                    assert torch.equal(getattr(layer, buf), torch.full_like(getattr(layer, buf), 0.05)), (name, buf)
            for buf in ("prior_weight_sigma", "prior_bias_sigma"):
                if getattr(layer, buf, None) is not None:
                    assert torch.equal(getattr(layer, buf), torch.full_like(getattr(layer, buf), 0.5)), (name, buf)


def test_kl_round_trip_with_garbage_allocator(tmp_path, monkeypatch):
    """Even when empty_like hands back garbage (as it may on any machine), the loaded KL equals the saved one."""
    model = tiny_detector("variational", "all", "reparameterization")
    folder = export_detector(model, tmp_path / "rt")
    real_empty_like = torch.empty_like

    def garbage_empty_like(tensor, *args, **kwargs):
        out = real_empty_like(tensor, *args, **kwargs)
        if out.is_floating_point() and out.device.type != "meta":
            out.fill_(12345.0)
        return out

    monkeypatch.setattr(torch, "empty_like", garbage_empty_like)
    again = AutoModel.from_pretrained(folder, trust_remote_code=True)
    monkeypatch.undo()
    assert torch.equal(again.kl_divergence(), model.kl_divergence())


# ----------------------------------------------------------------------------------------------------------------------
# By repo id from a local Hub cache, offline


def test_repo_id_from_offline_cache(exported, hub_cache):
    snapshot = seed_hub_cache(exported, "someorg/tiny", hub_cache)
    commit = (hub_cache / "models--someorg--tiny" / "refs" / "main").read_text()
    assert snapshot.name == commit and len(commit) == 40 and int(commit, 16) >= 0
    assert resolve("someorg/tiny") == snapshot
    model = AutoModel.from_pretrained("someorg/tiny", trust_remote_code=True).eval()
    reference = AutoModel.from_pretrained(exported, trust_remote_code=True).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x, num_samples=3, seed=1).probs, reference(x, num_samples=3, seed=1).probs)
    model, processor = load_detector("someorg/tiny")
    assert type(model).__name__ == "BayesFakeDetector"
    assert processor.size == 16


def test_reseeding_changed_code_loads_the_new_code(writable, hub_cache):
    """transformers caches remote code per (repo id, commit) for good: a re-seeded folder must get a new commit."""
    first = seed_hub_cache(writable, "someorg/tiny", hub_cache)
    assert not hasattr(__import__(type(AutoModel.from_pretrained("someorg/tiny", trust_remote_code=True)).__module__,
                                  fromlist=["_"]), "SEEDING_MARKER")
    with open(writable / "modeling_bayesfake.py", "a") as f:
        f.write("\nSEEDING_MARKER = 1\n")
    second = seed_hub_cache(writable, "someorg/tiny", hub_cache)
    assert second != first
    assert (hub_cache / "models--someorg--tiny" / "refs" / "main").read_text() == second.name
    model = AutoModel.from_pretrained("someorg/tiny", trust_remote_code=True)
    assert __import__(type(model).__module__, fromlist=["_"]).SEEDING_MARKER == 1
    assert seed_hub_cache(writable, "someorg/tiny", hub_cache) == second  # same content, same commit


def test_unknown_repo_id_offline(hub_cache):
    with pytest.raises(FileNotFoundError, match="someorg/absent"):
        load_detector("someorg/absent")


@pytest.mark.parametrize("missing", ["model.safetensors", "preprocessor_config.json", "modeling_bayesfake.py"])
def test_incomplete_folder(writable, missing):
    (writable / missing).unlink()
    with pytest.raises(IncompleteRepoError, match=missing.replace(".", r"\.")):
        load_detector(writable)
    with pytest.raises(IncompleteRepoError, match=missing.replace(".", r"\.")):
        check_repo_folder(writable)


def test_incomplete_cached_snapshot(exported, hub_cache):
    snapshot = seed_hub_cache(exported, "someorg/tiny", hub_cache)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(IncompleteRepoError, match=r"model\.safetensors"):
        load_detector("someorg/tiny")


def test_seeding_an_incomplete_folder_refused(writable, hub_cache):
    (writable / "preprocessor_config.json").unlink()
    with pytest.raises(IncompleteRepoError, match=r"preprocessor_config\.json"):
        seed_hub_cache(writable, "someorg/tiny", hub_cache)


def test_not_a_folder(tmp_path):
    with pytest.raises(IncompleteRepoError, match="not a folder"):
        check_repo_folder(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------------------
# device_map="auto"


def test_device_map_auto(exported):
    model = AutoModel.from_pretrained(exported, trust_remote_code=True, device_map="auto").eval()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected
    x = images()  # on the CPU, and float64: both moved to the model's device and dtype
    with torch.no_grad():
        out = model(x.double(), num_samples=3, seed=0)
        ref = model(x.to(model.device), num_samples=3, seed=0)
    assert out.probs.device.type == expected
    assert out.probs.dtype == torch.float32
    assert torch.allclose(out.probs, ref.probs, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_moved_to_the_model_device(exported):
    model = AutoModel.from_pretrained(exported, trust_remote_code=True).to("cuda").eval()
    with torch.no_grad():
        a = model(images(), num_samples=3, seed=0)
        b = model(images().cuda(), num_samples=3, seed=0)
    assert a.probs.is_cuda and torch.equal(a.probs, b.probs)


# ----------------------------------------------------------------------------------------------------------------------
# Publishing


def test_publish_offline_fails_before_network_io(exported, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("publish() attempted network I/O while offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(OfflineModeIsEnabled, match="offline mode is enabled"):
        publish(exported, "someorg/tiny", token="hf_not_a_real_token")


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls publish() makes."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls.append(("__init__", (), {"token": token, **kwargs}))

    def create_repo(self, *args, **kwargs):
        RecordingApi.calls.append(("create_repo", args, kwargs))
        return huggingface_hub.RepoUrl("https://huggingface.co/someorg/tiny")

    def upload_folder(self, *args, **kwargs):
        RecordingApi.calls.append(("upload_folder", args, kwargs))
        # What would be uploaded, as it is during the call (publish uploads a temporary self-contained copy).
        folder = Path(kwargs["folder_path"])
        RecordingApi.uploaded = {p.name: (p.is_symlink(), p.read_bytes()) for p in folder.iterdir()}

        class Info:
            oid = "a" * 40

        return Info()


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(export, "HfApi", RecordingApi)
    return RecordingApi


def test_publish_with_fake_api(exported, recording_api):
    revision = publish(exported, "someorg/tiny", token="tok", private=True, commit_message="v1")
    assert revision == "a" * 40
    names = [name for name, _, _ in recording_api.calls]
    assert names == ["__init__", "create_repo", "upload_folder"]
    assert recording_api.calls[0][2]["token"] == "tok"
    _, args, kwargs = recording_api.calls[1]
    assert (args, kwargs) == (("someorg/tiny",), dict(repo_type="model", private=True, exist_ok=True))
    _, args, kwargs = recording_api.calls[2]
    assert args == ()
    assert kwargs.pop("folder_path") and kwargs == dict(repo_id="someorg/tiny", repo_type="model", commit_message="v1")
    assert recording_api.uploaded == {p.name: (False, p.read_bytes()) for p in exported.iterdir()}


def test_publish_uploads_real_files_for_linked_code(exported, recording_api, tmp_path):
    """A bundled release links its code to the package; the Hub gets the files themselves."""
    linked = tmp_path / "linked"
    shutil.copytree(exported, linked)
    for name in CODE_FILES:
        (linked / name).unlink()
        (linked / name).symlink_to(HUB_MODELS_DIR / name)
    publish(linked, "someorg/tiny")
    for name in CODE_FILES:
        assert recording_api.uploaded[name] == (False, (HUB_MODELS_DIR / name).read_bytes())


def test_publish_refuses_incomplete_folder_before_any_call(writable, recording_api):
    (writable / "model.safetensors").unlink()
    with pytest.raises(IncompleteRepoError, match=r"model\.safetensors"):
        publish(writable, "someorg/tiny")
    assert recording_api.calls == []


# ----------------------------------------------------------------------------------------------------------------------
# The export CLI


def test_cli_export(tmp_path, capsys, recording_api):
    model = tiny_detector("variational", "head", "reparameterization")
    model_dir = tmp_path / "final"
    model.save_pretrained(model_dir)  # what training writes
    report = tmp_path / "r.json"
    report.write_text(json.dumps(REPORT))
    out_dir = tmp_path / "out" / "cifake-test"
    main([str(model_dir), str(out_dir), "--report", str(report), "--command", "python -m train.train c.yaml"])
    assert f"wrote {out_dir}" in capsys.readouterr().out
    check_repo_folder(out_dir)
    assert json.loads((out_dir / "config.json").read_text())["metrics"]["cls/acc"] == 0.91
    card = ModelCard.load(out_dir / "README.md")
    assert card.data.model_name == "bayesfake/cifake-test"
    assert "python -m train.train c.yaml" in card.text
    again = AutoModel.from_pretrained(out_dir, trust_remote_code=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())
    assert recording_api.calls == []  # no --push: nothing published

    main([str(model_dir), str(tmp_path / "pushed"), "--repo-id", "someorg/pushed", "--push"])
    assert f"pushed someorg/pushed at revision {'a' * 40}" in capsys.readouterr().out
    assert [name for name, _, _ in recording_api.calls] == ["__init__", "create_repo", "upload_folder"]
    assert recording_api.calls[2][2]["repo_id"] == "someorg/pushed"
