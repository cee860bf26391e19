"""BayesFake Space: is this image AI-generated, and how sure are the detectors?

    python space/app.py [--models ID_OR_PATH,...]     # or BAYESFAKE_MODELS=...; default: the released detectors
                        [--torch-threads N]           # or BAYESFAKE_TORCH_THREADS=N; default 1

Every detector is loaded once at start through ``hub_models.hub.load_detector`` (``AutoModel.from_pretrained`` with
``trust_remote_code=True``); one that fails to load is reported on the page and in ``/models`` while the others work.
The server honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.

API (``gradio_client``; image files go through ``handle_file``):
    /predict        (image, num_samples=30, detectors=None) -> {"image": {...}, "detectors": {name: result}}
    /predict_batch  (images, num_samples=30, detectors=None) -> [one /predict answer, or {"file", "error"}, ...]
    /explain        (image, num_samples=30, detectors=None) -> {"image": {...}, "detectors": {name: saliency map and
                    top features}}
    /models         () -> {"loaded": [{name, config}], "failed": [{name, error}], "torch_threads": N}
Answers are repeatable: every request samples with the same seed.
"""

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SPACE_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPACE_DIR / "examples"
# From a checkout, hub_models sits next to space/; a pushed Space carries its own copy beside app.py.
if importlib.util.find_spec("hub_models") is None:
    sys.path.insert(0, str(SPACE_DIR.parent))

import gradio as gr  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless server; figures are built with the object API (no pyplot state shared by threads)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from hub_models.hub import DEFAULT_REPO_IDS, load_detector  # noqa: E402
from hub_models.image_processing_bayesfake import DEFAULT_MAX_PIXELS, load_image, to_rgb  # noqa: E402

log = logging.getLogger("bayesfake.space")

MODELS_ENV = "BAYESFAKE_MODELS"
# torch's intra-op threads when the Space runs as a program (--torch-threads, else this variable, else 1). One thread
# by default: the detectors are small (one image, 32-128 px), and a team of two or more spin-waits between parallel
# regions, so it stalls as soon as anything else wants the cores: the page's own decoding and charts, or another
# process (benchmarks/results_inference_thread.md measures each choice, idle and busy).
TORCH_THREADS_ENV = "BAYESFAKE_TORCH_THREADS"
DEFAULT_TORCH_THREADS = 1
DEFAULT_NUM_SAMPLES = 30
MAX_NUM_SAMPLES = 200
# One fixed seed for every request: the same image and T always give the same answer.
SEED = 0
# Smaller images carry too little signal to judge; they are refused rather than upscaled into a confident verdict.
MIN_IMAGE_SIDE = 8
MAX_BATCH_IMAGES = 64
TOP_FEATURES = 10  # features listed per detector in an explanation
MAX_FILE_SIZE = "25mb"
BATCH_CSV_DIR = Path(tempfile.gettempdir()) / "bayesfake-batch"
BATCH_CSV_MAX_AGE_S = 3600
# The queue runs this many requests at once (decoding and plotting overlap; model forwards take turns on
# INFERENCE_THREAD) and holds up to QUEUE_MAX_SIZE more before refusing new ones.
QUEUE_CONCURRENCY = 4
QUEUE_MAX_SIZE = 256
# Out-of-domain rules: the shorter side more than this factor away from the training size, or a crop that drops more
# than a third of the image.
SCALE_TOLERANCE = 2.0
ASPECT_TOLERANCE = 1.5
# Every torch call (loading, preprocessing, forwards) runs on this one thread, for two reasons:
# - a forward seeds torch's global RNG (fork_rng), which is process-wide: two concurrent forwards would mix their draws
#   and lose repeatability, so forwards take turns;
# - speed: each OS thread that enters torch gets its own OpenMP team of torch's thread count. Run from gradio's pool of
#   request threads, the teams outnumber the cores and every parallel region waits on sleeping threads
#   (benchmarks/results_inference_thread.md).
INFERENCE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bayesfake-inference")


