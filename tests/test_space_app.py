"""The Space served for real on 127.0.0.1, called through gradio_client: every endpoint, a load failure, a corpus of bad
and unusual files, repeatability, concurrent clients, and what the uploaded file itself says (generator parameters,
camera EXIF and a C2PA credential survive the upload; broken files are answered). Detectors are tiny exported ones
(the released ones may not exist yet), plus one bogus id that must fail to load without taking the others down."""

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from hub_models import BayesFakeConfig, BayesFakeDetector  # noqa: E402
from hub_models.export import export_detector  # noqa: E402
from hub_models.headline import headline  # noqa: E402
from hub_models.hub import load_detector  # noqa: E402
from hub_models.image_processing_bayesfake import load_image  # noqa: E402
from space import app, charts, detectors, provenance  # noqa: E402

# The evidence package's own test files: generator parameters, EXIF, a C2PA credential signed by a throwaway CA.
from test_evidence import A1111, c2pa_signing, photo, png_bytes  # noqa: E402, F401 - c2pa_signing is a fixture
from test_evidence import jpeg_bytes as evidence_jpeg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "space" / "examples"
FAKE_EXAMPLE = EXAMPLES / "cifake_fake_1.jpg"
REAL_EXAMPLE = EXAMPLES / "cifake_real_1.jpg"
BOGUS_ID = "bayesfake/no-such-detector"
TINY_DOMAIN = "CIFAKE (tiny untrained test detector)"
RESULT_FIELDS = {"probs", "std", "predictive_entropy", "mutual_information", "expected_entropy", "verdict",
                 "threshold", "num_samples", "sample_p_fake", "training_domain", "warnings", "seed",
                 "image_size", "training_image_size", "in_domain", "domain_score", "domain_threshold", "stochastic",
                 "training_data"}
HEADLINE_FIELDS = {"verdict", "answered", "abstained", "outside", "explanation"}
VERDICTS = {"likely AI-generated", "likely real", "uncertain: needs human review"}
OUTSIDE = "outside what this detector was trained on: no verdict"


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared with test_space_browser.py


def export_tiny_detectors(folder: Path) -> list[str]:
    """An MC-Dropout and a variational detector, small enough to load and run in milliseconds."""
    paths = []
    for head in ("mc_dropout", "variational"):
        torch.manual_seed(0)
        config = BayesFakeConfig(cnn_widths=[4, 8, 8], head_hidden=[8], head=head, training_domain=TINY_DOMAIN)
        paths.append(str(export_detector(BayesFakeDetector(config), folder / f"tiny-{head}")))
    return paths


def training_images() -> tuple[np.ndarray, np.ndarray]:
    """What the tiny gated detectors' domain gates are fitted on: the six 32 px CIFAKE examples, each also flipped,
    shifted and lightly noised (48 images), labelled REAL (0) and FAKE (1). The examples themselves are in the set, so
    they fall under the threshold chosen on it."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for path in sorted(EXAMPLES.glob("cifake_*.jpg")):
        base = np.asarray(Image.open(path).convert("RGB"))
        variants = [base, base[:, ::-1], np.roll(base, 2, axis=0), np.roll(base, -2, axis=1)]
        variants += [np.clip(v.astype(int) + rng.integers(-8, 9, v.shape), 0, 255).astype(np.uint8)
                     for v in variants]
        images += variants
        labels += [int(path.name.startswith("cifake_fake"))] * len(variants)
    return np.stack(images), np.array(labels)


def export_gated_detectors(folder: Path) -> list[str]:
    """Two tiny detectors with fitted domain gates: an MC-Dropout one whose gate reads its own backbone features, and
    a variational one whose gate has its own frozen extractor (timm's tiny ``test_efficientnet``, fed 64 px
    ``domain_pixel_values``). The threshold lets every image of ``training_images`` through (chosen on them)."""
    import timm
    from safetensors.torch import save_file

    from train.domain import attach_domain_gate, choose_domain_threshold, fit_domain_gate

    images, labels = training_images()
    paths = []
    for head, gate in (("mc_dropout", "features"), ("variational", "test_efficientnet")):
        torch.manual_seed(0)
        config = BayesFakeConfig(cnn_widths=[4, 8, 8], head_hidden=[8], head=head, training_domain=TINY_DOMAIN,
                                 training_data=["cifake"], domain_gate=gate if gate == "features" else None)
        model = BayesFakeDetector(config).eval()
        if gate != "features":
            weights = folder / f"{gate}.safetensors"
            save_file(timm.create_model(gate, pretrained=False, num_classes=0).state_dict(), str(weights))
            attach_domain_gate(model, gate, str(weights), image_size=64)
        fit_domain_gate(model, images, labels, progress=False)
        # 1% above the largest distance of the fitted images, so that float noise between the batched fit and a
        # one-image request never puts one of them outside
        model.config.domain_threshold = choose_domain_threshold(model, images, progress=False) * 1.01
        paths.append(str(export_detector(model, folder / f"tiny-gated-{head}")))
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_space(model_ids: list[str]):
    """Build the Space on ``model_ids`` and serve it on a free local port; returns (demo, url)."""
    demo = app.build_demo(model_ids)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                max_file_size=app.MAX_FILE_SIZE)
    return demo, demo.local_url.rstrip("/")


# ----------------------------------------------------------------------------------------------------------------------
# Files: unreadable ones (each must give an error) and unusual-but-readable ones (each must give an answer + warning)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def gray_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid 8-bit grayscale PNG of zeros (``rows`` of them encoded, the rest missing), compressed as it streams:
    a few hundred KB on disk for 100M pixels, the shape of a decompression bomb."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg_bytes(size=(64, 64), mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def unreadable_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the error must contain)."""
    good_jpeg = jpeg_bytes()
    files = {
        "corrupt.jpg": (good_jpeg[:20] + bytes(range(256)) * 8, "not a readable image"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "empty.png": (b"", "empty"),
        "bomb.png": (gray_png(10_000, 10_000), "too large"),  # 100M pixels in ~100 KB
        "huge_header.png": (gray_png(40_000, 40_000, rows=1), "too many pixels"),  # PIL's own bomb limit
        "one_pixel.png": (None, "too small"),
        "not_an_image.png": (b"this is a text file, not an image\n" * 20, "not a readable image"),
    }
    out = {}
    for name, (data, phrase) in files.items():
        path = folder / name
        if data is None:
            Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
        else:
            path.write_bytes(data)
        out[name] = (path, phrase)
    return out


def unusual_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the out-of-domain warning must contain)."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    out = {}
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes((40, 40), "CMYK"))
    out["cmyk.jpg"] = (folder / "cmyk.jpg", "CMYK")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(folder / "gray16.png")
    out["gray16.png"] = (folder / "gray16.png", "16")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    out["rgba.png"] = (folder / "rgba.png", "RGBA")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    out["palette.png"] = (folder / "palette.png", "palette")
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = (folder / "animated.gif", "only the first frame")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def detector_dirs(tmp_path_factory):
    return export_tiny_detectors(tmp_path_factory.mktemp("detectors"))


