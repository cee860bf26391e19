"""Configuration of a BayesFake detector: the single source of truth for a released model.

This file ships inside every Hub repo (it is what ``trust_remote_code=True`` downloads), so it depends on nothing but
``transformers``. Everything needed to rebuild the network, sample it and preprocess its input lives here.
"""

from __future__ import annotations

import math
import re

from transformers import PretrainedConfig

# Registry of the heads. "deterministic" is the plain baseline (num_samples=1 is exact); "gaussian_nb" is the
# generative baseline (class-conditional diagonal Gaussians on the features, fitted in closed form; deterministic too);
# "mc_dropout" samples dropout masks; "variational" samples weights from a Gaussian posterior (bayesian-torch).
HEAD_KINDS = ("deterministic", "gaussian_nb", "mc_dropout", "variational")
DETERMINISTIC_HEADS = ("deterministic", "gaussian_nb")
VARIATIONAL_LAYERS = ("reparameterization", "flipout")
# Where the variational layers sit: only the classifier head, or every conv/linear layer of the from-scratch CNN.
VARIATIONAL_SCOPES = ("head", "all")
# The from-scratch CNN; any other backbone name is created with timm.
SCRATCH_CNN = "bayesfake_cnn"
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
# Where the domain gate reads its features: the detector's own backbone features ("features"), or a frozen timm model
# shipped inside the release (its name). None: no gate (a release before 2.0.0).
DOMAIN_OWN_FEATURES = "features"
# How ``threshold`` is chosen on validation (train.calibration.choose_thresholds): F1 of the FAKE class, Youden's J
# (TPR - FPR, the ROC point farthest above the diagonal), or a plain 0.5.
THRESHOLD_RULES = ("f1_optimal", "youden_j", "0.5")
# What an autoencoder detector's ``reconstruction_error`` measures between the image and its reconstruction: the mean
# absolute pixel error; the mean absolute error of their high-pass residuals (x - 3x3 Gaussian blur of x: the detail
# the decoder fails to rebuild); or an LPIPS-style distance on the encoder's own first three feature stages (frozen
# ImageNet layers when training left them frozen); the same on its 3rd and 4th stages pooled by the 90th percentile
# over space ("perceptual_deep"); or the Mahalanobis distance of the per-channel feature errors of its first four
# stages to those of the training images ("perceptual_mahalanobis": statistics fitted by
# train.reconstruction_density). Chosen by which tells wild images from CIFAKE best (issue 15).
REJECT_SCORES = ("predictive_entropy", "verdict_entropy")
# The reject scores in the words of the card and the certification record.
REJECT_SCORE_WORDS = {
    "predictive_entropy": "predictive entropy",
    "verdict_entropy": "verdict entropy (the entropy of P(FAKE) re-centred on the threshold: ln 2 at the threshold, "
                       "near 0 far from it on either side)",
}
RECONSTRUCTION_METRICS = ("l1", "highpass", "perceptual", "perceptual_deep", "perceptual_mahalanobis")
# How the image processor turns one image into views at ``image_size`` (see ``BayesFakeConfig.view_layout``): the
# views of each multi-view layout, in order. The one registry of layouts: the image processor (shipped next to this
# file in every release, and importing it relatively, as the modeling file does) cuts exactly these views.
VIEW_NAMES = {"whole_corners": ("whole", "corner_tl", "corner_tr", "corner_bl", "corner_br"),
              "five_crop": ("corner_tl", "corner_tr", "corner_bl", "corner_br", "centre"),
              "whole_five_crop": ("whole", "corner_tl", "corner_tr", "corner_bl", "corner_br", "centre"),
              # fewer views, for speed: the whole copy and its centre; the diagonal (two corners and the centre)
              "whole_centre": ("whole", "centre"),
              "diagonal": ("corner_tl", "centre", "corner_br")}
# How many views each layout makes: "center" is the one thumbnail every detector before the full-size one sees.
VIEW_LAYOUTS = {"center": 1, **{name: len(views) for name, views in VIEW_NAMES.items()}}


