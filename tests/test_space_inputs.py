"""Requests the Space must answer with a reason, or answer at all without stalling: raw HTTP calls with missing
arguments or files that were never uploaded, files elsewhere on the server (never opened), a detector named by a plain
string, and an image of extreme aspect ratio (quick, bounded memory). Served for real on 127.0.0.1."""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio.utils  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402
from test_space_app import (FAKE_EXAMPLE, REAL_EXAMPLE, TINY_DOMAIN, export_tiny_detectors, gray_png,  # noqa: E402
                            launch_space, predict)

from hub_models import BayesFakeConfig, BayesFakeDetector  # noqa: E402
from hub_models.export import export_detector  # noqa: E402
from hub_models.image_processing_bayesfake import load_image, to_rgb  # noqa: E402
from space import charts, detectors  # noqa: E402

FILE_META = {"_type": "gradio.FileData"}
TALL = (8, 100_000)  # width, height: a few hundred bytes as a PNG of zeros


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def detector_dirs(tmp_path_factory):
    """The two tiny 32 px detectors and a tiny 128 px one: an 8 px side scaled up to 128 px is the memory blow-up."""
    folder = tmp_path_factory.mktemp("detectors")
    torch.manual_seed(0)
    config = BayesFakeConfig(cnn_widths=[4, 8, 8], head_hidden=[8], image_size=128, training_domain=TINY_DOMAIN)
    return [*export_tiny_detectors(folder), str(export_detector(BayesFakeDetector(config), folder / "tiny-128px"))]


@pytest.fixture(scope="module")
def server(detector_dirs):
    demo, url = launch_space(detector_dirs)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def call_http(url: str, endpoint: str, data: list) -> tuple[str, object]:
    """gradio's plain HTTP API: POST /gradio_api/call/ENDPOINT {"data": data}, then its server-sent events; returns the
    last event's name ("complete" or "error") and its data."""
    with httpx.Client(base_url=url, timeout=60) as http:
        event_id = http.post(f"/gradio_api/call/{endpoint}", json={"data": data}).raise_for_status().json()["event_id"]
        text = http.get(f"/gradio_api/call/{endpoint}/{event_id}").raise_for_status().text
    event = payload = None
    for line in text.splitlines():
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            payload = json.loads(line.removeprefix("data:"))
    return event, payload


def upload(url: str, path) -> dict:
    with httpx.Client(base_url=url, timeout=60) as http, open(path, "rb") as f:
        [server_path] = http.post("/gradio_api/upload", files={"files": (os.path.basename(path), f)}).json()
    return {"path": server_path, "orig_name": os.path.basename(path), "meta": FILE_META}


class OpenedFiles:
    """The files of ``watched`` that this process opens (a sys.audit hook on "open"; hooks cannot be removed, so one
    hook serves every use and is idle while nothing is watched)."""

    watched: set[str] = set()
    opened: list[str] = []
    installed = False

    @classmethod
    def hook(cls, event, args):
        if event == "open" and cls.watched and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path in cls.watched:
                cls.opened.append(path)

    @classmethod
    def watch(cls, *paths) -> list[str]:
        if not cls.installed:
            sys.addaudithook(cls.hook)
            cls.installed = True
        cls.opened = []
        cls.watched = {str(p) for p in paths}
        return cls.opened


# ----------------------------------------------------------------------------------------------------------------------
# Detectors named by a plain string


def test_a_detector_named_by_a_plain_string_is_one_name(client, detector_dirs):
    one = predict(client, REAL_EXAMPLE, detectors=detector_dirs[1])
    assert list(one["detectors"]) == [detector_dirs[1]]
    assert one == predict(client, REAL_EXAMPLE, detectors=[detector_dirs[1]])
    two = predict(client, REAL_EXAMPLE, detectors=f"{detector_dirs[2]}, {detector_dirs[0]}")
    assert list(two["detectors"]) == [detector_dirs[2], detector_dirs[0]]


def test_unknown_detectors_are_named_in_the_error(client, detector_dirs):
    with pytest.raises(AppError) as caught:
        predict(client, REAL_EXAMPLE, detectors="no-such-detector")
    message = str(caught.value)
    assert "unknown detector(s): 'no-such-detector'" in message and repr(detector_dirs[0]) in message
    assert "'n', 'o'" not in message  # not split into characters
    with pytest.raises(AppError, match=r"unknown detector\(s\): 'x', 'y'; loaded"):
        predict(client, REAL_EXAMPLE, detectors=f"x,{detector_dirs[0]},y")
    with pytest.raises(AppError, match="choose at least one detector"):
        predict(client, REAL_EXAMPLE, detectors=" , ")
    with pytest.raises(AppError, match="a detector name or a list of names"):
        predict(client, REAL_EXAMPLE, detectors=[3])