@pytest.fixture(scope="module")
def server(detector_dirs):
    demo, url = launch_space([*detector_dirs, BOGUS_ID])
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def predict(client, path, num_samples=8, detectors=None):
    return client.predict(handle_file(str(path)), num_samples, detectors, api_name="/predict")


# ----------------------------------------------------------------------------------------------------------------------
# Endpoints


def test_api_lists_exactly_the_five_endpoints(client):
    assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == {
        "/predict", "/predict_batch", "/explain", "/evidence", "/models"}


def test_explain_returns_the_models_own_gradients(client, detector_dirs):
    answer = client.predict(handle_file(str(FAKE_EXAMPLE)), 8, api_name="/explain")
    assert list(answer["detectors"]) == detector_dirs
    for folder in detector_dirs:
        model, processor = load_detector(folder)
        expected = model.explain(processor(load_image(str(FAKE_EXAMPLE)), return_tensors="pt")["pixel_values"],
                                 num_samples=8, seed=detectors.SEED)
        result = answer["detectors"][folder]
        saliency = np.asarray(result["saliency"])
        assert saliency.shape == (32, 32) and saliency.max() == pytest.approx(1.0) and saliency.min() >= 0
        reference = (expected["saliency"][0] / expected["saliency"][0].max()).numpy()
        np.testing.assert_allclose(saliency, reference, atol=1e-4)
        assert result["p_fake"] == pytest.approx(expected["p_fake"][0].item(), abs=1e-6)
        top = result["top_features"]
        assert len(top) == min(detectors.TOP_FEATURES, 8)  # the tiny CNN has 8 features
        assert [f["importance"] for f in top] == sorted((f["importance"] for f in top), reverse=True)
        assert top[0]["importance"] == pytest.approx(expected["feature_importance"][0].max().item(), rel=1e-5)
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(handle_file(__file__), 8, api_name="/explain")


def test_page_runs_each_detector_once_for_verdict_and_explanation(client, detector_dirs, monkeypatch):
    """The page's verdicts come from the same run as its explanation chart, and equal what /predict answers."""
    pool = detectors.DetectorPool.load(detector_dirs)
    calls = []
    for detector in pool.detectors.values():
        for method in ("forward", "explain"):
            real = getattr(detector.model, method)
            monkeypatch.setattr(detector.model, method,
                                lambda *a, _real=real, _m=method, **k: calls.append(_m) or _real(*a, **k))
    image = detectors.read_image(str(FAKE_EXAMPLE))
    answer, explained = pool.analyse_and_explain(image, 8)
    assert calls == ["explain"] * len(detector_dirs)
    served = predict(client, FAKE_EXAMPLE, num_samples=8)
    for name in detector_dirs:
        mine, theirs = answer["detectors"][name], served["detectors"][name]
        assert mine["verdict"] == theirs["verdict"]
        for key in ("predictive_entropy", "mutual_information", "expected_entropy"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6)
        np.testing.assert_allclose(mine["sample_p_fake"], theirs["sample_p_fake"], atol=1e-6)
        assert explained["detectors"][name]["p_fake"] == pytest.approx(mine["probs"]["FAKE"], abs=1e-6)


def test_every_torch_call_of_the_pool_runs_on_the_one_inference_thread(detector_dirs, monkeypatch):
    """Loading, /predict and the page's explain all run on INFERENCE_THREAD, whatever thread the request came on (one
    OpenMP team per process; see space/app.py)."""
    threads = []
    real_load = detectors.load_detector
    monkeypatch.setattr(detectors, "load_detector",
                        lambda *a, **k: threads.append(threading.current_thread().name) or real_load(*a, **k))
    pool = detectors.DetectorPool.load(detector_dirs)
    for detector in pool.detectors.values():
        for method in ("forward", "explain"):
            real = getattr(detector.model, method)
            monkeypatch.setattr(detector.model, method, lambda *a, _real=real, **k: threads.append(
                threading.current_thread().name) or _real(*a, **k))
    image = detectors.read_image(str(FAKE_EXAMPLE))
    requests = [threading.Thread(target=pool.analyse, args=(image, 4)),
                threading.Thread(target=pool.analyse_and_explain, args=(image, 4))]
    for request in requests:
        request.start()
    for request in requests:
        request.join()
    assert len(threads) == 3 * len(detector_dirs)  # one load, one forward and one explain each
    assert {name.rsplit("_", 1)[0] for name in threads} == {"bayesfake-inference"}


def test_plain_http_api_gives_the_gradio_client_answer(client, server):
    """The README's HTTP path (upload, /call/predict, the result event), as the benchmark drives it."""
    import httpx

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_space import http_predict

    with httpx.Client(base_url=server, timeout=60) as http:
        assert http_predict(http, FAKE_EXAMPLE, 8) == predict(client, FAKE_EXAMPLE, num_samples=8)


