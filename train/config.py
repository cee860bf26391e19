"""The training config: one ``TrainConfig`` for every kind of run, read from YAML with ``KEY=VALUE`` overrides.

Two kinds of run share it (``features`` picks one):

- pixels (``features: false``, train/configs/*.yaml): the whole detector trains end to end on uint8 images, from
  scratch or from a pretrained timm backbone (``backbone_weights``) that is fine-tuned with it;
- features (``features: true``, train/configs/frozen/*.yaml): the backbone is a frozen pretrained network whose pooled
  features are cached once, and only the head trains on them. A Gaussian NB head is fitted in closed form (no
  optimiser, one "epoch").

A pixel run may start from a trained detector's weights (``init_from``: fine-tuning) and launder its training images
(``launder``: train.laundering.random_launder).

Every field is checked for type and range when the config is built (``__post_init__``), with a message naming the
field, and the ``model`` mapping must make a valid ``BayesFakeConfig``: a bad value fails before any data is decoded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hub_models import BayesFakeConfig

OPTIMIZERS = ("adamw", "adam")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    name: str
    model: dict = field(default_factory=dict)  # BayesFakeConfig kwargs
    data: str = "../shared/data/cifake"  # see train.data: a parquet/`datasets` folder, an image folder or a Hub id
    out_dir: str = ""  # default runs/NAME

    # What trains on what
    features: bool = False  # True: train the head on cached features of the frozen pretrained backbone
    backbone_weights: str = ""  # timm backbones: pretrained weights file, or "timm" to download them by name
    max_train: int = 0  # >0: a seeded subset of this many training images (0 = all of train)
    # Side the images are decoded and cached at before the processor's resize to image_size (0 = image_size). Feature
    # runs only: CIFAKE is 32 px, decoding at 32 and resizing when the features are extracted gives the same pixels.
    decode_size: int = 0
    val_fraction: float = 0.05  # validation carved from train (seeded, stratified); recorded in the run
    seed: int = 0

    # Optimisation
    epochs: int = 6
    batch_size: int = 128
    drop_last: bool = True  # drop each epoch's last partial batch
    optimizer: str = "adamw"  # "adamw" (decoupled weight decay) or "adam" (weight decay as an L2 gradient term)
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # "cosine": warm-up then cosine decay per cycle; "constant": lr throughout
    warmup_fraction: float = 0.05  # of each cosine cycle
    # Cosine cycles with warm restarts (SGDR): epochs per cycle, summing to `epochs`; empty = one cycle. Each restart
    # peaks at lr * lr_cycle_decay**k. A finished run extended by a new cycle resumes from its checkpoint.
    lr_cycles: list = field(default_factory=list)
    lr_cycle_decay: float = 1.0
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    kl_weight: float = 1.0  # variational layers: loss = NLL + kl_weight * KL / N (the ELBO per example)
    gnb_var_smoothing: float = 1e-9  # Gaussian NB: share of the largest feature variance added to every variance
    augment: bool = True  # pixel runs: random horizontal flip + translation by up to `crop_pad` pixels
    crop_pad: int = 2
    # Pixel runs: probability per training image of one random everyday laundering (train.laundering.random_launder:
    # JPEG, blur, down-and-up scaling or a crop resized back), applied to both classes so the detector cannot read
    # "smoothed" as REAL or FAKE. 0 = none.
    launder: float = 0.0
    # A detector folder (a release such as hub_models/cifake-mcdropout-cnn, or a run's OUT/final) whose weights the
    # run starts from: fine-tuning. Its architecture must be the one `model` describes; its calibration (temperature,
    # threshold, reject entropy) is not carried over, the evaluation refits it. "" = initialise from `seed`.
    init_from: str = ""
    channels_last: bool = True  # pixel runs: NHWC activations, oneDNN's faster convolution layout on CPU

    # Autoencoder detectors (model.decoder_widths set; train.autoencoder, train.losses): loss = recon_weight x
    # (ssim_share x (1 - SSIM) + (1 - ssim_share) x L1 + perceptual_weight x perceptual) + class weight x focal loss.
    # The seed's alpha_r = ssim_share, beta = perceptual_weight, gamma_r = recon_weight, gamma_c = focal_gamma,
    # alpha_c = focal_alpha. label_smoothing above smooths the focal loss's targets.
    recon_weight: float = 1.0
    ssim_share: float = 0.84
    perceptual_weight: float = 0.15  # 0: no perceptual term (it needs backbone_weights)
    class_weight: float = 1.0  # the classification weight once the ramp is done
    focal_gamma: float = 2.0  # 0 with focal_alpha -1: label-smoothed binary cross-entropy
    focal_alpha: float = 0.5  # weight of the FAKE class (REAL: 1 - it); -1 = both alike
    classifier_frozen_fraction: float = 0.1  # of all steps: classification weight 0, head frozen
    classifier_ramp_fraction: float = 0.1  # of all steps after that: the weight rises linearly to class_weight
    unfreeze_blocks: int = 3  # only the encoder's last N timm blocks (and the layers after them) train; 0 = all

    # Validation and how the run executes
    val_samples: int = 10  # T of the per-epoch validation
    ckpt_every: int = 200  # steps between checkpoints (and one at every epoch end)
    threads: int = 0  # torch threads; 0 = all cores

    def __post_init__(self):
        check_types(self)
        checks = {
            "name": (bool(self.name.strip()), "must not be empty"),
            "epochs": (self.epochs >= 1, "must be >= 1"),
            "batch_size": (self.batch_size >= 1, "must be >= 1"),
            "max_train": (self.max_train >= 0, "must be >= 0 (0 = all of train)"),
            "decode_size": (self.decode_size >= 0, "must be >= 0 (0 = the model's image_size)"),
            "val_fraction": (0 < self.val_fraction < 1, "must be in (0, 1)"),
            "seed": (self.seed >= 0, "must be >= 0"),
            "optimizer": (self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            "lr": (math.isfinite(self.lr) and self.lr >= 0, "must be a finite number >= 0"),
            "lr_schedule": (self.lr_schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}"),
            "warmup_fraction": (0 <= self.warmup_fraction < 1, "must be in [0, 1)"),
            "lr_cycle_decay": (math.isfinite(self.lr_cycle_decay) and self.lr_cycle_decay > 0, "must be > 0"),
            "weight_decay": (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            "kl_weight": (math.isfinite(self.kl_weight) and self.kl_weight >= 0, "must be >= 0"),
            "gnb_var_smoothing": (math.isfinite(self.gnb_var_smoothing) and self.gnb_var_smoothing >= 0,
                                  "must be >= 0"),
            "crop_pad": (self.crop_pad >= 0, "must be >= 0"),
            "launder": (0 <= self.launder <= 1, "must be in [0, 1]"),
            "val_samples": (self.val_samples >= 1, "must be >= 1"),
            "ckpt_every": (self.ckpt_every >= 1, "must be >= 1"),
            "threads": (self.threads >= 0, "must be >= 0 (0 = all cores)"),
            "recon_weight": (math.isfinite(self.recon_weight) and self.recon_weight >= 0, "must be >= 0"),
            "ssim_share": (0 <= self.ssim_share <= 1, "must be in [0, 1]"),
            "perceptual_weight": (math.isfinite(self.perceptual_weight) and self.perceptual_weight >= 0,
                                  "must be >= 0"),
            "class_weight": (math.isfinite(self.class_weight) and self.class_weight > 0, "must be > 0"),
            "focal_gamma": (math.isfinite(self.focal_gamma) and self.focal_gamma >= 0, "must be >= 0"),
            "focal_alpha": (self.focal_alpha == -1 or 0 < self.focal_alpha < 1, "must be in (0, 1), or -1 (none)"),
            "classifier_frozen_fraction": (0 <= self.classifier_frozen_fraction < 1, "must be in [0, 1)"),
            "classifier_ramp_fraction": (0 <= self.classifier_ramp_fraction < 1, "must be in [0, 1)"),
            "unfreeze_blocks": (self.unfreeze_blocks >= 0, "must be >= 0 (0 = every encoder layer trains)"),
        }
        for name, (ok, why) in checks.items():
            if not ok:
                raise ValueError(f"{name} {why}; got {getattr(self, name)!r}")
        if self.lr_cycles and (any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.lr_cycles)
                               or sum(self.lr_cycles) != self.epochs):
            raise ValueError(f"lr_cycles {self.lr_cycles} must be positive epoch counts summing to "
                             f"epochs={self.epochs}")
        model = self.model_config()  # the detector's own checks, with its own messages
        if model.head == "gaussian_nb" and not self.features:
            raise ValueError("a gaussian_nb head is fitted in closed form on cached features: set features: true")
        if self.features:
            if not self.backbone_weights:
                raise ValueError("features: true trains a head on a frozen pretrained backbone; backbone_weights must "
                                 "name its weights (a file, or 'timm')")
            if model.head == "variational" and model.variational_scope == "all":
                raise ValueError("features: true needs a deterministic backbone; variational_scope 'all' samples it")
        if model.decoder_widths and self.features:
            raise ValueError("an autoencoder detector (model.decoder_widths) trains its encoder and decoder on pixels: "
                             "set features: false")
        if self.features and self.launder:
            raise ValueError("launder applies to pixel runs; a feature run trains on cached features of unlaundered "
                             "images (set launder: 0 or features: false)")
        if self.init_from and self.backbone_weights:
            raise ValueError("init_from loads every weight, the backbone's included: backbone_weights would be "
                             "overwritten; set one of them")
        if self.init_from and not (Path(self.init_from) / "config.json").is_file():
            raise ValueError(f"init_from must name a detector folder holding config.json and its weights (a release "
                             f"such as hub_models/cifake-mcdropout-cnn, or a run's final/); got {self.init_from!r}")
        if not self.features and self.decode_size not in (0, model.image_size):
            raise ValueError(f"decode_size applies to feature runs; a pixel run decodes at the model's image_size "
                             f"({model.image_size}); got {self.decode_size}")

    def model_config(self) -> BayesFakeConfig:
        return BayesFakeConfig(**self.model)

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    @property
    def closed_form(self) -> bool:
        """Fitted without an optimiser (a Gaussian NB head)."""
        return self.model_config().head == "gaussian_nb"


def config_defaults() -> dict:
    """Every TrainConfig field that has a default, with it."""
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING}


# Field annotation -> (accepted Python types, the words for the error message). bool is an int subclass and never
# passes as a number; ints pass as floats (YAML writes 1 for 1.0).
_TYPES = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "list": ((list,), "a list"),
    "dict": ((dict,), "a mapping"),
}


def check_types(cfg) -> None:
    """Raise ``ValueError`` naming the first field whose value has the wrong type; ints become floats where a float is
    expected, and numeric strings too (YAML 1.1 reads ``1e-9`` as a string)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        types, words = _TYPES[str(f.type)]
        if f.type == "float" and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ValueError(f"{f.name} must be {words}; got {value!r} ({type(value).__name__})")
        if f.type == "float":
            value = float(value)
        setattr(cfg, f.name, value)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file, then ``KEY=VALUE`` overrides (values are YAML; ``model.KEY`` sets a key of
    the detector's config)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        target = raw.setdefault("model", {}) if key.startswith("model.") else raw
        key = key.removeprefix("model.")
        if target is raw and key not in known:
            raise ValueError(f"--set {item}: unknown key {key!r}; allowed: {sorted(known)}")
        target[key] = yaml.safe_load(value)
    if "name" not in raw:
        raise ValueError(f"{path}: missing the required key 'name'")
    return TrainConfig(**raw)
