"""What the Space computes: uploaded images decoded and judged in or out of domain, the detectors, and the pool that
runs them on one inference thread. No gradio here: the page and the API (app.py) call into it."""

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from hub_models.headline import headline
from hub_models.hub import load_detector
from hub_models.image_processing_bayesfake import DEFAULT_MAX_PIXELS, load_image, to_rgb

log = logging.getLogger("bayesfake.space")

DEFAULT_NUM_SAMPLES = 30
MAX_NUM_SAMPLES = 200
# One fixed seed for every request: the same image and T always give the same answer.
SEED = 0
# Smaller images carry too little signal to judge; they are refused rather than upscaled into a confident verdict.
MIN_IMAGE_SIDE = 8
MAX_BATCH_IMAGES = 64
TOP_FEATURES = 10  # features listed per detector in an explanation
# Out-of-domain rules: the shorter side more than this factor away from the training size, or a crop that drops more
# than a third of the image.
SCALE_TOLERANCE = 2.0
ASPECT_TOLERANCE = 1.5
# Every detector looks at the central square only. Past this ratio of long to short side, the decoded image is cropped
# around its centre before the Space does anything else with it: scaling the short side of an 8x100,000 PNG (a few
# hundred bytes) up to a 128 px input would make 128x1,600,000 pixels (600 MB) on the inference thread, which every
# other request waits for. The processors crop the same way (image_processing_bayesfake.MAX_ASPECT), so the answers do
# not change; the Space does it itself for what it draws and for any processor that does not.
MAX_ASPECT_RATIO = 4
# The upload's preview: files a browser shows as they are; anything else is downscaled to this side for the page.
BROWSER_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP"}
BROWSER_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
PREVIEW_MAX_SIDE = 1024
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


# Which detectors to run: None (all loaded ones), one name, comma-separated names, or a list of names.
Names = str | list[str] | None

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

# ----------------------------------------------------------------------------------------------------------------------
# Input images


@dataclass
class InputImage:
    """An uploaded image decoded to 8-bit RGB, with what the file was (for the out-of-domain warnings). ``rgb`` is at
    most MAX_ASPECT_RATIO times as long as it is wide (the central part of the image); ``size`` is the whole image's."""

    name: str
    rgb: Image.Image
    mode: str
    format: str | None
    frames: int
    size: tuple[int, int] | None = None  # (width, height) of the decoded image; None: rgb's

    def __post_init__(self):
        if self.size is None:
            self.size = self.rgb.size

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def describe(self) -> dict:
        return dict(name=self.name, width=self.width, height=self.height, mode=self.mode, format=self.format,
                    frames=self.frames)


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
    return InputImage(name=name, rgb=central_part(rgb), mode=mode, format=file_format, frames=frames, size=rgb.size)


def preview_source(path: str, max_side: int = PREVIEW_MAX_SIDE) -> str | Image.Image | None:
    """What the page shows as the upload's preview: the file itself when a browser can show it (``path``), a
    downscaled copy of any other readable image (TIFF, CMYK or 16-bit pixels...), or None for a file that is not an
    image, or too large to decode. Only the header is read for the first case."""
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > DEFAULT_MAX_PIXELS:
                return None
            if probe.format in BROWSER_FORMATS and probe.mode in BROWSER_MODES:
                return path
            probe.draft("RGB", (max_side, max_side))  # JPEG: decode at a fraction of the size
            image = to_rgb(probe)
    except Exception:  # not an image, truncated, or PIL refusing it: the analysis says why
        return None
    image.thumbnail((max_side, max_side))
    return image