def on_inference_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the inference thread; its result, or its exception."""
    return INFERENCE_THREAD.submit(fn, *args, **kwargs).result()

MODE_NAMES = {  # PIL mode -> plain words, for the "not 8-bit RGB" warning
    "1": "1-bit black and white",
    "L": "8-bit grayscale",
    "LA": "grayscale with transparency, composited over white",
    "P": "palette colours",
    "PA": "palette colours with transparency, composited over white",
    "RGBA": "RGB with transparency, composited over white",
    "CMYK": "print colours",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I": "16/32-bit integer grayscale",
    "F": "floating-point grayscale",
    "YCbCr": "luma and chroma",
    "LAB": "CIELAB colours",
    "HSV": "hue, saturation, value",
}
# Batch table and CSV; entropies in nats. Long text (error, warnings) last so the numbers stay in view.
TABLE_COLUMNS = ["file", "detector", "verdict", "P(FAKE)", "std", "epistemic", "aleatoric", "total", "T", "error",
                 "warnings"]
TABLE_WIDTHS = ["12%", "14%", "11%", "6%", "6%", "7%", "7%", "6%", "4%", "13%", "14%"]


# ----------------------------------------------------------------------------------------------------------------------
# Input images


@dataclass
class InputImage:
    """An uploaded image decoded to 8-bit RGB, with what the file was (for the out-of-domain warnings)."""

    name: str
    rgb: Image.Image
    mode: str
    format: str | None
    frames: int

    @property
    def width(self) -> int:
        return self.rgb.width

    @property
    def height(self) -> int:
        return self.rgb.height

    def describe(self) -> dict:
        return dict(name=self.name, width=self.width, height=self.height, mode=self.mode, format=self.format,
                    frames=self.frames)


def uploaded_path(upload) -> str:
    """The server-side path of an uploaded file (a gradio FileData dict); plain strings are refused, because they would
    name a file on the server rather than one the client sent."""
    if isinstance(upload, FileData):
        upload = upload.model_dump()
    if isinstance(upload, dict) and isinstance(upload.get("path"), str):
        return upload["path"]
    raise ValueError("send the image as an uploaded file (gradio_client.handle_file(path)), not as a plain string")


def read_image(path: str, name: str | None = None) -> InputImage:
    """Decode an uploaded file with the detectors' own loader; raise ``ValueError`` with a plain reason if unusable."""
    name = name or Path(path).name
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name}: the file is empty (0 bytes)")
    # load_image decodes every pixel: read the header first so a huge image is refused before it is allocated.
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Exception:  # not an image, or PIL's own decompression-bomb refusal: load_image below says why
        width = height = 0
    if width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"{name}: image too large ({width}x{height} pixels; the limit is {DEFAULT_MAX_PIXELS:,})")
    try:
        image = load_image(path)
        mode, file_format, frames = image.mode, image.format, getattr(image, "n_frames", 1)
        rgb = to_rgb(image)
    except Exception as err:  # ValueError with a reason, or PIL failing to convert (e.g. a malformed EXIF block)
        reason = str(err) if isinstance(err, ValueError) else f"cannot convert it ({type(err).__name__}: {err})"
        # PIL's messages name the server-side temp path: show the uploaded name instead
        raise ValueError(f"{name}: {reason.replace(path, name)}") from err
    if min(rgb.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name}: image is only {rgb.width}x{rgb.height} pixels, too small to judge "
                         f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed)")
    return InputImage(name=name, rgb=rgb, mode=mode, format=file_format, frames=frames)


def domain_warnings(image: InputImage, config) -> list[str]:
    """Plain-words reasons why ``image`` is far from the detector's training data (empty when it looks in-domain)."""
    size = config.training_image_size
    warnings = []
    short_side = min(image.width, image.height)
    scale = short_side / size
    if not 1 / SCALE_TOLERANCE <= scale <= SCALE_TOLERANCE:
        how = f"{scale:.0f}x larger" if scale > 1 else f"{1 / scale:.0f}x smaller"
        warnings.append(f"the image is {image.width}x{image.height} px but this detector was trained on {size}x{size} "
                        f"images ({how}): far from the training data")
    aspect = max(image.width, image.height) / short_side
    if aspect > ASPECT_TOLERANCE:
        warnings.append(f"only the central square ({100 / aspect:.0f}% of the image) was analysed")
    if image.mode != "RGB":
        warnings.append(f"the file is {image.mode} ({MODE_NAMES.get(image.mode, 'unusual mode')}), not 8-bit RGB "
                        f"like the training images; it was converted")
    if image.frames > 1:
        warnings.append(f"animated image ({image.frames} frames): only the first frame was analysed")
    return warnings