def test_client_with_a_reused_tls_context_gives_the_same_answers(client, server):
    """The README's faster client: gradio_client hands ``ssl_verify`` to every httpx client it opens, so a ready
    (verifying) context is built once instead of per request; the answers must not change."""
    import httpx

    fast = Client(server, verbose=False, ssl_verify=httpx.create_ssl_context())
    assert predict(fast, FAKE_EXAMPLE) == predict(client, FAKE_EXAMPLE)
    assert predict(fast, REAL_EXAMPLE, num_samples=3) == predict(client, REAL_EXAMPLE, num_samples=3)
    assert fast.predict(api_name="/models") == client.predict(api_name="/models")


def test_models_reports_loaded_configs_and_the_load_failure(client, detector_dirs):
    models = client.predict(api_name="/models")
    assert [m["name"] for m in models["loaded"]] == detector_dirs
    assert [m["config"]["head"] for m in models["loaded"]] == ["mc_dropout", "variational"]
    assert all(m["config"]["training_domain"] == TINY_DOMAIN for m in models["loaded"])
    [failure] = models["failed"]
    assert failure["name"] == BOGUS_ID and BOGUS_ID in failure["error"]


def test_page_shows_the_load_failure(client):
    page_config = json.dumps(client.config)
    assert "failed to load" in page_config and BOGUS_ID in page_config


def test_predict_returns_every_field_per_detector(client, detector_dirs):
    answer = predict(client, FAKE_EXAMPLE, num_samples=12)
    assert answer["image"] == {"name": FAKE_EXAMPLE.name, "width": 32, "height": 32, "mode": "RGB", "format": "JPEG",
                               "frames": 1}
    assert list(answer["detectors"]) == detector_dirs
    assert set(answer["headline"]) == HEADLINE_FIELDS
    assert answer["headline"] == headline({name: r["verdict"] for name, r in answer["detectors"].items()},
                                          label=detectors.short_label).to_dict()
    for result in answer["detectors"].values():
        assert RESULT_FIELDS <= set(result)
        # no domain gate: nothing to report, and the detector judges every image
        assert result["in_domain"] is None and result["domain_score"] is None and result["domain_threshold"] is None
        assert result["stochastic"] is True and result["training_data"] == []
        assert result["num_samples"] == 12 and len(result["sample_p_fake"]) == 12
        assert result["probs"]["REAL"] + result["probs"]["FAKE"] == pytest.approx(1, abs=1e-5)
        assert result["probs"]["FAKE"] == pytest.approx(np.mean(result["sample_p_fake"]), abs=1e-5)
        assert result["std"]["FAKE"] == pytest.approx(np.std(result["sample_p_fake"]), abs=1e-5)
        assert result["predictive_entropy"] == pytest.approx(
            result["mutual_information"] + result["expected_entropy"], abs=1e-5)
        assert result["verdict"] in VERDICTS
        assert result["warnings"] == []  # a 32x32 RGB JPEG is exactly the training domain


def test_predict_equals_the_raw_model_with_the_request_seed(client, detector_dirs):
    answer = predict(client, FAKE_EXAMPLE, num_samples=10)
    for folder in detector_dirs:
        model, processor = load_detector(folder)
        with torch.no_grad():
            out = model(processor(load_image(str(FAKE_EXAMPLE)), return_tensors="pt")["pixel_values"],
                        num_samples=10, seed=detectors.SEED)
        result = answer["detectors"][folder]
        assert result["probs"]["FAKE"] == pytest.approx(out.probs[0, 1].item(), abs=1e-6)
        assert result["mutual_information"] == pytest.approx(out.mutual_information[0].item(), abs=1e-6)
        assert result["verdict"] == model.verdicts(out)[0]


def test_predict_is_repeatable_and_honours_detector_choice(client, detector_dirs):
    assert predict(client, REAL_EXAMPLE) == predict(client, REAL_EXAMPLE)
    only_one = predict(client, REAL_EXAMPLE, detectors=[detector_dirs[1]])
    assert list(only_one["detectors"]) == [detector_dirs[1]]
    with pytest.raises(AppError, match="unknown detector"):
        predict(client, REAL_EXAMPLE, detectors=[BOGUS_ID])


@pytest.mark.parametrize("num_samples", [0, detectors.MAX_NUM_SAMPLES + 1, 2.5])
def test_predict_refuses_a_bad_num_samples(client, num_samples):
    with pytest.raises(AppError, match="num_samples"):
        predict(client, REAL_EXAMPLE, num_samples=num_samples)


def test_out_of_domain_example_is_answered_with_warnings(client):
    answer = predict(client, EXAMPLES / "synthetic_still_life_1024x768_rgba.png")
    for result in answer["detectors"].values():
        text = " ".join(result["warnings"])
        assert "1024x768" in text and "32x32" in text and "RGBA" in text


def test_size_warning_compares_with_the_training_images_not_the_backbone_input():
    """A backbone fed CIFAKE upsampled to 128 px learned from 32 px images: those are in its domain, 128 px ones not."""
    config = BayesFakeConfig(image_size=128, source_image_size=32, training_domain=TINY_DOMAIN)

    def warnings_for(width, height):
        image = detectors.InputImage("x.png", Image.new("RGB", (width, height)), "RGB", "PNG", 1)
        return detectors.domain_warnings(image, config)

    assert warnings_for(32, 32) == [] and warnings_for(48, 48) == []
    [warning] = warnings_for(128, 128)
    assert "128x128 px" in warning and "trained on 32x32 images" in warning and "4x larger" in warning
    assert "trained on 128x128" in " ".join(detectors.domain_warnings(
        detectors.InputImage("x.png", Image.new("RGB", (32, 32)), "RGB", "PNG", 1), BayesFakeConfig(image_size=128)))


