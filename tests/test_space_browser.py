"""The Space's page driven in Debian's chromium with Playwright: upload, analyse, charts, verdict, a bad file, the batch
tab, and what the file itself says (the headline and the evidence panel, from files uploaded by the browser as they
are). Screenshots go to the test's tmp_path. Needs /usr/bin/chromium (scripts/test.sh installs it on a fresh
machine)."""

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402
from test_evidence import A1111, photo, png_bytes  # noqa: E402
from test_space_app import (BOGUS_ID, EXAMPLES, camera_jpeg, export_gated_detectors,  # noqa: E402
                            export_tiny_detectors, launch_space)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000  # two shared CPU cores: a first analysis (plots included) can take a few seconds
# expect() has its own 5 s default, which a busy machine overran (an analysis took 5.3 s beside four other jobs).
expect.set_options(timeout=TIMEOUT_MS)
CHART_IDS = ("domain-plot", "p-fake-plot", "uncertainty-plot", "samples-plot", "explanation-plot")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # two detectors without a domain gate (as the releases before 2.0.0) and two with one
    folder = tmp_path_factory.mktemp("detectors")
    demo, url = launch_space([*export_tiny_detectors(folder), *export_gated_detectors(folder), BOGUS_ID])
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (scripts/test.sh does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    yield page
    page.close()


def wait_until_idle(page):
    """Wait for the running event to finish: gradio fades (class "pending") every output while it runs."""
    expect(page.locator(".pending")).to_have_count(0)


def open_details(page):
    """Unfold each detector's numbers and charts (folded under the answer)."""
    page.locator("#details").get_by_text("Each detector in detail").click()
    expect(page.locator("#verdict")).to_be_visible()


HEADLINE_STARTS = re.compile(r"^(Likely AI-generated: |Likely real: |Uncertain, needs human review: |No verdict: )")


def test_upload_and_analyse_shows_verdicts_and_charts(page, tmp_path):
    expect(page.locator("#load-errors")).to_contain_text(BOGUS_ID)  # the failed detector is named on the page
    # what the detectors were trained on and what they cannot judge, before anything is uploaded
    expect(page.locator("#scope")).to_contain_text("What the detectors know. All 4 detectors learned from CIFAKE")
    expect(page.locator("#scope")).to_contain_text("cannot judge real photos at full size")
    verdict = page.locator("#verdict")
    page.locator("#image-input input[type=file]").set_input_files(str(EXAMPLES / "cifake_fake_1.jpg"))
    # one answer first, in one sentence; the details are folded until asked for
    expect(page.locator("#headline p").first).to_have_text(HEADLINE_STARTS)
    expect(verdict).not_to_be_visible()
    wait_until_idle(page)
    page.screenshot(path=str(tmp_path / "space_answer_first.png"), full_page=True)
    open_details(page)
    expect(verdict).to_contain_text("T = 30 samples")  # an upload runs the detectors with the default T
    page.locator("#num-samples input[type=number]").fill("12")
    page.locator("#num-samples input[type=number]").press("Enter")
    page.locator("#run").click()
    expect(verdict).to_contain_text("T = 12 samples")
    wait_until_idle(page)
    expect(verdict).to_contain_text("tiny-mc_dropout")
    expect(verdict).to_contain_text("tiny-variational")
    expect(verdict).to_contain_text("Trained on")
    expect(verdict).to_contain_text("Domain check: the image is like its training data")  # the gated ones
    expect(verdict).to_contain_text("Domain check: none: this detector has no domain check")
    expect(verdict).to_contain_text("nats: 0 is sure, 0.69 is a coin toss")
    assert any(words in verdict.inner_text() for words in ("likely AI-generated", "likely real", "uncertain"))
    for chart in CHART_IDS:
        expect(page.locator(f"#{chart} img")).to_be_visible()
    shot = tmp_path / "space_one_image.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000  # a page with four rendered charts, not a blank one


def test_out_of_domain_example_shows_the_warning(page):
    page.locator("#image-input input[type=file]").set_input_files(
        str(EXAMPLES / "synthetic_still_life_1024x768_rgba.png"))
    open_details(page)
    expect(page.locator("#verdict")).to_contain_text("Far from this detector's training data")
    expect(page.locator("#verdict")).to_contain_text("1024x768")


def test_a_bad_file_gets_a_clear_message_and_the_page_keeps_working(page, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text, not an image\n")
    page.locator("#image-input input[type=file]").set_input_files(str(bad))
    expect(page.locator("#headline")).to_contain_text("Could not analyse this image")
    open_details(page)
    expect(page.locator("#verdict")).to_contain_text("Could not analyse this image")
    expect(page.locator("#verdict")).to_contain_text("not a readable image")
    expect(page.locator(".toast-body.warning")).to_contain_text("not_an_image.png: not a readable image")
    wait_until_idle(page)
    page.screenshot(path=str(tmp_path / "space_bad_file.png"), full_page=True)
    page.locator("#image-input").get_by_role("button", name="Clear").click()
    expect(page.locator("#headline")).to_contain_text("Upload an image or pick an example")
    page.locator("#image-input input[type=file]").set_input_files(str(EXAMPLES / "cifake_real_1.jpg"))
    expect(page.locator("#headline p").first).to_have_text(HEADLINE_STARTS)
    expect(page.locator("#verdict")).to_contain_text("P(FAKE) =")
    expect(page.locator("#p-fake-plot img")).to_be_visible()


def test_batch_tab_gives_a_table_a_csv_and_charts(page, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    page.get_by_role("tab", name="Batch").click()
    files = [EXAMPLES / "cifake_real_2.jpg", EXAMPLES / "cifake_fake_2.jpg", bad]
    page.locator("#batch-input input[type=file]").set_input_files([str(f) for f in files])
    page.locator("#run-batch").click()
    expect(page.locator("#batch-status")).to_contain_text("2 of 3 images analysed")
    table = page.locator("#batch-table")
    for name in ("cifake_real_2.jpg", "cifake_fake_2.jpg", "broken.jpg", "not a readable image"):
        expect(table).to_contain_text(name)
    expect(page.locator("#batch-csv")).to_contain_text(".csv")
    csv_text = page.request.get(page.locator("#batch-csv a").first.get_attribute("href")).text()
    assert csv_text.startswith("file,detector,verdict,P(FAKE),std,epistemic,aleatoric,total,T,error,warnings,"
                               "evidence,evidence_strong,evidence_summary")
    expect(page.locator("#batch-status")).to_contain_text("no file carries strong provenance evidence")
    status = page.locator("#batch-status").inner_text()
    line = next(line for line in status.splitlines() if "cifake_real_2.jpg" in line)
    # each file's one answer, then what the file itself says
    assert HEADLINE_STARTS.match(line.split("cifake_real_2.jpg: ", 1)[1]) and "No provenance evidence found" in line
    assert csv_text.count("cifake_real_2.jpg") == 4 and "broken.jpg" in csv_text  # a row per detector, and the error
    assert csv_text.splitlines()[0].endswith(",in_domain,domain_score,headline,headline_answered,headline_abstained,"
                                             "headline_outside")
    for chart in ("batch-p-fake-plot", "batch-epistemic-plot"):
        expect(page.locator(f"#{chart} img")).to_be_visible()
    wait_until_idle(page)
    page.screenshot(path=str(tmp_path / "space_batch.png"), full_page=True)


def test_clicking_an_example_analyses_it(page):
    """Examples reach the analysis from gradio's cache folder, which the Space's uploaded-files-only rule allows."""
    page.locator("img[src*='cifake_real_3.jpg']").click()
    open_details(page)
    expect(page.locator("#verdict")).to_contain_text("cifake_real_3.jpg: 32x32 px")
    expect(page.locator("#verdict")).to_contain_text("P(FAKE) =")
    expect(page.locator(".toast-body")).to_have_count(0)
    # no metadata: the detectors' guess is the answer, and the missing evidence is not taken for "real"
    expect(page.locator("#headline p").first).to_have_text(HEADLINE_STARTS)
    expect(page.locator("#headline")).to_contain_text(
        "No provenance evidence in the file; this does not mean the image is real.")
    expect(page.locator("#image-preview img")).to_be_visible()


def boxes(page, *ids) -> dict:
    return {i: page.locator(f"#{i}").bounding_box() for i in ids}


def overlap(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"] or a["y"] + a["height"] <= b["y"]
                or b["y"] + b["height"] <= a["y"])


def test_a_file_with_generator_settings_gets_the_headline_and_the_evidence_panel(page, tmp_path):
    """The browser uploads the PNG as it is (a plain file input: nothing re-encoded), so its A1111 parameters reach the
    Space: the headline says so first, in one sentence, and the panel explains the finding in plain words."""
    generated = tmp_path / "generated_fox.png"
    generated.write_bytes(png_bytes(photo(640, 480), {"parameters": A1111}))
    page.locator("#image-input input[type=file]").set_input_files(str(generated))
    headline, panel = page.locator("#headline"), page.locator("#evidence-panel")
    expect(headline).to_contain_text("The file itself says it was made by an AI generator (it carries "
                                     "AUTOMATIC1111-style web UI generation settings).")
    expect(headline).to_have_class(re.compile(r"\btone-ai\b"))
    expect(headline).to_contain_text("Pixel detectors, a separate and weaker signal")
    expect(panel).to_contain_text("Strong evidence · Generator settings · says: made by AI")
    expect(panel).to_contain_text("Seed: 1234567")
    expect(panel).to_contain_text("Does not prove it beyond doubt")
    expect(page.locator("#image-preview img")).to_be_visible()
    wait_until_idle(page)
    open_details(page)
    expect(page.locator("#verdict")).to_contain_text("P(FAKE) =")
    # one clear answer first: the headline tops the result column, and nothing overlaps it
    found = boxes(page, "headline", "evidence-panel", "verdict", "image-input", "image-preview")
    assert found["headline"]["y"] < found["evidence-panel"]["y"] < found["verdict"]["y"]
    assert abs(found["headline"]["y"] - found["image-input"]["y"]) < 5  # level with the upload, not below the fold
    assert all(not overlap(found[a], found[b]) for a, b in (
        ("headline", "evidence-panel"), ("evidence-panel", "verdict"), ("headline", "image-preview"),
        ("evidence-panel", "image-preview"), ("image-input", "image-preview")))
    first_line = page.locator("#headline p").first
    assert first_line.evaluate("e => parseFloat(getComputedStyle(e).fontSize)") > page.locator(
        "#evidence-panel p").first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
    shot = tmp_path / "space_evidence.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000


def test_camera_exif_survives_the_browser_upload(page, tmp_path):
    """An image input would re-encode the JPEG and drop its EXIF before the Space sees it; the file input keeps it."""
    camera = tmp_path / "camera.jpg"
    camera.write_bytes(camera_jpeg())
    page.locator("#image-input input[type=file]").set_input_files(str(camera))
    expect(page.locator("#evidence-panel")).to_contain_text("Weak hint · EXIF tags · says: camera capture")
    expect(page.locator("#evidence-panel")).to_contain_text("Canon EOS R5")
    expect(page.locator("#headline")).to_contain_text("does not show the image is real")
    expect(page.locator("#headline")).to_have_class(re.compile(r"\btone-none\b"))