# ----------------------------------------------------------------------------------------------------------------------
# Detectors


@dataclass
class Detector:
    name: str
    model: torch.nn.Module
    processor: object

    @property
    def config(self):
        return self.model.config

    def predict(self, image: InputImage, num_samples: int) -> dict:
        """Monte Carlo predictive for one image, as plain JSON numbers."""
        return self.answer(image, on_inference_thread(self._forward, image, num_samples), num_samples)

    def _forward(self, image: InputImage, num_samples: int):
        pixel_values = self.processor(image.rgb, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return self.model(pixel_values, num_samples=num_samples, seed=SEED)

    def _explain(self, image: InputImage, num_samples: int) -> tuple:
        pixel_values = self.processor(image.rgb, return_tensors="pt")["pixel_values"]
        out = self.model.explain(pixel_values, num_samples=num_samples, seed=SEED)
        return out["output"], self.explanation(out, num_samples)

    def answer(self, image: InputImage, out, num_samples: int) -> dict:
        """The ``/predict`` answer for one image from the detector's ``BayesFakeOutput``."""
        return {
            "detector": self.name,
            "verdict": self.model.verdicts(out)[0],
            "probs": dict(zip(("REAL", "FAKE"), out.probs[0].tolist())),
            "std": dict(zip(("REAL", "FAKE"), out.std[0].tolist())),
            "predictive_entropy": out.predictive_entropy[0].item(),
            "mutual_information": out.mutual_information[0].item(),
            "expected_entropy": out.expected_entropy[0].item(),
            "sample_p_fake": out.sample_probs[:, 0, 1].tolist(),
            "threshold": self.config.threshold,
            "reject_entropy": self.config.reject_entropy,
            "num_samples": num_samples,
            "seed": SEED,
            "training_domain": self.config.training_domain,
            "image_size": self.config.image_size,
            "training_image_size": self.config.training_image_size,  # what the size warning compares with
            "warnings": domain_warnings(image, self.config),
        }

    def predict_and_explain(self, image: InputImage, num_samples: int) -> tuple[dict, dict]:
        """The ``/predict`` and ``/explain`` answers from one run of the detector (``model.explain`` returns the
        predictive it differentiated, the same as ``model(...)`` with the same seed)."""
        out, explained = on_inference_thread(self._explain, image, num_samples)
        return self.answer(image, out, num_samples), explained

    def explanation(self, out: dict, num_samples: int) -> dict:
        """Why, from ``model.explain``: the input-gradient saliency map (normalised to [0, 1], at the detector's input
        size) and the backbone features that move P(FAKE) most (gradient x feature)."""
        saliency = out["saliency"][0]
        saliency = saliency / saliency.max().clamp_min(1e-12)
        importance, gradient = out["feature_importance"][0], out["feature_gradient"][0]
        top = importance.topk(min(TOP_FEATURES, importance.numel())).indices.tolist()
        return {
            "detector": self.name,
            "p_fake": out["p_fake"][0].item(),
            "num_samples": num_samples,
            "saliency": [[round(v, 4) for v in row] for row in saliency.tolist()],
            "top_features": [{"feature": i, "importance": importance[i].item(), "gradient": gradient[i].item()}
                             for i in top],
        }

    def describe(self) -> dict:
        # Through JSON: the config's id2label has int keys, which the server's JSON encoder refuses.
        return {"name": self.name, "config": json.loads(self.config.to_json_string())}


@dataclass
class DetectorPool:
    """The detectors loaded at start, and the ones that failed (name -> reason)."""

    detectors: dict[str, Detector] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, model_ids: list[str]) -> "DetectorPool":
        pool = cls()
        for model_id in dict.fromkeys(model_ids):  # drop repeats, keep the order
            try:
                model, processor = on_inference_thread(load_detector, model_id)
            except Exception as err:  # any failure is reported on the page; the other detectors still serve
                log.warning("detector %s failed to load: %s", model_id, err)
                pool.failed[model_id] = f"{type(err).__name__}: {err}"
            else:
                pool.detectors[model_id] = Detector(model_id, model, processor)
        return pool

    @property
    def names(self) -> list[str]:
        return list(self.detectors)

    def select(self, names: list[str] | None) -> list[Detector]:
        """The detectors named (all loaded ones for None); ``ValueError`` for an empty choice or an unknown name."""
        if not self.detectors:
            raise ValueError("no detector is loaded: " + "; ".join(f"{k} ({v})" for k, v in self.failed.items()))
        if names is None:
            return list(self.detectors.values())
        unknown = [name for name in names if name not in self.detectors]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; loaded: {self.names}")
        if not names:
            raise ValueError("choose at least one detector")
        return [self.detectors[name] for name in names]

    def analyse(self, image: InputImage, num_samples, names: list[str] | None = None) -> dict:
        """What ``/predict`` answers for one decoded image."""
        detectors = self.select(names)
        num_samples = checked_num_samples(num_samples)
        return {"image": image.describe(),
                "detectors": {d.name: d.predict(image, num_samples) for d in detectors}}

    def explain(self, image: InputImage, num_samples, names: list[str] | None = None) -> dict:
        """What ``/explain`` answers for one decoded image."""
        return self.analyse_and_explain(image, num_samples, names)[1]

    def analyse_and_explain(self, image: InputImage, num_samples, names: list[str] | None = None) -> tuple[dict, dict]:
        """What ``/predict`` and ``/explain`` answer for one decoded image, running each detector once (the page)."""
        detectors = self.select(names)
        num_samples = checked_num_samples(num_samples)
        answers, explanations = {}, {}
        for d in detectors:
            answers[d.name], explanations[d.name] = d.predict_and_explain(image, num_samples)
        described = image.describe()
        return {"image": described, "detectors": answers}, {"image": described, "detectors": explanations}

    def analyse_files(self, paths: list[str], num_samples, names: list[str] | None = None) -> list[dict]:
        """One answer per file; a file that cannot be read gives ``{"file", "error"}`` and the others still run."""
        if not paths:
            raise ValueError("no images given")
        if len(paths) > MAX_BATCH_IMAGES:
            raise ValueError(f"{len(paths)} images given; at most {MAX_BATCH_IMAGES} per batch")
        self.select(names)  # refuse a bad detector choice once, not once per file
        checked_num_samples(num_samples)
        answers = []
        for path in paths:
            try:
                answers.append(self.analyse(read_image(path), num_samples, names))
            except ValueError as err:
                answers.append({"file": Path(path).name, "error": str(err)})
        return answers

    def describe(self) -> dict:
        return {"loaded": [d.describe() for d in self.detectors.values()],
                "failed": [{"name": name, "error": error} for name, error in self.failed.items()],
                "torch_threads": torch.get_num_threads()}


