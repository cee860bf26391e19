"""The Space's figures (matplotlib, object API: no pyplot state shared between request threads)."""

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless server

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

if __package__:
    from .detectors import InputImage, short_label
else:  # run as the Space's own folder (python app.py)
    from detectors import InputImage, short_label

__all__ = ["batch_charts", "domain_chart", "explanation_chart", "reconstruction_chart", "short_label",
           "single_image_charts"]


ERROR_MAP_MAX = 0.5  # top of the reconstruction error map's colour scale (pixels in [0, 1]; larger errors saturate)


@dataclass
class BarSeries:
    """One coloured series of a grouped bar chart: a value per category, optional error bars and tick marks."""

    label: str
    values: list[float]
    errors: list[float] | None = None
    ticks: list[float] | None = None  # e.g. each detector's decision threshold, drawn across its bar


def grouped_bar_chart(title: str, ylabel: str, categories: list[str], series: list[BarSeries],
                      ylim: tuple[float, float] | None = None) -> Figure:
    # Wider for many bars (a batch), so the category labels stay readable.
    fig_width = min(16.0, max(6.4, 0.45 * len(categories) * len(series)))
    fig = Figure(figsize=(fig_width, 3.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, s.values, width, yerr=s.errors, capsize=4, label=s.label, color=f"C{i}",
                      error_kw={"elinewidth": 1.2})
        ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        for x, tick in zip(xs, s.ticks or []):
            ax.hlines(tick, x - width / 2, x + width / 2, colors="black", linestyles="dashed", linewidth=1)
    tilted = len(categories) > 3  # long file names side by side would overlap
    ax.set_xticks(range(len(categories)), categories, rotation=15 if tilted else 0, ha="right" if tilted else "center",
                  fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    # Headroom above the tallest bar for the value labels and the legend row.
    ax.set_ylim(*(ylim or (0, max([v for s in series for v in s.values] + [1e-3]) * 1.45)))
    if len(series) > 1:
        ax.legend(fontsize=7, loc="upper center", ncols=min(len(series), 3), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def p_fake_chart(categories: list[str], series: list[BarSeries]) -> Figure:
    return grouped_bar_chart("P(FAKE): mean ± std over the T samples (dashed: decision threshold)", "P(FAKE)",
                             categories, series, ylim=(0, 1.15))


def single_image_charts(results: list[dict]) -> tuple[Figure, Figure, Figure]:
    """P(FAKE) with error bars, the uncertainty split and the sampled P(FAKE) for one image, one bar per detector."""
    labels = [short_label(r["detector"]) for r in results]
    p_fake = p_fake_chart(labels, [BarSeries("P(FAKE)", [r["probs"]["FAKE"] for r in results],
                                             [r["std"]["FAKE"] for r in results], [r["threshold"] for r in results])])
    uncertainty = grouped_bar_chart(
        "Uncertainty: total = epistemic (model) + aleatoric (data)", "nats", labels,
        [BarSeries("total (predictive entropy)", [r["predictive_entropy"] for r in results]),
         BarSeries("epistemic (mutual information)", [r["mutual_information"] for r in results]),
         BarSeries("aleatoric (expected entropy)", [r["expected_entropy"] for r in results])])
    return p_fake, uncertainty, samples_chart(results)


def domain_chart(results: list[dict]) -> Figure | None:
    """Each gated detector's domain score against its limit (dashed): a bar above its line is outside what the
    detector was trained on. None when no detector has a domain gate."""
    gated = [r for r in results if r.get("domain_score") is not None]
    if not gated:
        return None
    return grouped_bar_chart(
        "Domain check (dashed: each detector's limit; above it, no verdict)", "distance to the training data",
        [short_label(r["detector"]) for r in gated],
        [BarSeries("domain score", [r["domain_score"] for r in gated], ticks=[r["domain_threshold"] for r in gated])],
        ylim=(0, max(max(r["domain_score"], r["domain_threshold"]) for r in gated) * 1.3))


def samples_chart(results: list[dict]) -> Figure:
    """Histogram of the T sampled P(FAKE) per detector: a wide spread means the detector's samples disagree."""
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    bins = [i / 50 for i in range(51)]
    for i, r in enumerate(results):
        ax.hist(r["sample_p_fake"], bins=bins, alpha=0.55, color=f"C{i}",
                label=f"{short_label(r['detector'])} (T={r['num_samples']})")
        ax.axvline(r["threshold"], color=f"C{i}", linestyle="dashed", linewidth=1)
    # A rug of the individual samples under the bars: narrow spreads would otherwise hide inside one bin.
    top = ax.get_ylim()[1]
    counts = [tick for tick in ax.get_yticks() if 0 <= tick <= top]
    for i, r in enumerate(results):
        ax.plot(r["sample_p_fake"], [-(i + 1) * top * 0.05] * len(r["sample_p_fake"]), "|", color=f"C{i}",
                markersize=7)
    ax.set_ylim(-(len(results) + 0.5) * top * 0.05, top)
    ax.set_yticks(counts)
    ax.set_xlim(0, 1)
    ax.set_xlabel("sampled P(FAKE) (dashed: decision threshold)")
    ax.set_ylabel("samples")
    ax.set_title("Distribution of the T Monte Carlo samples", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def detector_view(image: InputImage, size: tuple[int, int]) -> np.ndarray:
    """What a detector sees of ``image``: its central square (processors center-crop), resized to ``size``. Cropped
    first, so the resize never makes more than ``size`` pixels whatever the image's shape."""
    side = min(image.rgb.size)
    left, top = (image.rgb.width - side) // 2, (image.rgb.height - side) // 2
    square = image.rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize(size, Image.Resampling.BICUBIC))


def explanation_chart(image: InputImage, explanations: list[dict]) -> Figure:
    """Per detector: where in the image P(FAKE) is most sensitive (saliency over the detector's view of the image),
    and the backbone features that move it most (red pushes towards FAKE, blue towards REAL)."""
    fig = Figure(figsize=(9.0, 2.8 * len(explanations)), layout="constrained")
    for row, e in enumerate(explanations):
        saliency = np.asarray(e["saliency"])
        view = detector_view(image, saliency.shape[::-1])
        ax = fig.add_subplot(len(explanations), 2, 2 * row + 1)
        ax.imshow(view)
        ax.imshow(saliency, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(f"{short_label(e['detector'])}: saliency |dP(FAKE)/dpixel|", fontsize=9)
        ax = fig.add_subplot(len(explanations), 2, 2 * row + 2)
        top = e["top_features"][::-1]
        ax.barh([f"#{f['feature']}" for f in top], [f["importance"] for f in top],
                color=["#c0392b" if f["gradient"] > 0 else "#2e86c1" for f in top])
        ax.set_xlabel("|feature x dP(FAKE)/dfeature|", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"Top features (P(FAKE) = {e['p_fake']:.3f}; red: towards FAKE)", fontsize=9)
    return fig


def reconstruction_chart(explanations: list[dict]) -> Figure | None:
    """Per autoencoder detector (an explanation with a ``reconstruction``): the image as it sees it, what it rebuilds
    from its own features, and the per-pixel error between them; None when no selected detector is an autoencoder."""
    rows = [e for e in explanations if e.get("reconstruction")]
    if not rows:
        return None
    fig = Figure(figsize=(9.0, 3.0 * len(rows)), layout="constrained")
    for row, e in enumerate(rows):
        r = e["reconstruction"]
        seen, rebuilt, error = (np.asarray(r[key], dtype=np.float32) for key in ("seen", "rebuilt", "error_map"))
        grey = seen.shape[-1] == 1  # a greyscale detector sees and rebuilds luminance only
        panels = (("What it sees", seen), ("What it rebuilds from its features", rebuilt))
        for col, (title, picture) in enumerate(panels):
            ax = fig.add_subplot(len(rows), 3, 3 * row + col + 1)
            ax.imshow(picture[..., 0] if grey else picture, cmap="gray" if grey else None, vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(f"{short_label(e['detector'])}: {title}" if col == 0 else title, fontsize=9)
        ax = fig.add_subplot(len(rows), 3, 3 * row + 3)
        # one fixed scale for every image, so the same brightness means the same error on any upload
        shown = ax.imshow(error, cmap="magma", vmin=0, vmax=ERROR_MAP_MAX)
        ax.set_axis_off()
        ax.set_title(f"Where they differ (error score {r['reconstruction_error']:.3g})", fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    return fig


def batch_charts(answers: list[dict], names: list[str]) -> tuple[Figure, Figure]:
    """P(FAKE) with error bars and the epistemic uncertainty per image, one series per detector."""
    done = [a for a in answers if "detectors" in a]
    images = [a["image"]["name"] for a in done]

    def per_image(name, pick):
        return None if pick is None else [pick(a["detectors"][name]) for a in done]

    def series(value, error=None, tick=None) -> list[BarSeries]:
        """One series per detector; ``value``, ``error`` and ``tick`` pick a number out of a detector's result."""
        return [BarSeries(short_label(name), per_image(name, value), per_image(name, error), per_image(name, tick))
                for name in names]

    p_fake = p_fake_chart(images, series(lambda r: r["probs"]["FAKE"], lambda r: r["std"]["FAKE"],
                                         lambda r: r["threshold"]))
    epistemic = grouped_bar_chart("Epistemic uncertainty (mutual information): high = unfamiliar to the detector",
                                  "nats", images, series(lambda r: r["mutual_information"]))
    return p_fake, epistemic