def test_predict_batch_answers_each_image_and_reports_unreadable_ones(client, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    answers = client.predict([handle_file(str(p)) for p in (FAKE_EXAMPLE, bad, REAL_EXAMPLE)], 8, None,
                             api_name="/predict_batch")
    assert len(answers) == 3
    assert answers[1]["file"] == "broken.png" and "not a readable image" in answers[1]["error"]
    # the same image gives the same numbers alone and in a batch
    assert answers[0] == predict(client, FAKE_EXAMPLE)
    assert answers[2] == predict(client, REAL_EXAMPLE)
    with pytest.raises(AppError, match="no images"):
        client.predict([], 8, None, api_name="/predict_batch")


def test_batch_size_is_limited(detector_dirs):
    pool = detectors.DetectorPool.load(detector_dirs[:1])
    with pytest.raises(ValueError, match=f"at most {detectors.MAX_BATCH_IMAGES}"):
        pool.analyse_files([str(REAL_EXAMPLE)] * (detectors.MAX_BATCH_IMAGES + 1), 4)


# ----------------------------------------------------------------------------------------------------------------------
# Detectors with a domain gate, and the one answer over several detectors


@pytest.fixture(scope="module")
def gated_dirs(tmp_path_factory):
    return export_gated_detectors(tmp_path_factory.mktemp("gated"))


@pytest.fixture(scope="module")
def gated_client(gated_dirs, detector_dirs):
    """The two gated detectors beside an ungated one, served."""
    demo, url = launch_space([*gated_dirs, detector_dirs[0]])
    yield Client(url, verbose=False)
    demo.close()


def raw_output(folder: str, path: Path, num_samples: int = 8):
    """The model's own answer for the file, fed everything its processor makes (domain_pixel_values included)."""
    model, processor = load_detector(folder)
    inputs = processor(load_image(str(path)), return_tensors="pt")
    with torch.no_grad():
        return model, inputs, model(**inputs, num_samples=num_samples, seed=detectors.SEED)


def test_gated_detectors_report_the_models_own_domain_check(gated_client, gated_dirs, detector_dirs):
    landscape = EXAMPLES / "synthetic_landscape_640x480.jpg"
    for path in (FAKE_EXAMPLE, REAL_EXAMPLE, landscape):
        answer = predict(gated_client, path)
        for folder in gated_dirs:
            model, _, out = raw_output(folder, path)
            r = answer["detectors"][folder]
            assert r["domain_score"] == pytest.approx(out.domain_score[0].item(), rel=1e-5)
            assert r["domain_threshold"] == model.config.domain_threshold
            assert r["in_domain"] is bool(out.in_domain[0]) is (r["domain_score"] <= r["domain_threshold"])
            assert r["verdict"] == model.verdicts(out)[0] and (r["verdict"] == OUTSIDE) is (not r["in_domain"])
            assert r["training_data"] == ["cifake"]
            if path != landscape:  # the images the gates were fitted on are in their domain
                assert r["in_domain"] is True and r["verdict"] in VERDICTS
        ungated = answer["detectors"][detector_dirs[0]]
        assert ungated["in_domain"] is None and ungated["domain_score"] is None
        assert answer["headline"] == headline({n: r["verdict"] for n, r in answer["detectors"].items()},
                                              label=detectors.short_label).to_dict()
    # The extractor gate judged the 640x480 picture from its own 64 px view of the original (the processor's
    # domain_pixel_values), not from the 32 px thumbnail upsampled (what the model falls back to without them).
    model, inputs, out = raw_output(gated_dirs[1], landscape)
    assert set(inputs) == {"pixel_values", "domain_pixel_values"}
    with torch.no_grad():
        thumbnail_only = model(inputs["pixel_values"], num_samples=8, seed=detectors.SEED).domain_score[0].item()
    served = predict(gated_client, landscape)["detectors"][gated_dirs[1]]["domain_score"]
    assert served == pytest.approx(out.domain_score[0].item(), rel=1e-5)
    assert abs(served - thumbnail_only) > 1e-3 * served


def test_the_page_judges_the_domain_in_its_single_run_as_predict_does(gated_dirs):
    """model.explain (the page's one run) does not run the gate; the page adds it, and gets /predict's answer."""
    pool = detectors.DetectorPool.load(gated_dirs)
    for path in (FAKE_EXAMPLE, EXAMPLES / "synthetic_landscape_640x480.jpg"):
        image = detectors.read_image(str(path))
        page, _ = pool.analyse_and_explain(image, 8)
        served = pool.analyse(image, 8)
        assert page["headline"] == served["headline"]
        for name in gated_dirs:
            assert page["detectors"][name]["verdict"] == served["detectors"][name]["verdict"]
            assert page["detectors"][name]["in_domain"] is served["detectors"][name]["in_domain"]
            assert page["detectors"][name]["domain_score"] == pytest.approx(
                served["detectors"][name]["domain_score"], rel=1e-5)


def test_the_headline_counts_only_detectors_in_their_domain(gated_dirs):
    """Each branch on real gated detectors: a threshold below an image's score puts it outside that detector's domain
    (the rule the release's threshold applies), and the page's answer, details and batch row follow."""
    pool = detectors.DetectorPool.load(gated_dirs)
    image = detectors.read_image(str(FAKE_EXAMPLE))
    first, second = gated_dirs
    both_in = pool.analyse(image, 8)
    assert both_in["headline"]["outside"] == [] and sorted(
        both_in["headline"]["answered"] + both_in["headline"]["abstained"]) == sorted(gated_dirs)
    scores = {name: r["domain_score"] for name, r in both_in["detectors"].items()}
    pool.detectors[first].model.config.domain_threshold = scores[first] / 2
    one_out = pool.analyse(image, 8)
    assert one_out["detectors"][first]["verdict"] == OUTSIDE and one_out["detectors"][first]["in_domain"] is False
    assert one_out["headline"]["outside"] == [first]
    assert one_out["headline"]["verdict"] == one_out["detectors"][second]["verdict"]  # the one left decides
    nothing = {"findings": [], "summary": "", "errors": [], "says": "none", "strong": False, "checked": {"c2pa": "-"}}
    text, _ = provenance.headline(nothing, one_out)
    assert text.split("\n\n")[0] == provenance.bold_verdict(one_out["headline"]["explanation"])
    assert "tiny-gated-mc_dropout cannot judge it (the image is outside what it was trained on)" in text
    details = app.verdict_markdown(one_out)
    assert (f"**the image is outside what it was trained on** (score {scores[first]:.3g}, limit "
            f"{scores[first] / 2:.3g}; higher means less like its training data)") in details
    assert "the image is like its training data (score" in details
    pool.detectors[second].model.config.domain_threshold = scores[second] / 2
    none_in = pool.analyse(image, 8)
    assert none_in["headline"]["verdict"] == OUTSIDE and none_in["headline"]["outside"] == gated_dirs
    assert none_in["headline"]["explanation"].startswith(
        "No verdict: the image is outside what the selected detectors were trained on")
    figure = charts.domain_chart(list(none_in["detectors"].values()))  # each score against its limit
    [axes] = figure.axes
    assert [bar.get_height() for bar in axes.patches] == pytest.approx([scores[first], scores[second]])
    assert charts.domain_chart([{**r, "domain_score": None} for r in none_in["detectors"].values()]) is None
    row = app.batch_table([{**none_in, "evidence": nothing}]).iloc[0]
    assert row["in_domain"] is False and row["domain_score"] == round(scores[first], 4)
    assert row["headline"] == OUTSIDE and row["headline_outside"] == "; ".join(gated_dirs)


def test_the_page_says_what_the_detectors_know_and_explains_its_words(gated_dirs, detector_dirs, tmp_path):
    torch.manual_seed(0)
    plain = export_detector(BayesFakeDetector(BayesFakeConfig(
        cnn_widths=[4, 8, 8], head="deterministic", training_domain=TINY_DOMAIN)), tmp_path / "tiny-deterministic")
    pool = detectors.DetectorPool.load([*gated_dirs, detector_dirs[0], str(plain)])
    scope = app.scope_markdown(pool)
    assert scope.startswith(f"**What the detectors know.** All 4 detectors learned from {TINY_DOMAIN}.")
    assert "cannot judge real photos at full size, or pictures from other generators" in scope
    assert "tiny-mc_dropout and tiny-deterministic have no domain check and still answer them" in scope
    table = app.detectors_markdown(pool)  # the Detectors tab
    assert "| own features, limit " in table and "| test_efficientnet, limit " in table
    assert table.count("| none (answers every image) |") == 2
    answer, _ = pool.analyse_and_explain(detectors.read_image(str(REAL_EXAMPLE)), 8)
    details = app.verdict_markdown(answer)
    assert "nats: 0 is sure, 0.69 is a coin toss" in details
    assert "the detector's own doubt: how much its samples disagree, the mutual information" in details
    assert "ambiguity in the image itself" in details
    deterministic = app.detector_markdown(answer["detectors"][str(plain)])
    assert answer["detectors"][str(plain)]["stochastic"] is False
    assert "no sampling spread (deterministic)" in deterministic and "±" not in deterministic
    assert "none: this detector has no domain check" in deterministic
    alone = detectors.DetectorPool.load([detector_dirs[0]])
    assert "no detector here has a domain check yet, so it still answers such images" in app.scope_markdown(alone)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's notice on bomb.png's header
def test_every_unreadable_file_gives_a_clear_error_and_the_server_keeps_answering(client, tmp_path):
    for name, (path, phrase) in unreadable_files(tmp_path).items():
        with pytest.raises(AppError) as caught:
            predict(client, path)
        message = str(caught.value)
        assert name in message and phrase in message, f"{name}: {message}"
        assert "/tmp/gradio" not in message, f"{name}: the error leaks a server path: {message}"
    assert set(predict(client, FAKE_EXAMPLE)["detectors"])  # still up and answering


def test_unusual_but_readable_files_are_answered_with_a_warning(client, tmp_path):
    for name, (path, phrase) in unusual_files(tmp_path).items():
        answer = predict(client, path)
        for result in answer["detectors"].values():
            assert any(phrase in warning for warning in result["warnings"]), f"{name}: {result['warnings']}"


def test_plain_string_paths_are_refused(client):
    """A bare string would name a file on the server: the API only accepts uploaded files."""
    with pytest.raises(AppError):
        client.predict(str(FAKE_EXAMPLE), 8, None, api_name="/predict")


# ----------------------------------------------------------------------------------------------------------------------
# What the file itself says (the evidence package), through the real server


EVIDENCE_FIELDS = {"findings", "summary", "errors", "says", "strong", "checked", "format", "size"}


def camera_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R5"
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 10:11:12"
    return evidence_jpeg(photo(320, 240), exif)


@pytest.fixture(scope="module")
def evidence_files(tmp_path_factory, c2pa_signing):
    """name -> path: generator parameters (A1111 PNG), camera EXIF (JPEG), a valid C2PA AI credential (JPEG), no
    metadata, an empty file, and the A1111 PNG cut in half (its parameters chunk is before the cut)."""
    folder = tmp_path_factory.mktemp("evidence")
    a1111 = png_bytes(photo(320, 240), {"parameters": A1111})
    files = {
        "a1111.png": a1111,
        "camera.jpg": camera_jpeg(),
        "c2pa.jpg": c2pa_signing["sign"](evidence_jpeg(photo(320, 240)), "image/jpeg",
                                         "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"),
        "plain.png": png_bytes(photo(320, 240)),
        "empty.png": b"",
        "truncated.png": a1111[: len(a1111) // 2],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def read_evidence_of(client, path):
    return client.predict(handle_file(str(path)), api_name="/evidence")


def test_predict_answers_what_a_file_with_generator_parameters_says(client, evidence_files, detector_dirs):
    answer = predict(client, evidence_files["a1111.png"])
    assert list(answer["detectors"]) == detector_dirs and set(answer["detectors"][detector_dirs[0]]) >= RESULT_FIELDS
    found = answer["evidence"]
    assert set(found) >= EVIDENCE_FIELDS
    assert found["says"] == "ai-generated" and found["strong"] is True
    [finding] = found["findings"]
    assert finding["kind"] == "parameters" and finding["strong"] and finding["fields"]["Seed"] == "1234567"
    assert finding["proves"].startswith("Proves:") and "Does not prove" in finding["proves"]
    assert found == read_evidence_of(client, evidence_files["a1111.png"])  # /evidence: the same, without detectors


def test_camera_exif_survives_the_upload(client, evidence_files):
    found = predict(client, evidence_files["camera.jpg"])["evidence"]
    assert found["says"] == "camera" and found["strong"] is False  # EXIF is a weak label, never proof
    [finding] = found["findings"]
    assert finding["kind"] == "exif" and finding["fields"]["Model"] == "Canon EOS R5"
    assert "does not show the image is real" in found["summary"]


def test_a_c2pa_credential_survives_the_upload_and_validates(client, evidence_files):
    """The signature covers the file's bytes: it validates only if the Space reads exactly what was uploaded."""
    found = predict(client, evidence_files["c2pa.jpg"])["evidence"]
    assert found["says"] == "ai-generated" and found["strong"] is True
    finding = found["findings"][0]
    assert finding["kind"] == "c2pa" and finding["fields"]["validation"] == "valid"
    assert finding["fields"]["signer"] == "bayesfake test signer"
    text, tone = provenance.headline(found, predict(client, evidence_files["c2pa.jpg"]))
    assert tone == "ai" and text.startswith(
        "The file itself says it was made by an AI generator (valid C2PA credential from 'bayesfake test signer').")


def test_a_file_without_metadata_is_no_evidence_either_way(client, evidence_files):
    answer = predict(client, evidence_files["plain.png"])
    assert answer["evidence"]["says"] == "none" and answer["evidence"]["findings"] == []
    text, tone = provenance.headline(answer["evidence"], answer)
    assert tone == "none" and text.startswith(provenance.bold_verdict(answer["headline"]["explanation"]))
    assert "No provenance evidence in the file; this does not mean the image is real." in text


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Truncated File Read"
def test_empty_and_truncated_files_get_a_clear_error_and_the_server_keeps_answering(client, evidence_files):
    for name, phrase in (("empty.png", "the file is empty (0 bytes)"), ("truncated.png", "truncated")):
        with pytest.raises(AppError) as caught:
            predict(client, evidence_files[name])
        assert name in str(caught.value) and phrase in str(caught.value)
        assert set(predict(client, FAKE_EXAMPLE)["detectors"])  # still answering
    empty = read_evidence_of(client, evidence_files["empty.png"])
    assert empty["findings"] == [] and empty["says"] == "none" and "empty file (0 bytes)" in empty["errors"][0]
    # The truncated PNG's pixels cannot be decoded, but its parameters chunk came before the cut
    truncated = read_evidence_of(client, evidence_files["truncated.png"])
    assert truncated["says"] == "ai-generated" and truncated["strong"] is True
    assert any("truncated" in error for error in truncated["errors"])
    text, tone = provenance.headline(truncated, None, "truncated.png: not a readable image")
    assert tone == "ai" and "could not analyse the image: truncated.png" in text
    answers = client.predict([handle_file(str(evidence_files[name])) for name in ("truncated.png", "a1111.png",
                                                                                   "empty.png")],
                             8, None, api_name="/predict_batch")
    assert [a.get("error", "").split(":")[0] for a in answers] == ["truncated.png", "", "empty.png"]
    assert [a["evidence"]["says"] for a in answers] == ["ai-generated", "ai-generated", "none"]
    assert answers[1] == predict(client, evidence_files["a1111.png"])
    assert read_evidence_of(client, FAKE_EXAMPLE)["says"] == "none"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_unreadable_file_is_answered_by_evidence_without_server_paths(client, tmp_path):
    """/evidence reads what it can of any uploaded file: the corpus of unreadable images (a 100M-pixel bomb, a corrupt
    JPEG, text) gets an answer, never a crash, and its messages name the file, not the server's path to it."""
    for name, (path, _) in unreadable_files(tmp_path).items():
        start = time.perf_counter()
        found = read_evidence_of(client, path)
        assert time.perf_counter() - start < 10, name
        assert set(found) >= EVIDENCE_FIELDS and found["strong"] is False, name
        assert "/tmp/gradio" not in json.dumps(found) and gradio_upload_folder() not in json.dumps(found), name
    assert read_evidence_of(client, FAKE_EXAMPLE)["errors"] == []  # still answering


def gradio_upload_folder() -> str:
    import gradio.utils

    return str(gradio.utils.get_upload_folder())


def test_evidence_refuses_what_every_endpoint_refuses(client):
    with pytest.raises(AppError):
        client.predict(str(FAKE_EXAMPLE), api_name="/evidence")  # a server path, not an upload


def test_batch_table_and_csv_carry_the_evidence_columns(client, evidence_files, detector_dirs):
    answers = client.predict([handle_file(str(evidence_files[name])) for name in ("a1111.png", "empty.png",
                                                                                   "camera.jpg")],
                             4, None, api_name="/predict_batch")
    table = app.batch_table(answers)
    assert list(table.columns) == app.TABLE_COLUMNS and app.TABLE_COLUMNS[11:14] == [
        "evidence", "evidence_strong", "evidence_summary"]
    by_file = {name: rows for name, rows in table.groupby("file")}
    assert set(by_file["a1111.png"]["evidence"]) == {"ai-generated"} and by_file["a1111.png"]["evidence_strong"].all()
    assert len(by_file["a1111.png"]) == 2  # a row per detector, each with the file's evidence
    assert list(by_file["empty.png"]["evidence"]) == ["none"] and "empty" in by_file["empty.png"]["error"].iloc[0]
    assert set(by_file["camera.jpg"]["evidence"]) == {"camera"} and not by_file["camera.jpg"]["evidence_strong"].any()
    csv_text = Path(app.write_batch_csv(table)).read_text()
    # the columns of earlier releases keep their places; the domain check and the file's answer come after them
    assert csv_text.splitlines()[0] == (
        "file,detector,verdict,P(FAKE),std,epistemic,aleatoric,total,T,error,warnings,evidence,evidence_strong,"
        "evidence_summary,in_domain,domain_score,headline,headline_answered,headline_abstained,headline_outside")
    assert "Strong evidence of AI generation" in csv_text
    rows = by_file["a1111.png"]
    assert set(rows["in_domain"]) == {""} and set(rows["domain_score"]) == {""}  # no gate: empty, not False
    assert set(rows["headline"]) == {answers[0]["headline"]["verdict"]}
    assert set(rows["headline_answered"]) == {"; ".join(answers[0]["headline"]["answered"])}
    shown = app.page_table(table)  # the page: short detector names (the CSV keeps the full ones), readable headers
    assert list(shown.columns) == app.PAGE_TABLE_HEADERS and "in domain" in shown.columns
    assert set(shown["detector"]) - {""} == {detectors.short_label(name) for name in detector_dirs}


def test_evidence_is_read_on_its_own_threads_beside_the_detectors(detector_dirs, evidence_files, monkeypatch):
    """The read overlaps the decoding and the forwards, and never takes the inference thread other requests wait for."""
    threads = []
    real = provenance.evidence.read_evidence
    monkeypatch.setattr(provenance.evidence, "read_evidence",
                        lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k))
    pool = detectors.DetectorPool.load(detector_dirs)
    answer = provenance.analyse_file(pool, provenance.EvidenceReader(), str(evidence_files["a1111.png"]), 4)
    assert answer["evidence"]["says"] == "ai-generated"
    assert [name.rsplit("_", 1)[0] for name in threads] == ["bayesfake-evidence"]
    with pytest.raises(ValueError, match="num_samples"):  # refused before anything is read
        provenance.analyse_file(pool, provenance.EvidenceReader(), str(evidence_files["a1111.png"]), 0)
    assert len(threads) == 1


def test_a_batch_keeps_at_most_two_reads_queued(detector_dirs, evidence_files):
    """A 64-image batch must not fill the evidence threads' queue ahead of other requests' reads."""

    class CountingReader(provenance.EvidenceReader):
        outstanding = most = 0

        def start(self, path):
            CountingReader.outstanding += 1
            CountingReader.most = max(CountingReader.most, CountingReader.outstanding)
            return super().start(path)

        def result(self, pending):
            CountingReader.outstanding -= 1
            return super().result(pending)

    pool = detectors.DetectorPool.load(detector_dirs[:1])
    names = ["a1111.png", "empty.png", "camera.jpg", "plain.png", "truncated.png"]
    answers = provenance.analyse_files(pool, CountingReader(), [str(evidence_files[n]) for n in names], 2)
    assert [a["evidence"]["says"] for a in answers] == ["ai-generated", "none", "camera", "none", "ai-generated"]
    assert ["error" in a for a in answers] == [False, True, False, False, True]
    assert CountingReader.most == 2 and CountingReader.outstanding == 0


def test_a_read_that_hangs_or_fails_still_gets_an_answer_of_the_same_shape(evidence_files, monkeypatch):
    path = str(evidence_files["a1111.png"])
    monkeypatch.setattr(provenance.evidence, "read_evidence", lambda *a, **k: time.sleep(2))
    found = provenance.EvidenceReader(timeout_s=0.2).read(path)
    assert set(found) >= EVIDENCE_FIELDS and found["says"] == "none" and "abandoned" in found["errors"][0]
    monkeypatch.setattr(provenance.evidence, "read_evidence", lambda *a, **k: 1 / 0)
    found = provenance.EvidenceReader().read(path)
    assert found["strong"] is False and "ZeroDivisionError" in found["errors"][0]
    assert "no provenance evidence either way" in provenance.headline(found, None, "x: unreadable")[0]


def test_trusted_c2pa_signers_come_from_the_environment(c2pa_signing, monkeypatch, tmp_path):
    camera = c2pa_signing["sign"](evidence_jpeg(photo(320, 240)), "image/jpeg",
                                  "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture")
    (tmp_path / "camera.jpg").write_bytes(camera)
    monkeypatch.delenv(provenance.TRUST_ANCHORS_ENV, raising=False)
    untrusted = provenance.EvidenceReader.from_env().read(str(tmp_path / "camera.jpg"))
    assert untrusted["says"] == "camera" and untrusted["strong"] is False  # a self-made key can sign "camera"
    (tmp_path / "anchors.pem").write_text(c2pa_signing["ca_pem"])
    monkeypatch.setenv(provenance.TRUST_ANCHORS_ENV, str(tmp_path / "anchors.pem"))
    trusted = provenance.EvidenceReader.from_env().read(str(tmp_path / "camera.jpg"))
    assert trusted["says"] == "camera" and trusted["strong"] is True
    text, tone = provenance.headline(trusted)
    assert tone == "camera" and "not proof that the scene is genuine" in text and " is real" not in text
    monkeypatch.setenv(provenance.TRUST_ANCHORS_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="cannot read the C2PA trust anchors"):
        provenance.EvidenceReader.from_env()


def test_the_headline_never_counts_missing_evidence_as_real():
    def result(verdicts, warnings=()):
        return {"detectors": {f"d{i}": {"verdict": v, "warnings": list(warnings)} for i, v in enumerate(verdicts)}}

    nothing = {"findings": [], "summary": "No provenance evidence found in the file. This does not mean the image is "
               "real.", "errors": [], "says": "none", "strong": False, "checked": {"c2pa": "no embedded C2PA store"}}
    text, tone = provenance.headline(nothing, result(["likely real", "likely real"]))
    first, second, third = text.split("\n\n")
    assert tone == "none" and first == "**Likely real:** both detectors that answered agree (d0 and d1)."
    assert second == "No provenance evidence in the file; this does not mean the image is real."
    assert "not proof" in third
    text, _ = provenance.headline(nothing, result(["likely real", "uncertain: needs human review", "likely real"],
                                                  ["far"]))
    assert text.startswith("**Likely real:** both detectors that answered agree (d0 and d2); d1 was unsure.")
    assert "far from the detectors' training data" in text
    text, _ = provenance.headline(nothing, result(["likely real", "likely AI-generated"]))
    assert text.startswith("**Uncertain, needs human review:** the detectors that answered disagree (d0: likely real; "
                           "d1: likely AI-generated), so at least one of them is wrong.")
    # a detector refused by its domain gate has already said why; the size warnings speak for the others only
    answer = result(["likely real", OUTSIDE])
    answer["detectors"]["d1"]["warnings"] = ["far"]
    text, _ = provenance.headline(nothing, answer)
    assert text.startswith("**Likely real:** d0 answered; d1 cannot judge it (the image is outside what it was trained "
                           "on).") and "far from" not in text
    text, _ = provenance.headline(nothing, result([OUTSIDE, OUTSIDE]))
    assert text.startswith("**No verdict:** the image is outside what the selected detectors were trained on (d0 and "
                           "d1)")
    weak = {**nothing, "says": "camera", "summary": "Weak camera evidence only: ... does not show the image is real.",
            "findings": [{"kind": "exif", "says": "camera", "strong": False, "detail": "", "proves": "", "fields": {}}]}
    text, tone = provenance.headline(weak, result(["likely real"]))
    assert tone == "none" and "Weak camera evidence only" in text
    panel = provenance.panel(weak)
    assert "Weak hint · EXIF tags · says: **camera capture**" in panel and "What was looked at" in panel


def test_the_headline_leads_with_a_strong_claim_even_beside_a_weaker_label():
    """An A1111 inpainting run (strong, ai-edited) in a file whose IPTC label says ai-generated (weak): the package's
    overall "says" is the label's, but the headline leads with the strong finding and repeats the package's summary."""
    found = {"says": "ai-generated", "strong": False, "errors": [], "checked": {"parameters": "1 text value"},
             "summary": "Weak evidence of AI generation: ...",
             "findings": [{"kind": "parameters", "says": "ai-edited", "strong": True, "detail": "", "proves": "",
                           "fields": {"generator": "AUTOMATIC1111-style web UI"}},
                          {"kind": "watermark", "says": "ai-edited", "strong": True, "detail": "", "proves": "",
                           "fields": {"marks": [{"mark": "Stable Diffusion v1 reference watermark"}]}},
                          {"kind": "iptc", "says": "ai-generated", "strong": False, "detail": "", "proves": "",
                           "fields": {}}]}
    text, tone = provenance.headline(found, {"detectors": {"d": {"verdict": "likely real", "warnings": []}}})
    assert tone == "ai" and text.split("\n\n") == [
        "The file itself says it was edited with generative AI (it carries AUTOMATIC1111-style web UI generation "
        "settings; 1 more strong finding below).",
        "Pixel detectors, a separate and weaker signal. Likely real: d answered.",
        "Weak evidence of AI generation: ..."]


# ----------------------------------------------------------------------------------------------------------------------
# Load


def test_eight_concurrent_clients_are_all_answered_identically(server):
    answers, failures = {}, []

    def worker(i):
        try:
            client = Client(server, verbose=False)
            answers[i] = [predict(client, path) for path in (FAKE_EXAMPLE, REAL_EXAMPLE)]
        except Exception as err:  # noqa: BLE001 - every failure is counted and reported
            failures.append(f"client {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == [] and len(answers) == 8
    # concurrent requests sample with the same seed and must not disturb each other's draws
    assert all(answer == answers[0] for answer in answers.values())


# ----------------------------------------------------------------------------------------------------------------------
# Start-up


def test_model_ids_come_from_the_flag_then_the_env_then_models_txt_then_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(app, "MODELS_FILE", tmp_path / "models.txt")  # a built Space folder's list
    monkeypatch.setenv(app.MODELS_ENV, "a/b, ./c ,")
    assert app.model_ids_from(None) == ["a/b", "./c"]
    assert app.model_ids_from("x/y") == ["x/y"]
    monkeypatch.delenv(app.MODELS_ENV)
    assert app.model_ids_from(None) == list(app.DEFAULT_REPO_IDS)
    (tmp_path / "models.txt").write_text("# served by default\norg/one\n\n  org/two  # second\n")
    assert app.model_ids_from(None) == ["org/one", "org/two"]
    assert app.model_ids_from("x/y") == ["x/y"]


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_a_bad_torch_thread_count_is_refused_before_anything_loads(value, capsys):
    with pytest.raises(SystemExit):
        app.main(["--torch-threads", value])
    assert f"expected a whole number >= 1, got {value!r}" in capsys.readouterr().err


def test_the_space_program_uses_one_torch_thread_unless_told(monkeypatch):
    threads_at_launch = []

    class Unlaunched:  # stands in for the built demo: records the thread count the server would start with
        def launch(self, **kwargs):
            threads_at_launch.append(torch.get_num_threads())

    monkeypatch.setattr(app, "build_demo", lambda model_ids: Unlaunched())
    monkeypatch.delenv(app.TORCH_THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    try:
        app.main(["--models", "x/y"])
        monkeypatch.setenv(app.TORCH_THREADS_ENV, "3")
        app.main(["--models", "x/y"])
        app.main(["--models", "x/y", "--torch-threads", "2"])  # the flag wins over the variable
    finally:
        torch.set_num_threads(before)
    assert threads_at_launch == [app.DEFAULT_TORCH_THREADS, 3, 2]


def test_module_level_demo_is_built_once_on_the_default_models():
    """`from space.app import demo` (what gradio's reload mode and Spaces tooling look up) gives the default Space."""
    import gradio as gr

    assert isinstance(app.demo, gr.Blocks) and app.demo is app.demo


def test_python_space_app_py_serves_on_the_env_port(detector_dirs, tmp_path):
    """`python space/app.py` from the repo root: --models, GRADIO_SERVER_NAME/PORT, BAYESFAKE_TORCH_THREADS, answers
    /models."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", BAYESFAKE_MODELS=BOGUS_ID, BAYESFAKE_TORCH_THREADS="2")
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "space/app.py", "--models", detector_dirs[0]], cwd=REPO_ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the app exited:\n{log_path.read_text()}"
            try:
                models = Client(f"http://127.0.0.1:{port}", verbose=False).predict(api_name="/models")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, f"no answer in 120 s:\n{log_path.read_text()}"
                time.sleep(0.5)
        # the flag wins over BAYESFAKE_MODELS
        assert [m["name"] for m in models["loaded"]] == detector_dirs[:1] and models["failed"] == []
        assert models["torch_threads"] == 2
    finally:
        process.terminate()
        process.wait(timeout=30)