def checked_num_samples(num_samples) -> int:
    """T as an int in [1, MAX_NUM_SAMPLES] (sliders send floats), or ``ValueError``."""
    if (isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)) or not math.isfinite(num_samples)
            or num_samples != int(num_samples)):
        raise ValueError(f"num_samples must be a whole number; got {num_samples!r}")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise ValueError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}; got {num_samples}")
    return int(num_samples)


def model_ids_from(arg: str | None) -> list[str]:
    """Comma-separated ids/paths (the --models flag, else BAYESFAKE_MODELS), else the released detectors."""
    text = arg if arg is not None else os.environ.get(MODELS_ENV, "")
    ids = [part.strip() for part in text.split(",") if part.strip()]
    return ids or list(DEFAULT_REPO_IDS)


# ----------------------------------------------------------------------------------------------------------------------
# Charts (shared by the one-image and the batch tab)


@dataclass
class BarSeries:
    """One coloured series of a grouped bar chart: a value per category, optional error bars and tick marks."""

    label: str
    values: list[float]
    errors: list[float] | None = None
    ticks: list[float] | None = None  # e.g. each detector's decision threshold, drawn across its bar


def short_label(name: str) -> str:
    """Chart label for a detector: the last part of its repo id or folder path."""
    return Path(name.rstrip("/")).name or name


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


def explanation_chart(image: InputImage, explanations: list[dict]) -> Figure:
    """Per detector: where in the image P(FAKE) is most sensitive (saliency over the detector's view of the image),
    and the backbone features that move it most (red pushes towards FAKE, blue towards REAL)."""
    fig = Figure(figsize=(9.0, 2.8 * len(explanations)), layout="constrained")
    for row, e in enumerate(explanations):
        saliency = np.asarray(e["saliency"])
        view = np.asarray(image.rgb.convert("RGB").resize(saliency.shape[::-1], Image.Resampling.BICUBIC))
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