def test_the_batch_takes_a_detector_named_by_a_plain_string(client, detector_dirs):
    [answer] = client.predict([handle_file(str(FAKE_EXAMPLE))], 4, detector_dirs[0], api_name="/predict_batch")
    assert list(answer["detectors"]) == [detector_dirs[0]]


# ----------------------------------------------------------------------------------------------------------------------
# Raw HTTP calls: every refusal says why


def test_a_call_without_arguments_says_no_image_given(server):
    assert call_http(server, "evidence", [])[1]["error"] == "no image given"
    for endpoint in ("predict", "explain"):
        assert call_http(server, endpoint, [])[1]["error"] == "no image given"
        assert call_http(server, endpoint, [None, 8, None])[1]["error"] == "no image given"
    assert "no images given" in call_http(server, "predict_batch", [])[1]["error"]


def test_a_call_with_only_the_image_uses_the_default_num_samples(server):
    event, answer = call_http(server, "predict", [upload(server, FAKE_EXAMPLE)])
    assert event == "complete"
    assert {r["num_samples"] for r in answer[0]["detectors"].values()} == {detectors.DEFAULT_NUM_SAMPLES}


def test_the_plain_http_api_carries_the_headline_and_the_domain_fields(server, detector_dirs):
    """JSON clients without gradio_client get the new fields too (null where a detector has no domain gate), and the
    headline covers the detectors asked for, no others."""
    event, [answer] = call_http(server, "predict", [upload(server, REAL_EXAMPLE), 4, None])
    assert event == "complete"
    assert set(answer["headline"]) == {"verdict", "answered", "abstained", "outside", "explanation"}
    assert sorted(answer["headline"]["answered"] + answer["headline"]["abstained"]) == sorted(detector_dirs)
    for result in answer["detectors"].values():
        assert result["in_domain"] is None and result["domain_score"] is None
    event, [one] = call_http(server, "predict", [upload(server, REAL_EXAMPLE), 4, detector_dirs[2]])
    verdict = one["detectors"][detector_dirs[2]]["verdict"]
    assert one["headline"]["verdict"] == verdict
    assert one["headline"]["answered"] + one["headline"]["abstained"] == [detector_dirs[2]]
    event, [[batch]] = call_http(server, "predict_batch", [[upload(server, REAL_EXAMPLE)], 4, detector_dirs[2]])
    assert batch["headline"] == one["headline"]


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/bayesfake-never-uploaded.png", "relative/x.png",
                                  "{upload}/../../etc/passwd"])
def test_a_file_that_was_not_uploaded_is_refused_by_name(server, path):
    path = path.format(upload=gradio.utils.get_upload_folder())
    for data, endpoint in (([{"path": path, "meta": FILE_META}, 8, None], "predict"),
                           ([{"path": path}, 8, None], "predict"),  # no FileData meta: gradio does not check it
                           ([{"path": path, "meta": FILE_META}, 8, None], "explain"),
                           ([{"path": path, "meta": FILE_META}], "evidence"),
                           ([{"path": path}], "evidence"),
                           ([[{"path": path, "meta": FILE_META}], 8, None], "predict_batch"),
                           ([[{"path": path}], 8, None], "predict_batch")):
        event, payload = call_http(server, endpoint, data)
        assert event == "error", f"{endpoint} {data}: {payload}"
        assert payload["error"] and f"file was not uploaded to this server: {path}" in payload["error"], payload


def test_a_missing_file_in_the_upload_folder_is_named(server):
    path = os.path.join(gradio.utils.get_upload_folder(), "no-such-upload", "x.png")
    event, payload = call_http(server, "predict", [{"path": path, "meta": FILE_META}, 8, None])
    assert event == "error" and payload["error"] == "x.png: no such file"
    event, payload = call_http(server, "evidence", [{"path": path, "meta": FILE_META}])
    assert event == "error" and payload["error"] == "x.png: no such file"


def test_a_file_elsewhere_on_the_server_is_never_opened(server, tmp_path):
    """A readable image outside the upload folder: before, a FileData dict without "meta" reached the endpoint
    unchecked, and the Space analysed the server's file."""
    secret = tmp_path / "server_side.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(secret)
    opened = OpenedFiles.watch(secret)
    try:
        for endpoint, data in (("predict", [{"path": str(secret)}, 8, None]),
                               ("explain", [{"path": str(secret)}, 8, None]),
                               ("evidence", [{"path": str(secret)}]),
                               ("predict_batch", [[{"path": str(secret)}], 8, None]),
                               ("predict", [{"path": str(secret), "meta": FILE_META}, 8, None])):
            event, payload = call_http(server, endpoint, data)
            assert event == "error" and "file was not uploaded to this server" in payload["error"], payload
    finally:
        OpenedFiles.watch()
    assert opened == []