def central_part(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """``image`` itself, or its centre cropped to ``max_ratio`` times as long as wide when it is longer than that."""
    width, height = image.size
    keep = int(min(width, height) * max_ratio)
    if max(width, height) <= keep:
        return image
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def domain_warnings(image: InputImage, config) -> list[str]:
    """Plain-words reasons why ``image`` is far from the detector's training data (empty when it looks in-domain)."""
    size = config.training_image_size
    warnings = []
    short_side = min(image.width, image.height)
    scale = short_side / size
    # A multi-view detector brings any image to its training scale itself (views of a copy <= view_max_side px).
    if getattr(config, "num_views", 1) == 1 and not 1 / SCALE_TOLERANCE <= scale <= SCALE_TOLERANCE:
        how = f"{scale:.0f}x larger" if scale > 1 else f"{1 / scale:.0f}x smaller"
        warnings.append(f"the image is {image.width}x{image.height} px but this detector was trained on {size}x{size} "
                        f"images ({how}): far from the training data")
    aspect = max(image.width, image.height) / short_side
    if aspect > ASPECT_TOLERANCE:
        # two significant digits: 75%, 33%, and 0.008% for an 8x100,000 strip (not "0%")
        warnings.append(f"only the central square ({100 / aspect:.2g}% of the image) was analysed")
    if image.mode != "RGB":
        warnings.append(f"the file is {image.mode} ({MODE_NAMES.get(image.mode, 'unusual mode')}), not 8-bit RGB "
                        f"like the training images; it was converted")
    if image.frames > 1:
        warnings.append(f"animated image ({image.frames} frames): only the first frame was analysed")
    return warnings


# ----------------------------------------------------------------------------------------------------------------------
# Detectors


def short_label(name: str) -> str:
    """A detector's name in sentences and charts: the last part of its repo id or folder path."""
    return Path(name.rstrip("/")).name or name


def combined_headline(results: dict[str, dict]) -> dict:
    """The one answer over the detectors that ran (``hub_models.headline``): verdict, answered, abstained, outside
    (full names, as the answer's keys) and a one-sentence explanation (short names)."""
    return headline({name: r["verdict"] for name, r in results.items()}, label=short_label).to_dict()


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

    def inputs(self, image: InputImage) -> dict:
        """What the processor makes of the image: ``pixel_values``, and ``domain_pixel_values`` for a detector whose
        domain gate has its own extractor (without them the gate judges the small thumbnail, and is much weaker)."""
        return dict(self.processor(image.rgb, return_tensors="pt"))

    def _forward(self, image: InputImage, num_samples: int):
        with torch.inference_mode():
            return self.model(**self.inputs(image), num_samples=num_samples, seed=SEED)

    def _explain(self, image: InputImage, num_samples: int) -> tuple:
        # explain's output is the predictive it differentiated, with the domain gate's judgement (fed the same
        # domain_pixel_values as forward, so the page and /predict agree); only a gated detector's processor makes them
        inputs = self.inputs(image)
        out = self.model.explain(**inputs, num_samples=num_samples, seed=SEED)
        explained = self.explanation(out, num_samples)
        if getattr(self.model, "decoder", None) is not None:  # an autoencoder detector also shows what it rebuilds
            explained["reconstruction"] = self.reconstruction(inputs["pixel_values"])
        return out["output"], explained

    def reconstruction(self, pixel_values: torch.Tensor) -> dict:
        """An autoencoder detector's ``model.reconstruct`` of the image, as plain JSON numbers in [0, 1]: ``seen`` (the
        image as the detector sees it, [S, S, C]; C = 1 for a greyscale detector), ``rebuilt`` (what its decoder makes
        of its features, same shape), ``error_map`` ([S, S], |seen - rebuilt| averaged over the channels) and
        ``reconstruction_error`` (the number ``forward`` reports)."""
        rebuilt = self.model.reconstruct(pixel_values)

        def pixels(tensor):
            return [[[round(v, 4) for v in px] for px in row] for row in tensor[0].permute(1, 2, 0).tolist()]

        return {"seen": pixels(rebuilt["target"]), "rebuilt": pixels(rebuilt["reconstruction"]),
                "error_map": [[round(v, 4) for v in row] for row in rebuilt["error_map"][0].tolist()],
                "reconstruction_error": rebuilt["reconstruction_error"][0].item()}

    def answer(self, image: InputImage, out, num_samples: int) -> dict:
        """The ``/predict`` answer for one image from the detector's ``BayesFakeOutput``. ``in_domain`` and
        ``domain_score`` come from its domain gate (None for a detector without one: it judges every image)."""
        in_domain, score = out.get("in_domain"), out.get("domain_score")
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
            "reject_score": self.config.reject_score,  # what reject_entropy is compared with
            "verdict_entropy": out.verdict_entropy[0].item() if self.config.reject_score == "verdict_entropy" else None,
            "num_samples": num_samples,
            "seed": SEED,
            "training_domain": self.config.training_domain,
            "image_size": self.config.image_size,
            "training_image_size": self.config.training_image_size,  # what the size warning compares with
            "warnings": domain_warnings(image, self.config),
            "in_domain": None if in_domain is None else bool(in_domain[0]),
            "domain_score": None if score is None else score[0].item(),
            "domain_threshold": self.config.domain_threshold if self.model.domain_gate is not None else None,
            "stochastic": bool(self.config.stochastic),  # False: one deterministic pass, no sampling spread
            "training_data": list(self.config.training_data),
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

    def select(self, names: Names) -> list[Detector]:
        """The detectors named: None for all loaded ones, one name, comma-separated names, or a list of names;
        ``ValueError`` for an empty choice or an unknown name."""
        if not self.detectors:
            raise ValueError("no detector is loaded: " + "; ".join(f"{k} ({v})" for k, v in self.failed.items()))
        if names is None:
            return list(self.detectors.values())
        if isinstance(names, str):  # one name (a loaded name may itself hold a comma), else "a,b"
            names = [names] if names in self.detectors else [part.strip() for part in names.split(",")
                                                              if part.strip()]
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"detectors must be a detector name or a list of names; got {names!r}")
        unknown = [name for name in names if name not in self.detectors]
        if unknown:
            raise ValueError(f"unknown detector(s): {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, self.names))}")
        if not names:
            raise ValueError("choose at least one detector")
        return [self.detectors[name] for name in names]

    def analyse(self, image: InputImage, num_samples, names: Names = None) -> dict:
        """What ``/predict`` answers for one decoded image."""
        detectors = self.select(names)
        num_samples = checked_num_samples(num_samples)
        results = {d.name: d.predict(image, num_samples) for d in detectors}
        return {"image": image.describe(), "headline": combined_headline(results), "detectors": results}

    def explain(self, image: InputImage, num_samples, names: Names = None) -> dict:
        """What ``/explain`` answers for one decoded image."""
        return self.analyse_and_explain(image, num_samples, names)[1]

    def analyse_and_explain(self, image: InputImage, num_samples, names: Names = None) -> tuple[dict, dict]:
        """What ``/predict`` and ``/explain`` answer for one decoded image, running each detector once (the page)."""
        detectors = self.select(names)
        num_samples = checked_num_samples(num_samples)
        answers, explanations = {}, {}
        for d in detectors:
            answers[d.name], explanations[d.name] = d.predict_and_explain(image, num_samples)
        described = image.describe()
        return ({"image": described, "headline": combined_headline(answers), "detectors": answers},
                {"image": described, "detectors": explanations})

    def analyse_files(self, paths: list[str], num_samples, names: Names = None) -> list[dict]:
        """One answer per file; a file that cannot be read gives ``{"file", "error"}`` and the others still run."""
        self.check_batch(paths, num_samples, names)
        answers = []
        for path in paths:
            try:
                answers.append(self.analyse(read_image(path), num_samples, names))
            except ValueError as err:
                answers.append({"file": Path(path).name, "error": str(err)})
        return answers

    def check_batch(self, paths: list[str], num_samples, names: Names = None) -> None:
        """``ValueError`` for a batch refused as a whole: no files, too many, a bad detector choice or T (checked once,
        not once per file)."""
        if not paths:
            raise ValueError("no images given")
        if len(paths) > MAX_BATCH_IMAGES:
            raise ValueError(f"{len(paths)} images given; at most {MAX_BATCH_IMAGES} per batch")
        self.select(names)
        checked_num_samples(num_samples)

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