# ----------------------------------------------------------------------------------------------------------------------
# Page text and tables


def verdict_markdown(answer: dict) -> str:
    image = answer["image"]
    parts = [f"**{image['name']}**: {image['width']}x{image['height']} px, {image['mode']}"
             f"{', ' + image['format'] if image['format'] else ''}"]
    for r in answer["detectors"].values():
        reject = (f"; uncertain when total > {r['reject_entropy']:.2f} nats" if r["reject_entropy"] is not None
                  else "")
        text = (f"### {short_label(r['detector'])}: {r['verdict']}\n"
                f"P(FAKE) = **{r['probs']['FAKE']:.3f} ± {r['std']['FAKE']:.3f}** over T = {r['num_samples']} "
                f"samples (threshold {r['threshold']:.2f}{reject}). Uncertainty: total {r['predictive_entropy']:.3f} "
                f"nats = epistemic {r['mutual_information']:.3f} + aleatoric {r['expected_entropy']:.3f}.  \n"
                f"*Trained on:* {r['training_domain'] or 'not stated'} ({r['image_size']}x{r['image_size']} RGB).")
        if r["warnings"]:
            text += "\n\n> ⚠️ **Far from this detector's training data** (trust the verdict less): " + "; ".join(
                r["warnings"]) + "."
        parts.append(text)
    return "\n\n".join(parts)


def load_failures_markdown(failed: dict[str, str]) -> str:
    if not failed:
        return ""
    lines = [f"- `{name}`: {error}" for name, error in failed.items()]
    return f"**⚠️ {len(failed)} detector(s) failed to load and are not available:**\n" + "\n".join(lines)


def detectors_markdown(pool: DetectorPool) -> str:
    rows = ["| detector | head | backbone | training domain | input | default T | threshold | reject above | metrics |",
            "|---|---|---|---|---|---|---|---|---|"]
    for d in pool.detectors.values():
        c = d.config
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in c.metrics.items() if isinstance(v, (int, float))) or "-"
        reject = "-" if c.reject_entropy is None else f"{c.reject_entropy:.2f} nats"
        rows.append(f"| `{d.name}` | {c.head} | {c.backbone} | {c.training_domain or '-'} | {c.image_size}x"
                    f"{c.image_size} RGB | {c.num_samples} | {c.threshold:.3f} | {reject} | {metrics} |")
    text = "\n".join(rows) if pool.detectors else "No detector is loaded."
    return text + ("\n\n" + load_failures_markdown(pool.failed) if pool.failed else "")


def batch_table(answers: list[dict]) -> pd.DataFrame:
    rows = []
    for a in answers:
        if "error" in a:
            rows.append({"file": a["file"], "error": a["error"]})
            continue
        for r in a["detectors"].values():
            rows.append({"file": a["image"]["name"], "detector": r["detector"], "verdict": r["verdict"],
                         "P(FAKE)": round(r["probs"]["FAKE"], 4), "std": round(r["std"]["FAKE"], 4),
                         "epistemic": round(r["mutual_information"], 4), "aleatoric": round(r["expected_entropy"], 4),
                         "total": round(r["predictive_entropy"], 4), "T": r["num_samples"],
                         "warnings": "; ".join(r["warnings"]), "error": ""})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).fillna("")