def test_a_plain_string_is_still_refused_with_the_reason(server):
    event, payload = call_http(server, "predict", [str(FAKE_EXAMPLE), 8, None])
    assert event == "error" and "send the image as an uploaded file" in payload["error"]


# ----------------------------------------------------------------------------------------------------------------------
# Extreme aspect ratios


def peak_resident_bytes() -> int:
    """The process's peak resident memory (Linux's VmHWM) since it started or since ``reset_peak``."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> int | None:
    """Reset the peak to the current resident memory and return it; None where Linux's clear_refs is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return peak_resident_bytes()


def test_an_extreme_aspect_ratio_is_answered_quickly_in_bounded_memory(client, tmp_path, detector_dirs):
    """An 8x100,000 PNG: a few hundred bytes that every processor used to scale to 128x1,600,000 px (600 MB) on the
    inference thread, which all other requests wait for."""
    tall = tmp_path / "tall.png"
    tall.write_bytes(gray_png(*TALL))
    assert tall.stat().st_size < 2_000
    predict(client, FAKE_EXAMPLE)  # warm: first-call costs are not the image's
    baseline = reset_peak()
    start = time.perf_counter()
    answer = predict(client, tall)
    seconds = time.perf_counter() - start
    extra = None if baseline is None else peak_resident_bytes() - baseline
    print(f"\n8x100,000 PNG: /predict {seconds:.2f} s, peak memory +{(extra or 0) / 2**20:.0f} MiB")
    assert seconds < 10
    if extra is not None:
        assert extra < 300 * 2**20
    assert answer["image"] == {"name": "tall.png", "width": TALL[0], "height": TALL[1], "mode": "L", "format": "PNG",
                               "frames": 1}
    assert list(answer["detectors"]) == detector_dirs
    for result in answer["detectors"].values():
        assert any("only the central square (0.008% of the image)" in w for w in result["warnings"]), result["warnings"]
    why = client.predict(handle_file(str(tall)), 4, api_name="/explain")
    assert np.asarray(why["detectors"][detector_dirs[2]]["saliency"]).shape == (128, 128)


def test_read_image_keeps_the_centre_of_an_extreme_aspect_ratio(tmp_path, detector_dirs):
    tall = tmp_path / "tall.png"
    tall.write_bytes(gray_png(*TALL))
    image = detectors.read_image(str(tall))
    assert (image.width, image.height) == TALL  # what the file is: answered, and judged by the warnings
    assert image.rgb.size == (8, 8 * detectors.MAX_ASPECT_RATIO)  # what the processors get
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 100, 3), dtype=np.uint8))
    wide.save(tmp_path / "wide.png")
    cropped = detectors.read_image(str(tmp_path / "wide.png")).rgb
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(wide)[:, 30:70])  # the centre, 40 px wide
    # the processors crop to the same ratio: the Space's crop changes no answer
    processor = detectors.load_detector(detector_dirs[2])[1]
    whole = to_rgb(load_image(str(tall)))
    assert torch.equal(processor(image.rgb, return_tensors="pt")["pixel_values"],
                       processor(whole, return_tensors="pt")["pixel_values"])
    # up to the ratio, the image reaches the processors untouched
    photo = detectors.read_image(str(FAKE_EXAMPLE.parent / "synthetic_landscape_640x480.jpg"))
    assert photo.rgb.size == (640, 480) == (photo.width, photo.height)


def test_the_explanation_chart_shows_the_detectors_central_square(tmp_path):
    """The chart's picture is what the detector saw (the central square), and drawing it never scales up a long side."""
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 60, 3), dtype=np.uint8))
    image = detectors.InputImage("wide.png", wide, "RGB", "PNG", 1)
    explanation = {"detector": "d", "p_fake": 0.5, "saliency": np.zeros((32, 32)).tolist(),
                   "top_features": [{"feature": 0, "importance": 1.0, "gradient": 0.1}]}
    fig = charts.explanation_chart(image, [explanation])
    view = np.asarray(fig.axes[0].images[0].get_array())
    expected = np.asarray(wide.crop((20, 0, 40, 20)).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(view, expected)
    start = time.perf_counter()
    tall = detectors.InputImage("tall.png", Image.new("RGB", (8, 32)), "L", "PNG", 1, size=TALL)
    charts.explanation_chart(tall, [explanation])
    assert time.perf_counter() - start < 5