class BayesFakeConfig(PretrainedConfig):
    """Architecture, sampling, decision rule and preprocessing of a BayesFake detector.

    Args:
        backbone: ``"bayesfake_cnn"`` (from-scratch BatchNorm CNN) or a timm model name.
        cnn_widths: channels of the from-scratch CNN's three stages (two 3x3 convs each).
        head: one of ``HEAD_KINDS``.
        head_hidden: hidden layer sizes of the classifier head MLP (empty for a linear head).
        dropout: dropout rate of the MC-Dropout head (also used as train-time regulariser elsewhere).
        variational_layer: ``"reparameterization"`` or ``"flipout"`` (bayesian-torch layer family).
        variational_scope: ``"head"`` or ``"all"`` (every conv and linear layer Bayesian; scratch CNN only).
        prior_mu, prior_sigma: Gaussian prior N(mu, sigma^2) on every variational weight.
        posterior_mu_init, posterior_rho_init: initial posterior mean and rho (sigma = softplus(rho)).
        num_samples: default number T of Monte Carlo samples.
        threshold: decision threshold on P(FAKE), chosen on validation.
        calibration_temperature: temperature applied to every sampled logit (fitted on validation; 1.0 = none).
        reject_entropy: the reject rule's level (nats): above it, by ``reject_score``, the verdict is "uncertain";
            None = never reject.
        reject_score: what the reject rule compares with ``reject_entropy``: ``"predictive_entropy"`` (releases
            before 2026-11-27) or ``"verdict_entropy"``, the binary entropy of P(FAKE) re-centred on ``threshold``
            (``modeling_bayesfake.verdict_entropy``): how near the mean prediction is to flipping the verdict. The two
            are one where the threshold is 0.5.
        image_size: square input side in pixels; image_mean / image_std: per-channel normalisation.
        resample: PIL filter used when an input must be resized to ``image_size``.
        source_image_size: side of the training images as they were before preprocessing resized them to
            ``image_size`` (CIFAKE: 32, also for a backbone fed 128 px); None = ``image_size``. It says how far an input
            is from the training data (``training_image_size``; the Space's out-of-domain warning).
        training_domain: plain-words description of the training data, shown to users.
        sampling_seed: seed of the T samples when a call gives neither ``seed`` nor ``generator`` (eval mode), so the
            same image always gets the same answer, ``pipeline()`` included; None = fresh draws from the global RNG.
        release_version: version of a released detector ("MAJOR.MINOR.PATCH"); its golden outputs carry the same
            version, and a change of outputs needs a new one. None for an unreleased model.
        metrics: measured evaluation metrics (namespaced, e.g. ``cls/acc``), written at export.
        domain_gate: where the domain gate reads features: ``"features"`` (the detector's own backbone), a timm model
            name (a frozen extractor shipped in the release, fed ``domain_image_size`` px with ``domain_image_mean`` /
            ``domain_image_std``), or None (no gate). The gate's statistics (one Gaussian per class fitted on the
            training set) are weights of the release; ``domain_threshold`` is the Mahalanobis distance above which
            an image is "outside what this detector was trained on" (chosen so that >= 99% of in-domain validation
            images pass).
        training_data: names of the data sets the detector learned from, e.g. ``["cifake"]``.
        abstention: how ``reject_entropy`` was chosen, for the record: method, alpha (the error rate allowed among
            answered in-domain images), delta (the probability the bound may fail), calibration size, the coverage
            reached; None when it was not chosen with a guarantee.
        decoder_widths: channels of the BatchNorm decoder of an autoencoder detector (timm backbones only), one per
            doubling of the side from the encoder's last feature map; empty = no decoder. With one the output adds
            ``reconstruction_error`` [B] (how far the image rebuilt from its own features is from the image, as
            ``reconstruction_metric`` measures it).
        reconstruction_metric: what ``reconstruction_error`` measures, one of ``RECONSTRUCTION_METRICS``.
        greyscale: the detector sees the luminance of its input only (ITU-R BT.601, as PIL's "L"), replicated to three
            channels for the encoder; its decoder rebuilds that one channel. Autoencoder detectors only.
        threshold_rule: how ``threshold`` is chosen on validation, one of ``THRESHOLD_RULES``.
        int8_backbone: run the from-scratch CNN backbone in int8 (PyTorch static quantization, x86 backend), rebuilt
            at load from the float weights and the activation ranges calibrated at release (stored as weights under
            ``backbone.int8_observers``), so every load gives the same int8 network and the same outputs. About 4x the
            float backbone's speed on CPU; a release that sets it was evaluated, certified and exported in int8.
        view_layout: how an image of any size becomes ``num_views`` views at ``image_size`` px, one of
            ``VIEW_LAYOUTS``: "center" (one view: shorter side resized, centre-cropped), or views of a copy whose
            longer side is at most ``view_max_side`` px ("whole_corners": the whole copy resized and centre-cropped
            plus its four corner crops at native scale; "five_crop": its four corners and its centre;
            "whole_five_crop": all six; "whole_centre": the whole copy and its centre; "diagonal": the top-left and
            bottom-right corners and the centre; ``VIEW_NAMES`` lists each layout's views). With more than one view
            ``pixel_values`` is [B, K, 3, S, S]: the frozen backbone runs once per view, the K features are averaged,
            and only the head is sampled.
        view_max_side: longer side (px) of the copy the views are cut from (multi-view layouts only): the scale of
            the training images, so a 4000x3000 phone photo is judged at the scale the detector learned.
    """

    model_type = "bayesfake"

    def __init__(
        self,
        backbone: str = SCRATCH_CNN,
        cnn_widths: list[int] | tuple[int, ...] = (32, 64, 128),
        head: str = "mc_dropout",
        head_hidden: list[int] | tuple[int, ...] = (),
        dropout: float = 0.3,
        variational_layer: str = "reparameterization",
        variational_scope: str = "head",
        prior_mu: float = 0.0,
        prior_sigma: float = 1.0,
        posterior_mu_init: float = 0.0,
        posterior_rho_init: float = -4.0,
        num_samples: int = 30,
        threshold: float = 0.5,
        calibration_temperature: float = 1.0,
        reject_entropy: float | None = None,
        reject_score: str = "predictive_entropy",
        image_size: int = 32,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        resample: str = "bicubic",
        source_image_size: int | None = None,
        training_domain: str = "",
        sampling_seed: int | None = 0,
        release_version: str | None = None,
        metrics: dict | None = None,
        domain_gate: str | None = None,
        domain_image_size: int = 128,
        domain_image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        domain_image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        domain_threshold: float | None = None,
        training_data: list[str] | tuple[str, ...] = (),
        abstention: dict | None = None,
        int8_backbone: bool = False,
        decoder_widths: list[int] | tuple[int, ...] = (),
        greyscale: bool = False,
        threshold_rule: str = "f1_optimal",
        reconstruction_metric: str = "l1",
        view_layout: str = "center",
        view_max_side: int = 512,
        **kwargs,
    ):
        kwargs.setdefault("id2label", {0: "REAL", 1: "FAKE"})
        kwargs.setdefault("label2id", {"REAL": 0, "FAKE": 1})
        self.backbone = backbone
        self.cnn_widths = [int(w) for w in cnn_widths]
        self.head = head
        self.head_hidden = [int(h) for h in head_hidden]
        self.dropout = float(dropout)
        self.variational_layer = variational_layer
        self.variational_scope = variational_scope
        self.prior_mu = float(prior_mu)
        self.prior_sigma = float(prior_sigma)
        self.posterior_mu_init = float(posterior_mu_init)
        self.posterior_rho_init = float(posterior_rho_init)
        self.num_samples = num_samples
        self.threshold = float(threshold)
        self.calibration_temperature = float(calibration_temperature)
        self.reject_entropy = None if reject_entropy is None else float(reject_entropy)
        self.reject_score = reject_score
        self.image_size = image_size
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.resample = resample
        self.source_image_size = source_image_size
        self.training_domain = training_domain
        self.sampling_seed = sampling_seed
        self.release_version = release_version
        self.metrics = dict(metrics or {})
        self.domain_gate = domain_gate
        self.domain_image_size = domain_image_size
        self.domain_image_mean = [float(m) for m in domain_image_mean]
        self.domain_image_std = [float(s) for s in domain_image_std]
        self.domain_threshold = None if domain_threshold is None else float(domain_threshold)
        self.training_data = [str(name) for name in training_data]
        self.abstention = None if abstention is None else dict(abstention)
        self.int8_backbone = int8_backbone
        self.decoder_widths = [int(w) for w in decoder_widths]
        self.greyscale = greyscale
        self.threshold_rule = threshold_rule
        self.reconstruction_metric = reconstruction_metric
        self.view_layout = view_layout
        self.view_max_side = view_max_side
        super().__init__(**kwargs)
        self.validate_bayesfake()

    def validate_bayesfake(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot make a working detector."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"BayesFakeConfig.{field}={getattr(self, field)!r}: {why}")

        def positive_int(value, least: int = 1) -> bool:  # bool is an int subclass, and True is no size
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        if not isinstance(self.backbone, str) or not self.backbone:
            fail("backbone", f"must be {SCRATCH_CNN!r} or a timm model name")
        if len(self.cnn_widths) != 3 or min(self.cnn_widths) < 1:
            fail("cnn_widths", "must be three positive channel counts")
        if self.head not in HEAD_KINDS:
            fail("head", f"must be one of {HEAD_KINDS}")
        if any(h < 1 for h in self.head_hidden):
            fail("head_hidden", "hidden sizes must be positive")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.head == "gaussian_nb" and self.head_hidden:
            fail("head_hidden", "a gaussian_nb head models the backbone features directly: no hidden layers")
        if self.head == "mc_dropout" and self.dropout == 0.0:
            fail("dropout", "an mc_dropout head needs a dropout rate > 0, or it never samples anything")
        if self.variational_layer not in VARIATIONAL_LAYERS:
            fail("variational_layer", f"must be one of {VARIATIONAL_LAYERS}")
        if self.variational_scope not in VARIATIONAL_SCOPES:
            fail("variational_scope", f"must be one of {VARIATIONAL_SCOPES}")
        if self.variational_scope == "all" and self.backbone != SCRATCH_CNN:
            fail("variational_scope", f"'all' is only available for the {SCRATCH_CNN!r} backbone")
        if not 0 < self.prior_sigma < math.inf:
            fail("prior_sigma", "must be finite and > 0")
        if not positive_int(self.num_samples):
            fail("num_samples", "must be an integer >= 1")
        if not 0.0 < self.threshold < 1.0:
            fail("threshold", "must be in (0, 1)")
        if not 0 < self.calibration_temperature < math.inf:
            fail("calibration_temperature", "must be finite and > 0")
        if self.reject_entropy is not None and not self.reject_entropy > 0:
            fail("reject_entropy", "must be > 0 nats, or None")
        if self.reject_score not in REJECT_SCORES:
            fail("reject_score", f"must be one of {REJECT_SCORES}")
        if not positive_int(self.image_size):
            fail("image_size", "must be a positive integer")
        if self.source_image_size is not None and not positive_int(self.source_image_size):
            fail("source_image_size", "must be a positive integer, or None (= image_size)")
        if len(self.image_mean) != 3:
            fail("image_mean", "must hold 3 values (RGB)")
        if len(self.image_std) != 3 or min(self.image_std) <= 0:
            fail("image_std", "must hold 3 positive values (RGB)")
        if self.resample not in RESAMPLE_FILTERS:
            fail("resample", f"must be one of {RESAMPLE_FILTERS}")
        if not isinstance(self.training_domain, str):
            fail("training_domain", "must be plain text (on a command line, quote a value that holds ': ')")
        if self.sampling_seed is not None and not positive_int(self.sampling_seed, least=0):
            fail("sampling_seed", "must be an integer >= 0, or None (fresh draws)")
        if self.release_version is not None and not (
                isinstance(self.release_version, str) and re.fullmatch(r"\d+\.\d+\.\d+", self.release_version)):
            fail("release_version", 'must be "MAJOR.MINOR.PATCH" text, or None (unreleased)')
        if self.domain_gate is not None and (not isinstance(self.domain_gate, str) or not self.domain_gate):
            fail("domain_gate", f"must be {DOMAIN_OWN_FEATURES!r}, a timm model name, or None")
        if not positive_int(self.domain_image_size, least=8):
            fail("domain_image_size", "must be an integer >= 8")
        if len(self.domain_image_mean) != 3 or len(self.domain_image_std) != 3 or min(self.domain_image_std) <= 0:
            fail("domain_image_std", "domain_image_mean and domain_image_std must hold 3 values (RGB), std > 0")
        if self.domain_threshold is not None and not 0 < self.domain_threshold < math.inf:
            fail("domain_threshold", "must be a finite distance > 0, or None")
        if not isinstance(self.int8_backbone, bool):
            fail("int8_backbone", "must be true or false")
        if self.int8_backbone and (self.backbone != SCRATCH_CNN or (self.head == "variational"
                                                                         and self.variational_scope == "all")):
            fail("int8_backbone", "only the from-scratch CNN backbone of a head-only model runs in int8")
        if any(w < 1 for w in self.decoder_widths):
            fail("decoder_widths", "channel counts must be positive")
        if self.decoder_widths and self.backbone == SCRATCH_CNN:
            fail("decoder_widths", "an autoencoder detector decodes a timm backbone's feature map: name a timm model")
        if self.decoder_widths and self.head == "gaussian_nb":
            fail("head", "an autoencoder detector trains its head with the decoder: not a closed-form gaussian_nb head")
        if not isinstance(self.greyscale, bool):
            fail("greyscale", "must be true or false")
        if self.greyscale and not self.decoder_widths:
            fail("greyscale", "only autoencoder detectors (decoder_widths set) have a greyscale variant")
        if self.threshold_rule not in THRESHOLD_RULES:
            fail("threshold_rule", f"must be one of {THRESHOLD_RULES}")
        if self.reconstruction_metric not in RECONSTRUCTION_METRICS:
            fail("reconstruction_metric", f"must be one of {RECONSTRUCTION_METRICS}")
        if self.view_layout not in VIEW_LAYOUTS:
            fail("view_layout", f"must be one of {tuple(VIEW_LAYOUTS)}")
        if self.view_layout != "center" and self.backbone == SCRATCH_CNN:
            fail("view_layout", "multi-view input is for a frozen timm backbone (the views' features are averaged)")
        if not positive_int(self.view_max_side, least=8):
            fail("view_max_side", "must be an integer >= 8")
        if self.num_labels != 2:
            fail("num_labels", "a BayesFake detector has exactly two labels, REAL (0) and FAKE (1)")

    @property
    def training_image_size(self) -> int:
        """Side of the images the detector learned from, before they were resized to ``image_size``."""
        return self.image_size if self.source_image_size is None else self.source_image_size

    @property
    def num_views(self) -> int:
        """K, the views of one image in ``pixel_values`` [B, K, 3, S, S] (1: the plain [B, 3, S, S])."""
        return VIEW_LAYOUTS[self.view_layout]

    @property
    def stochastic(self) -> bool:
        """Whether Monte Carlo sampling changes the output (False for the deterministic and Gaussian NB heads)."""
        return self.head not in DETERMINISTIC_HEADS