def write_batch_csv(table: pd.DataFrame) -> str:
    """The batch table as a CSV file to download. Gradio serves its own copy, so ours only has to outlive the response:
    files of earlier batches older than BATCH_CSV_MAX_AGE_S are removed here rather than piling up."""
    BATCH_CSV_DIR.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - BATCH_CSV_MAX_AGE_S
    for old in BATCH_CSV_DIR.glob("*.csv"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except FileNotFoundError:  # another request removed it first
            pass
    with tempfile.NamedTemporaryFile("w", suffix=".csv", prefix="bayesfake_batch_", dir=BATCH_CSV_DIR,
                                     delete=False) as csv_file:
        table.to_csv(csv_file, index=False)
    return csv_file.name


# ----------------------------------------------------------------------------------------------------------------------
# The app

INTRO = """# BayesFake: is this image AI-generated, and how sure is the detector?
Each detector is sampled **T** times (Monte Carlo dropout or variational weights). The spread of the samples is the
error bar; the predictive entropy (**total** uncertainty) splits into **epistemic** (the detector's own doubt, high on
unfamiliar images) and **aleatoric** (ambiguity in the image itself). A verdict of *uncertain* means: ask a human.
The detectors only know their training domain (below each verdict); treat every verdict as a screening aid, never as
proof."""


API_HELP = """Call the Space from Python with `gradio_client` (`pip install gradio_client`):

```python
import httpx
from gradio_client import Client, handle_file

# ssl_verify: one verifying TLS context for all of the client's requests (about 40 ms less per call than the default)
client = Client("http://127.0.0.1:7860", ssl_verify=httpx.create_ssl_context())   # or the Space id
answer = client.predict(handle_file("photo.jpg"), 30, api_name="/predict")
for name, r in answer["detectors"].items():
    print(name, r["verdict"], r["probs"]["FAKE"], r["std"]["FAKE"], r["mutual_information"], r["warnings"])
rows = client.predict([handle_file("a.png"), handle_file("b.jpg")], 30, api_name="/predict_batch")
why = client.predict(handle_file("photo.jpg"), 30, api_name="/explain")  # saliency map + top features per detector
print(client.predict(api_name="/models"))
```
Each answer is repeatable (fixed seed per request). An unreadable image raises an error that says why.
`detectors=[...]` (third argument) restricts the run to some of the loaded detectors."""


def build_demo(model_ids: list[str]) -> gr.Blocks:
    """Load the detectors once and build the page and the API on them (the queue is configured too)."""
    pool = DetectorPool.load(model_ids)
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def predict(image: FileData, num_samples: int = DEFAULT_NUM_SAMPLES, detectors: list[str] | None = None) -> dict:
        """One image -> per detector: probs, std, predictive_entropy, mutual_information (epistemic),
        expected_entropy (aleatoric), verdict, threshold, num_samples, sample_p_fake, warnings."""
        try:
            return pool.analyse(read_image(uploaded_path(image)), num_samples, detectors)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def predict_batch(images: list[FileData], num_samples: int = DEFAULT_NUM_SAMPLES,
                      detectors: list[str] | None = None) -> list[dict]:
        """Several images -> one /predict answer per image, or {"file", "error"} for an image that cannot be read."""
        try:
            return pool.analyse_files([uploaded_path(image) for image in images or []], num_samples, detectors)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def explain(image: FileData, num_samples: int = DEFAULT_NUM_SAMPLES, detectors: list[str] | None = None) -> dict:
        """One image -> per detector: the saliency map (input gradients of P(FAKE), [0, 1], at the detector's input
        size) and the top features by |feature x gradient| with the gradient's sign (> 0 pushes towards FAKE)."""
        try:
            return pool.explain(read_image(uploaded_path(image)), num_samples, detectors)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def models() -> dict:
        """The loaded detectors with their configs, and the ones that failed to load (with the reason)."""
        return pool.describe()

    def analyse_page(upload, names, num_samples):
        # Runs with preprocess=False so the raw upload reaches read_image: the Image component's own preprocessing
        # would decode the file with PIL first and hide the reason a bad file is refused behind a generic error.
        if upload is None:
            return "Upload an image or pick an example.", None, None, None, None, None
        try:
            image = read_image(uploaded_path(upload))
            answer, explained = pool.analyse_and_explain(image, num_samples, names)
            why = explanation_chart(image, list(explained["detectors"].values()))
        except ValueError as err:
            gr.Warning(str(err))
            return f"**Could not analyse this image:** {err}", None, None, None, None, None
        return (verdict_markdown(answer), *single_image_charts(list(answer["detectors"].values())), why, answer)

    def analyse_batch_page(paths, names, num_samples):
        try:
            answers = pool.analyse_files(paths or [], num_samples, names)
        except ValueError as err:
            gr.Warning(str(err))
            return f"**Could not run the batch:** {err}", None, None, None, None
        table = batch_table(answers)
        failed = sum("error" in a for a in answers)
        status = f"{len(answers) - failed} of {len(answers)} images analysed" + (
            f"; {failed} could not be read (see the error column)" if failed else "")
        charts = batch_charts(answers, names) if failed < len(answers) else (None, None)
        return status, table, write_batch_csv(table), *charts

    # delete_cache: every hour, drop uploads and result files older than a day (a Space runs for weeks).
    with gr.Blocks(title="BayesFake: AI-generated image detection with uncertainty",
                   delete_cache=(3600, 86400)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(load_failures_markdown(pool.failed), elem_id="load-errors", visible=bool(pool.failed))
        with gr.Row():
            chosen = gr.CheckboxGroup(pool.names, value=pool.names, label="Detectors to run", elem_id="detectors")
            num_samples = gr.Slider(1, MAX_NUM_SAMPLES, value=DEFAULT_NUM_SAMPLES, step=1,
                                    label="T: Monte Carlo samples per detector", elem_id="num-samples")
        with gr.Tab("One image"):
            with gr.Row():
                with gr.Column(scale=2):
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     label="Image", height=320, elem_id="image-input")
                    run = gr.Button("Analyse", variant="primary", elem_id="run")
                    gr.Examples(examples, inputs=image, label="Examples: CIFAKE test images (in domain) and "
                                "larger synthetic pictures (out of domain)", examples_per_page=8)
                with gr.Column(scale=3):
                    verdict = gr.Markdown("Upload an image or pick an example.", elem_id="verdict")
                    p_fake_plot = gr.Plot(label="P(FAKE) per detector", elem_id="p-fake-plot")
                    uncertainty_plot = gr.Plot(label="Uncertainty per detector", elem_id="uncertainty-plot")
                    samples_plot = gr.Plot(label="Sampled P(FAKE)", elem_id="samples-plot")
                    explanation_plot = gr.Plot(label="Why: saliency map and the features that weigh most",
                                               elem_id="explanation-plot")
                    with gr.Accordion("Raw answer (what /predict returns)", open=False):
                        raw = gr.JSON(elem_id="raw-answer")
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", file_types=["image"], label="Images", elem_id="batch-input")
            run_batch = gr.Button("Analyse all", variant="primary", elem_id="run-batch")
            batch_status = gr.Markdown(elem_id="batch-status")
            table = gr.Dataframe(headers=TABLE_COLUMNS, column_widths=TABLE_WIDTHS, interactive=False, wrap=True,
                                 label="Results (entropies in nats)", elem_id="batch-table")
            csv = gr.File(label="Download the table (CSV)", elem_id="batch-csv")
            batch_p_fake_plot = gr.Plot(label="P(FAKE) per image", elem_id="batch-p-fake-plot")
            batch_epistemic_plot = gr.Plot(label="Epistemic uncertainty per image", elem_id="batch-epistemic-plot")
        with gr.Tab("Detectors"):
            gr.Markdown(detectors_markdown(pool), elem_id="detector-table")
        with gr.Tab("API"):
            gr.Markdown(API_HELP)

        gr.on([image.change, run.click], analyse_page, [image, chosen, num_samples],
              [verdict, p_fake_plot, uncertainty_plot, samples_plot, explanation_plot, raw], preprocess=False,
              api_visibility="private", trigger_mode="always_last")
        run_batch.click(analyse_batch_page, [files, chosen, num_samples],
                        [batch_status, table, csv, batch_p_fake_plot, batch_epistemic_plot], api_visibility="private")
        gr.api(predict, api_name="predict")
        gr.api(predict_batch, api_name="predict_batch")
        gr.api(explain, api_name="explain")
        gr.api(models, api_name="models")
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


@cache
def default_demo() -> gr.Blocks:
    return build_demo(model_ids_from(None))


def __getattr__(name: str):
    # `demo` is built on first access (PEP 562), so importing this module for build_demo does not load the default
    # detectors, and `python app.py --models ...` loads only the ones asked for.
    if name == "demo":
        return default_demo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated repo ids or folders (default: ${MODELS_ENV}, else "
                                         f"{','.join(DEFAULT_REPO_IDS)})")
    parser.add_argument("--torch-threads", type=positive_int,
                        default=os.environ.get(TORCH_THREADS_ENV, str(DEFAULT_TORCH_THREADS)),  # argparse types it
                        help=f"torch's intra-op threads (default: ${TORCH_THREADS_ENV}, else {DEFAULT_TORCH_THREADS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.torch_threads)  # process-wide; before any model is loaded
    demo = build_demo(model_ids_from(args.models))
    # Server name and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (gradio reads them itself).
    demo.launch(max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES_DIR)])


if __name__ == "__main__":
    main()
