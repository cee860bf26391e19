"""The Space's panel for autoencoder detectors (issue 15): /explain and the page show the image as the detector sees
it, what it rebuilds and the per-pixel error map; other detectors' answers are unchanged. Tiny exported autoencoders
(colour and greyscale) beside a tiny CNN; the pool and the chart directly, then /explain through a served Space, then
the page in a browser."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from hub_models.export import export_detector  # noqa: E402
from hub_models.hub import load_detector  # noqa: E402
from space import charts, detectors  # noqa: E402

from test_autoencoder import tiny_model  # noqa: E402
from test_space_app import FAKE_EXAMPLE, export_tiny_detectors, launch_space  # noqa: E402
from test_space_browser import browser, page  # noqa: E402, F401 - fixtures (page reads this module's server)

SIZE = 32  # test_autoencoder's tiny detectors' input side


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A colour and a greyscale tiny autoencoder detector, then a tiny MC-Dropout CNN (no decoder)."""
    folder = tmp_path_factory.mktemp("ae-space")
    colour = export_detector(tiny_model(training_domain="CIFAKE (tiny test autoencoder)"), folder / "tiny-ae")
    grey = export_detector(tiny_model(greyscale=True, training_domain="CIFAKE (tiny test autoencoder)"),
                           folder / "tiny-ae-grey")
    return [str(colour), str(grey), export_tiny_detectors(folder)[0]]


def expected_reconstruction(folder: str) -> dict:
    model, processor = load_detector(folder)
    pixel_values = processor(str(FAKE_EXAMPLE), return_tensors="pt")["pixel_values"]
    return model.reconstruct(pixel_values)


def test_the_pool_explains_an_autoencoder_with_its_own_reconstruction(model_dirs, one_thread):
    pool = detectors.DetectorPool.load(model_dirs)
    assert not pool.failed
    answer, explained = pool.analyse_and_explain(detectors.read_image(str(FAKE_EXAMPLE)), 8)
    colour, grey, cnn = model_dirs
    assert "reconstruction" not in explained["detectors"][cnn]
    for folder, channels in ((colour, 3), (grey, 1)):
        shown = explained["detectors"][folder]["reconstruction"]
        expected = expected_reconstruction(folder)
        seen, rebuilt, error = (np.asarray(shown[k]) for k in ("seen", "rebuilt", "error_map"))
        assert seen.shape == rebuilt.shape == (SIZE, SIZE, channels) and error.shape == (SIZE, SIZE)
        np.testing.assert_allclose(seen, expected["target"][0].permute(1, 2, 0).numpy(), atol=1e-4)
        np.testing.assert_allclose(rebuilt, expected["reconstruction"][0].permute(1, 2, 0).numpy(), atol=1e-4)
        np.testing.assert_allclose(error, np.abs(seen - rebuilt).mean(-1), atol=2e-4)
        assert shown["reconstruction_error"] == pytest.approx(expected["reconstruction_error"][0].item(), rel=1e-5)
        assert 0 <= seen.min() and seen.max() <= 1 and 0 <= rebuilt.min() and rebuilt.max() <= 1
        # the verdict is the same run's, and the detector's P(FAKE) is what the explanation differentiated
        assert explained["detectors"][folder]["p_fake"] == pytest.approx(answer["detectors"][folder]["probs"]["FAKE"],
                                                                         abs=1e-6)


def test_the_reconstruction_chart_shows_three_panels_per_autoencoder_and_nothing_without_one(model_dirs,
                                                                                             one_thread):
    pool = detectors.DetectorPool.load(model_dirs)
    image = detectors.read_image(str(FAKE_EXAMPLE))
    _, explained = pool.analyse_and_explain(image, 4)
    figure = charts.reconstruction_chart(list(explained["detectors"].values()))
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert len(panels) == 6  # two autoencoders x (seen, rebuilt, error map); the CNN has no row
    titles = [ax.get_title() for ax in panels]
    assert sum("What it sees" in t for t in titles) == 2 and sum("Where they differ" in t for t in titles) == 2
    error_panel = panels[2]
    np.testing.assert_allclose(error_panel.images[0].get_array(),
                               np.asarray(explained["detectors"][model_dirs[0]]["reconstruction"]["error_map"]))
    assert error_panel.images[0].get_clim() == (0, charts.ERROR_MAP_MAX)
    assert panels[3].images[0].get_array().ndim == 2  # the greyscale detector's view is drawn as one channel
    _, only_cnn = pool.analyse_and_explain(image, 4, [model_dirs[2]])
    assert charts.reconstruction_chart(list(only_cnn["detectors"].values())) is None


def test_explain_serves_the_reconstruction_and_predict_is_unchanged(model_dirs, server):
    client = Client(server, verbose=False)
    answer = client.predict(handle_file(str(FAKE_EXAMPLE)), 8, api_name="/explain")
    colour, grey, cnn = model_dirs
    assert "reconstruction" not in answer["detectors"][cnn]
    expected = expected_reconstruction(colour)
    served = answer["detectors"][colour]["reconstruction"]
    np.testing.assert_allclose(np.asarray(served["rebuilt"]),
                               expected["reconstruction"][0].permute(1, 2, 0).numpy(), atol=1e-4)
    assert np.asarray(answer["detectors"][grey]["reconstruction"]["seen"]).shape == (SIZE, SIZE, 1)
    predicted = client.predict(handle_file(str(FAKE_EXAMPLE)), 8, api_name="/predict")
    for folder in model_dirs:
        assert "reconstruction" not in predicted["detectors"][folder]
        model, processor = load_detector(folder)
        with torch.inference_mode():
            out = model(**processor(str(FAKE_EXAMPLE), return_tensors="pt"), num_samples=8, seed=detectors.SEED)
        assert predicted["detectors"][folder]["probs"]["FAKE"] == pytest.approx(out.probs[0, 1].item(), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The page, in a browser


@pytest.fixture(scope="module")
def server(model_dirs):
    demo, url = launch_space(model_dirs)
    yield url
    demo.close()


def test_the_page_shows_the_reconstruction_panel_only_for_autoencoders(page, model_dirs, tmp_path):
    from playwright.sync_api import expect

    from test_space_browser import open_details, wait_until_idle

    plot, caption = page.locator("#reconstruction-plot"), page.locator("#reconstruction-caption")
    page.locator("#image-input input[type=file]").set_input_files(str(FAKE_EXAMPLE))
    wait_until_idle(page)
    open_details(page)
    expect(plot.locator("img")).to_be_visible()
    expect(caption).to_contain_text("What an autoencoder detector rebuilds")
    expect(caption).to_contain_text("bright = drawn back badly")
    shot = tmp_path / "space_reconstruction.png"
    plot.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000  # two rows of three rendered panels, not a blank box
    for folder in model_dirs[:2]:  # leave only the CNN selected: no autoencoder, no panel
        page.locator("#detectors").get_by_label(folder, exact=True).uncheck()
    page.locator("#run").click()
    wait_until_idle(page)
    expect(plot).not_to_be_visible()
    expect(caption).not_to_be_visible()
