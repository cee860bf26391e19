"""BayesFake detector: a REAL/FAKE image classifier that says how sure it is, by T-sample Monte Carlo inference.

This file ships inside every Hub repo (``trust_remote_code=True`` downloads it with the configuration file), so it is
self-contained: torch, transformers, bayesian-torch, and timm only for timm backbones.

Public inference contract: ``out = model(pixel_values, num_samples=T)`` returns a ``BayesFakeOutput`` with
``probs`` [B, 2] (mean predictive), ``sample_probs`` [T, B, 2], ``std`` [B, 2], ``predictive_entropy`` [B] (total),
``mutual_information`` [B] (epistemic), ``expected_entropy`` [B] (aleatoric), ``verdict_entropy`` [B] (how near
P(FAKE) is to the threshold: what the reject rule reads when ``config.reject_score`` says so) and ``logits`` =
log(probs).
An autoencoder detector (``config.decoder_widths``: a timm encoder, a BatchNorm decoder, the head on the pooled
features) adds ``reconstruction_error`` [B]; its encoder and decoder run once per image, and ``model.reconstruct(x)``
returns the reconstruction and the per-pixel error map for display.

Cheap samples: the deterministic part of the network runs once per image; only the stochastic part is drawn T times,
batched along the batch axis (layout [B*T, ...], image-major), never as a Python loop of T passes. Where every layer is
stochastic (``variational_scope="all"``) each sample is a full pass: in eval mode the T weight samples of every layer
are drawn first (the order one grouped convolution per layer would draw them, which training still uses) and then run
as T plain passes, about 3x faster on CPU than the grouped convolutions, with the same samples for the same seed.

Opt-in, never the default (the released goldens are the default outputs): ``model(x, num_samples=T, adaptive=True)``
stops sampling an image once its verdict is settled and reports ``num_samples_used``; ``model.quantize_int8(pixels)``
runs a from-scratch CNN backbone in int8.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bayesian_torch.layers import Conv2dFlipout, Conv2dReparameterization, LinearFlipout, LinearReparameterization
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

from .configuration_bayesfake import DOMAIN_OWN_FEATURES, SCRATCH_CNN, BayesFakeConfig

BAYES_CONV = (Conv2dReparameterization, Conv2dFlipout)
BAYES_LINEAR = (LinearReparameterization, LinearFlipout)
BAYES_LAYERS = BAYES_CONV + BAYES_LINEAR
VERDICT_FAKE = "likely AI-generated"
VERDICT_REAL = "likely real"
VERDICT_UNSURE = "uncertain: needs human review"
VERDICT_OUTSIDE = "outside what this detector was trained on: no verdict"
VERDICTS = (VERDICT_FAKE, VERDICT_REAL, VERDICT_UNSURE, VERDICT_OUTSIDE)
# Adaptive sampling (``model(x, num_samples=T, adaptive=True)``): samples every image gets, samples per later round,
# and how many standard deviations of the remaining change of its mean P(FAKE) must separate it from every verdict cut
# point, with that per-sample spread never taken below the floor (see ``BayesFakeDetector.adaptive_settled``). Chosen
# on 3,000 CIFAKE train images with the released cifake-vi-bcnn at T=30 (verdicts equal to fixed T=30 on 99.77% of
# them, 5.9 samples per image on average, 6 rounds at most); benchmarks/bench_sampling.py measures them on the test
# split.
ADAPTIVE_FIRST = 3
ADAPTIVE_STEP = 3
ADAPTIVE_Z = 3.0
ADAPTIVE_SD_FLOOR = 0.05
# ITU-R BT.601 luma weights (PIL's "L" conversion): what a greyscale detector sees of an RGB image.
LUMA = (0.299, 0.587, 0.114)
ADAPTIVE_GROWTH = 1.5  # each later round takes the count to max(n + STEP, 1.5 n): checkpoints 3, 6, 9, 14, 21, 30


@dataclass
class BayesFakeOutput(ModelOutput):
    """Monte Carlo predictive of a BayesFake detector (entropies in nats)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    sample_probs: torch.Tensor | None = None
    std: torch.Tensor | None = None
    predictive_entropy: torch.Tensor | None = None
    verdict_entropy: torch.Tensor | None = None  # [B], nats: how near P(FAKE) is to the threshold (``verdict_entropy``)
    mutual_information: torch.Tensor | None = None
    expected_entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    num_samples_used: torch.Tensor | None = None  # [B], adaptive sampling only (``adaptive=True``)
    domain_score: torch.Tensor | None = None  # [B], detectors with a domain gate: higher = less like the training data
    in_domain: torch.Tensor | None = None  # [B] bool: domain_score <= config.domain_threshold
    reconstruction_error: torch.Tensor | None = None  # [B], autoencoder detectors: mean |image - its reconstruction|


# ----------------------------------------------------------------------------------------------------------------------
# Stochastic layers, applied to an image-major batch of T samples: x has shape [B*T, ...].


def _softplus_sigma(rho: torch.Tensor) -> torch.Tensor:
    return F.softplus(rho)


def _layer_params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mu_w, rho_w, mu_b, rho_b) of a bayesian-torch layer (conv layers call the weight 'kernel')."""
    if isinstance(layer, BAYES_CONV):
        return layer.mu_kernel, layer.rho_kernel, layer.mu_bias, layer.rho_bias
    return layer.mu_weight, layer.rho_weight, layer.mu_bias, layer.rho_bias


def _conv_args(layer: nn.Module) -> dict:
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


def apply_layer(layer: nn.Module, x: torch.Tensor, num_samples: int, stochastic: bool) -> torch.Tensor:
    """Apply a (possibly Bayesian) conv/linear layer to ``x`` of shape [B*T, ...] with T = ``num_samples``.

    Reparameterization layers draw T independent weight tensors and apply them in one grouped conv / batched matmul
    (exact independent samples). Flipout layers do the same at inference (eval mode): the posterior N(mu, sigma^2) is the
    same, and one grouped conv per layer costs a third of flipout's two convs and two sign tensors per row. In training
    they use bayesian-torch's own forward, whose per-example sign flips decorrelate the gradients of a minibatch.
    With ``stochastic=False`` a Bayesian layer uses its posterior mean weights.
    """
    if not isinstance(layer, BAYES_LAYERS):
        return layer(x)
    mu_w, rho_w, mu_b, rho_b = _layer_params(layer)
    is_conv = isinstance(layer, BAYES_CONV)
    if not stochastic:
        return F.conv2d(x, mu_w, mu_b, **_conv_args(layer)) if is_conv else F.linear(x, mu_w, mu_b)
    if isinstance(layer, (Conv2dFlipout, LinearFlipout)) and layer.training:
        return layer(x, return_kl=False)
    t = num_samples
    weight, bias = sample_weights(layer, t, x.dtype)
    b = x.shape[0] // t
    if is_conv:
        # [B*T, C, H, W] image-major is a free view of [B, T*C, H, W]: sample t only sees weight group t.
        out = F.conv2d(
            x.reshape(b, t * x.shape[1], *x.shape[2:]),
            weight.reshape(t * weight.shape[1], *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            groups=t,
            **_conv_args(layer),
        )
        return out.reshape(b * t, -1, *out.shape[2:])
    out = torch.einsum("bti,toi->bto", x.reshape(b, t, -1), weight)
    if bias is not None:
        out = out + bias
    return out.reshape(b * t, -1)


def sample_weights(layer: nn.Module, num_samples: int,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T weight samples [T, *weight.shape] and T bias samples (or None) of a bayesian-torch layer, drawn from the
    global RNG in the one order every sampling path uses: all weights, then all biases. ``apply_layer`` draws through
    here, and so do the paths that draw every layer first (the T-pass loop, adaptive sampling): they see the very same
    samples for the same seed."""
    mu_w, rho_w, mu_b, rho_b = _layer_params(layer)
    dtype = dtype or mu_w.dtype
    t = num_samples
    weight = mu_w + _softplus_sigma(rho_w) * torch.randn((t, *mu_w.shape), device=mu_w.device, dtype=dtype)
    bias = None
    if mu_b is not None:
        bias = mu_b + _softplus_sigma(rho_b) * torch.randn((t, *mu_b.shape), device=mu_b.device, dtype=dtype)
    return weight, bias


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.BatchNorm2d,
                   samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in: conv(x, w', b') = norm(conv(x, w, b)) up to float
    round-off (~1e-6 here), one pass over the activations instead of two. With ``samples`` = T, ``weight`` is
    [T, C_out, ...] and ``bias`` [T, C_out] (or None): every sample is folded at once, and the bias comes back
    [T, C_out]."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if bias is not None:
        shift = shift + bias * scale
    lead = 0 if samples is None else 1
    folded = weight * scale.view(*([1] * lead), -1, *([1] * (weight.dim() - 1 - lead)))
    if samples is not None:
        shift = shift.expand(samples, shift.shape[-1])
    return folded, shift


def shared_dropout(x: torch.Tensor, p: float, num_samples: int) -> torch.Tensor:
    """Inference-time MC dropout on ``x`` [B*T, D] (image-major): sample t uses the same mask for every image.

    Each image then sees the same T masks whatever else is in its batch, so a given image, seed and T give the same
    answer alone or in any batch (a mask drawn per row would depend on the image's position and the batch size).
    Each image's own T masks are still independent draws, so its predictive is the MC-Dropout predictive.
    """
    keep = dropout_masks(num_samples, x, p)
    return (x.reshape(-1, num_samples, x.shape[-1]) * keep).reshape(x.shape)


def dropout_masks(num_samples: int, x: torch.Tensor, p: float) -> torch.Tensor:
    """The T inference-time dropout masks [T, D] (scaled by 1 / (1 - p)) shared by the images of a batch: one draw of
    T x D Bernoullis, the same on every sampling path, so the paths give the same numbers for the same seed."""
    keep = torch.empty((num_samples, x.shape[-1]), device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return keep / (1.0 - p)


def gaussian_kl(layer: nn.Module) -> torch.Tensor:
    """KL(q || prior) of one bayesian-torch layer, summed over its parameters.

    bayesian-torch's own ``kl_div`` averages over parameters; the ELBO needs the sum, so it is computed here.
    """
    mu_w, rho_w, mu_b, rho_b = _layer_params(layer)
    pairs = [(mu_w, rho_w, layer.prior_weight_mu, layer.prior_weight_sigma)]
    if mu_b is not None:
        pairs.append((mu_b, rho_b, layer.prior_bias_mu, layer.prior_bias_sigma))
    total = mu_w.new_zeros(())
    for mu_q, rho_q, mu_p, sigma_p in pairs:
        sigma_q = _softplus_sigma(rho_q)
        kl = torch.log(sigma_p) - torch.log(sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
        total = total + kl.sum()
    return total


def make_conv(config: BayesFakeConfig, cin: int, cout: int, bayesian: bool) -> nn.Module:
    if not bayesian:
        return nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    cls = Conv2dFlipout if config.variational_layer == "flipout" else Conv2dReparameterization
    return cls(cin, cout, 3, padding=1, bias=False, **_prior_kwargs(config))


def make_linear(config: BayesFakeConfig, fin: int, fout: int, bayesian: bool) -> nn.Module:
    if not bayesian:
        return nn.Linear(fin, fout)
    cls = LinearFlipout if config.variational_layer == "flipout" else LinearReparameterization
    return cls(fin, fout, **_prior_kwargs(config))


def _prior_kwargs(config: BayesFakeConfig) -> dict:
    # bayesian-torch names the prior's standard deviation "prior_variance" (it fills prior_*_sigma with it).
    return dict(
        prior_mean=config.prior_mu,
        prior_variance=config.prior_sigma,
        posterior_mu_init=config.posterior_mu_init,
        posterior_rho_init=config.posterior_rho_init,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Networks


@contextlib.contextmanager
def _quiet_quantization():
    """torch.ao.quantization warns at every build that its API will move (to torchao) and that ``reduce_range`` will
    be renamed; both are about PyTorch's future, not this detector's output, so a load stays quiet."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", module=r"torch\.ao\.quantization.*")
        yield


class ScratchCNN(nn.Module):
    """Compact BatchNorm CNN for small images: three stages of two 3x3 convs, max-pool between, global average pool."""

    def __init__(self, config: BayesFakeConfig, bayesian: bool):
        super().__init__()
        widths = config.cnn_widths
        chans = [3, widths[0], widths[0], widths[1], widths[1], widths[2], widths[2]]
        self.convs = nn.ModuleList(make_conv(config, chans[i], chans[i + 1], bayesian) for i in range(6))
        self.norms = nn.ModuleList(nn.BatchNorm2d(chans[i + 1]) for i in range(6))
        self.num_features = widths[2]
        self.image_size = config.image_size
        # An int8 release stores the activation observers calibrated at release (their histograms and ranges) as
        # weights; the int8 network is rebuilt from them and the float weights (``build_int8``).
        self.int8_observers = self.int8_observer_template() if config.int8_backbone else None

    @property
    def bayesian(self) -> bool:
        return isinstance(self.convs[0], BAYES_CONV)

    # int8 inference (config.int8_backbone, or the opt-in ``BayesFakeDetector.quantize_int8``): PyTorch FX static
    # quantization of the BatchNorm-folded float network, x86 backend (fbgemm / oneDNN with VNNI).

    def int8_float_network(self) -> nn.Sequential:
        """The eval-mode float network as plain layers (BatchNorm folded into each conv): what gets quantized."""
        layers = []
        with torch.no_grad():
            for i, ((weight, bias), conv, norm) in enumerate(zip(self.mean_weights(), self.convs, self.norms)):
                weight, bias = fold_batchnorm(weight, bias, norm)
                # skip_init: no random initialisation, so building (even lazily, inside a seeded forward) draws
                # nothing from the RNG that the Monte Carlo samples use.
                plain = nn.utils.skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], weight.shape[2:], bias=True,
                                           device=weight.device, **_conv_args(conv))
                plain.weight.copy_(weight)
                plain.bias.copy_(bias)
                layers += [plain, nn.ReLU()]
                if i in (1, 3):
                    layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()

    def int8_prepared(self):
        """The float network with an observer at every point the int8 network quantizes (``prepare_fx``)."""
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        torch.backends.quantized.engine = engine
        example = torch.zeros(1, 3, self.image_size, self.image_size).contiguous(memory_format=torch.channels_last)
        with _quiet_quantization():
            return prepare_fx(self.int8_float_network(), get_default_qconfig_mapping(engine), example_inputs=(example,))

    @staticmethod
    def _activation_observers(prepared) -> dict[str, nn.Module]:
        return {name: module for name, module in prepared.named_children() if name.startswith("activation_post_process")}

    def int8_observer_template(self) -> nn.ModuleDict:
        """Uncalibrated activation observers, in the shapes a release stores them (filled by loading its weights)."""
        return nn.ModuleDict(self._activation_observers(self.int8_prepared()))

    def build_int8(self, calibration_pixel_values: torch.Tensor | None = None) -> None:
        """Build the int8 network: calibrate fresh observers on ``calibration_pixel_values`` [N, 3, S, S] and keep them
        as ``int8_observers`` (weights, saved with the model), or, without it, reuse the stored ones."""
        from torch.ao.quantization.quantize_fx import convert_fx

        prepared = self.int8_prepared()
        observers = self._activation_observers(prepared)
        if calibration_pixel_values is not None:
            with torch.no_grad():
                for start in range(0, calibration_pixel_values.shape[0], 256):
                    batch = calibration_pixel_values[start:start + 256].detach().float().cpu()
                    prepared(batch.contiguous(memory_format=torch.channels_last))
            self.int8_observers = copy.deepcopy(nn.ModuleDict(observers)).to(self.convs[0].weight.device)
        else:
            stored = self.int8_observers
            if stored is None or set(stored) != set(observers):
                raise ValueError("this int8 detector holds no calibrated activation observers (backbone.int8_observers):"
                                 " the release is incomplete")
            for name, observer in observers.items():
                state = {key: value.detach().cpu() for key, value in stored[name].state_dict().items()}
                for key, value in state.items():
                    if value.is_floating_point() and not torch.isfinite(value).all():
                        raise ValueError(f"the int8 observer {name}.{key} is not calibrated (non-finite values)")
                observer.load_state_dict(state)
        # Kept out of the module tree (no parameters, no state_dict keys): the float weights stay the saved weights.
        # fork_rng: convert_fx draws from the global RNG, and a lazy build runs inside a seeded forward, whose Monte
        # Carlo samples must not depend on whether the int8 network was already built.
        with _quiet_quantization(), torch.random.fork_rng(devices=[]):
            self.__dict__["_int8"] = convert_fx(prepared).eval()

    def forward(self, x: torch.Tensor, num_samples: int = 1, stochastic: bool = False) -> torch.Tensor:
        """Pooled features of ``x`` [B*T, 3, H, W] (image-major; T = ``num_samples`` weight samples of a variational
        CNN, else T = 1).

        In eval mode each BatchNorm is folded into its conv and the activations are channels-last (the same function
        up to float round-off, ~1e-6, about 1.6x faster here), and a variational CNN draws every layer's T weight
        samples first, in the order ``apply_layer`` draws them, then runs T plain passes (about 3x faster on CPU than
        one grouped conv per layer, with the same samples for the same seed). Training keeps the plain layers (batch
        statistics, flipout).
        """
        if self.training:
            for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
                x = F.relu(norm(apply_layer(conv, x, num_samples, stochastic)))
                if i in (1, 3):
                    x = F.max_pool2d(x, 2)
            return x.mean(dim=(2, 3))
        quantized = self.__dict__.get("_int8")
        if quantized is None and self.int8_observers is not None:  # e.g. built from a config, then load_state_dict
            self.build_int8()
            quantized = self.__dict__["_int8"]
        if not (self.bayesian and stochastic):
            if quantized is not None and not (torch.is_grad_enabled() and x.requires_grad) and x.device.type == "cpu":
                return quantized(x.contiguous(memory_format=torch.channels_last))
            return self.sample_pass(x, self.mean_weights())
        folded = self.fold_samples(self.draw_samples(num_samples, x.dtype))
        b, t = x.shape[0] // num_samples, num_samples
        images = x.reshape(b, t, *x.shape[1:])
        features = [self.sample_pass(images[:, i], [(w[i], bias[i]) for w, bias in folded], folded=True)
                    for i in range(t)]
        return torch.stack(features, 1).reshape(b * t, -1)

    def fold_samples(self, draws: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The T weight samples of ``draw_samples`` with each layer's BatchNorm folded in, all samples at once."""
        return [fold_batchnorm(w, b, norm, samples=w.shape[0]) for (w, b), norm in zip(draws, self.norms)]

    def mean_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of each conv: the plain weights, or a variational layer's posterior mean."""
        out = []
        for conv in self.convs:
            if isinstance(conv, BAYES_CONV):
                mu_w, _, mu_b, _ = _layer_params(conv)
                out.append((mu_w, mu_b))
            else:
                out.append((conv.weight, conv.bias))
        return out

    def draw_samples(self, num_samples: int, dtype: torch.dtype | None = None) -> list:
        """T weight (and bias) samples of every conv, in layer order: the draws one stochastic forward makes."""
        return [sample_weights(conv, num_samples, dtype) for conv in self.convs]

    def sample_pass(self, x: torch.Tensor, weights: list, folded: bool = False) -> torch.Tensor:
        """One eval-mode pass of images ``x`` [B, 3, H, W] with one weight sample per conv: [B, D] features
        (``folded``: the weights already hold their BatchNorm, see ``fold_samples``)."""
        x = x.contiguous(memory_format=torch.channels_last)
        for i, ((weight, bias), conv, norm) in enumerate(zip(weights, self.convs, self.norms)):
            if not folded:
                weight, bias = fold_batchnorm(weight, bias, norm)
            x = F.conv2d(x, weight, bias, **_conv_args(conv)).relu_()
            if i in (1, 3):
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))


class TimmBackbone(nn.Module):
    """Any timm model as a pooled feature extractor (classifier removed)."""

    def __init__(self, config: BayesFakeConfig):
        super().__init__()
        import timm  # only timm-backbone detectors need it

        self.model = timm.create_model(config.backbone, pretrained=False, num_classes=0)
        self.num_features = self.model.num_features

    def forward(self, x: torch.Tensor, num_samples: int = 1, stochastic: bool = False) -> torch.Tensor:
        if x.dim() == 5:  # [B, K, 3, S, S]: K views of each image (config.view_layout): one pass per view, mean
            return self.forward(x.flatten(0, 1)).unflatten(0, x.shape[:2]).mean(1)
        # Channels-last activations in eval mode: oneDNN's NHWC kernels (depthwise convs above all) make MobileNetV2 and
        # EfficientNet-Lite0 1.6-2.3x faster on CPU here, the features equal to ~1e-5.
        if not self.training:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map [B, C, h, w] before pooling (what an autoencoder's decoder rebuilds the image from);
        ``pool(feature_map(x))`` equals ``forward(x)``."""
        if not self.training:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] of a ``feature_map`` (timm's own global pooling)."""
        return self.model.forward_head(feature_map, pre_logits=True)


def reconstruction_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel error [B] of an autoencoder detector's reconstruction (``reconstruction_metric`` "l1")."""
    return (reconstruction - target).abs().flatten(1).mean(1).float()


def highpass_residual(images: torch.Tensor) -> torch.Tensor:
    """``images`` minus their 3x3 Gaussian blur (sigma 1, reflected borders, as torchvision's ``gaussian_blur``): the
    finest detail, [B, C, S, S]."""
    taps = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], device=images.device) ** 2 / 2)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    c = images.shape[1]
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"),
                       kernel.to(images.dtype).expand(c, 1, 3, 3), groups=c)
    return images - blurred


PERCEPTUAL_STAGES = 3  # the encoder's first feature stages the "perceptual" reconstruction error compares


DEEP_PERCEPTUAL_STAGES = (2, 3)  # "perceptual_deep": the encoder's 3rd and 4th stages (MobileNetV2 at 64 px: 8x8, 4x4)
DEEP_PERCEPTUAL_QUANTILE = 0.9  # ... pooled over space by this quantile: where the image is least like its rebuild


def perceptual_distance(stages, quantile: float | None = None) -> torch.Tensor:
    """[B] distance between two image batches from their feature stages, each [2B, C, h, w] (the first batch, then the
    second): per stage, features unit-normalised over channels, squared differences summed over channels and averaged
    over space (or, given ``quantile``, that quantile over space); the stages summed (LPIPS without its learned
    weights). The autoencoder's "perceptual" ``reconstruction_error`` and its training loss
    (``train.losses.PerceptualDistance``) both use it with the mean; "perceptual_deep" with a quantile."""
    total = 0
    for stage in stages:
        a, b = F.normalize(stage, dim=1, eps=1e-10).chunk(2)
        per_position = (a - b).pow(2).sum(1).flatten(1)
        total = total + (per_position.mean(1) if quantile is None else per_position.quantile(quantile, dim=1))
    return total


ERROR_DENSITY_STAGES = 4  # the encoder's first feature stages whose errors "perceptual_mahalanobis" models
ERROR_LOG_FLOOR = 1e-8  # added before the log: a perfect reconstruction has zero error in every channel


def perceptual_error_vector(stages) -> torch.Tensor:
    """[B, C1 + C2 + ...] what a reconstruction got wrong, channel by channel, from feature stages as
    ``perceptual_distance`` takes them (each [2B, C, h, w], the reconstructions then the targets): per stage and
    channel, the squared difference of the raw features averaged over space, then its log (the errors span decades;
    the log makes them about Gaussian)."""
    parts = []
    for stage in stages:
        a, b = stage.float().chunk(2)
        parts.append((a - b).pow(2).mean((2, 3)))
    return torch.log(torch.cat(parts, 1) + ERROR_LOG_FLOOR)


def precision_whitener(covariance: torch.Tensor) -> torch.Tensor:
    """The lower-triangular W (float64) with W W^T = covariance^-1: the Cholesky factor of the symmetrised precision,
    so that ||(x - mean) @ W|| is the Mahalanobis distance. Shared by the domain gate and the reconstruction error
    density (both fit one Gaussian and store its whitener)."""
    precision = torch.linalg.inv(covariance.double())
    return torch.linalg.cholesky((precision + precision.T) / 2)


class ReconstructionErrorDensity(nn.Module):
    """How unlike its training images' errors an image's reconstruction error is (``reconstruction_metric``
    "perceptual_mahalanobis"): the Mahalanobis distance of ``perceptual_error_vector`` to one Gaussian (Ledoit-Wolf
    covariance) fitted on the detector's reconstructions of its training images.

    One number (the mean error) cannot tell "an image with a different kind of detail" from "a hard training image"; the
    pattern over channels can: measured on the robust 64 px MobileNetV2 autoencoder, wild vs CIFAKE test AUROC 0.996
    against 0.907 for the mean ("perceptual"). The statistics are buffers written by
    ``train.reconstruction_density.fit_reconstruction_density``; ``fitted_on`` is 0 until then and an unfitted density
    refuses to score."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whitener", torch.zeros(dim, dim))  # W with precision P = W W^T
        self.register_buffer("fitted_on", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor, covariance: torch.Tensor) -> ReconstructionErrorDensity:
        """Store the mean of ``vectors`` [N, D] and the whitening factor of ``covariance`` [D, D] (estimated by the
        caller on the same vectors, e.g. scikit-learn's Ledoit-Wolf)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.mean.shape[0] or len(vectors) < 2:
            raise ValueError(f"ReconstructionErrorDensity.fit: need [N >= 2, {self.mean.shape[0]}] error vectors, "
                             f"got {list(vectors.shape)}")
        check_finite("the reconstruction error vectors", vectors)
        self.mean.copy_(vectors.double().mean(0).to(self.mean.dtype))
        self.whitener.copy_(precision_whitener(covariance).to(self.whitener.dtype))
        self.fitted_on.fill_(len(vectors))
        return self

    def distance(self, vectors: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [B] of error vectors [B, D] to the training images' errors."""
        if int(self.fitted_on) <= 0:
            raise ValueError("the reconstruction error density holds no training statistics (fitted_on = 0): fit it "
                             "(train.reconstruction_density.fit_reconstruction_density) before scoring")
        check_finite("the reconstruction error vectors", vectors)
        return ((vectors.to(self.mean.dtype) - self.mean) @ self.whitener).pow(2).sum(-1).sqrt()


class ConvDecoder(nn.Module):
    """BatchNorm decoder of an autoencoder detector: the encoder's last feature map [B, C, h, w] back to an image
    [B, out_channels, S, S] with values in [0, 1].

    A 1x1 conv takes C to ``widths[0]``; each width then doubles the side with a 4x4 stride-2 transposed conv,
    BatchNorm and ReLU; a bilinear resize meets S exactly where the doublings do not; a 3x3 conv and a sigmoid give
    the pixels. Widths that halve as the side doubles keep every stage's cost alike, so the decoder stays a fraction of
    the encoder (it runs once per image, never per Monte Carlo sample).
    """

    def __init__(self, in_channels: int, widths: list[int], out_channels: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        layers = [nn.Conv2d(in_channels, widths[0], 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for cin, cout in zip([widths[0], *widths[:-1]], widths):
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        self.stages = nn.Sequential(*layers)
        self.out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.stages(feature_map)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(x))


class ClassifierHead(nn.Module):
    """MLP head (features -> hidden... -> 2). Dropout precedes every linear layer.

    Dropout is on in training, and at inference only when sampling an ``mc_dropout`` head: nothing else in the model
    changes mode, so BatchNorm keeps its running statistics.
    """

    def __init__(self, config: BayesFakeConfig, in_features: int):
        super().__init__()
        self.mc_dropout = config.head == "mc_dropout"
        bayesian = config.head == "variational"
        sizes = [in_features, *config.head_hidden, 2]
        self.dropout = config.dropout if config.head != "variational" else 0.0
        self.layers = nn.ModuleList(make_linear(config, sizes[i], sizes[i + 1], bayesian) for i in range(len(sizes) - 1))

    def forward(self, x: torch.Tensor, num_samples: int = 1, stochastic: bool = False,
                shared: bool = False) -> torch.Tensor:
        """Logits [B*T, 2] (image-major) of ``x`` [B*T, D]; or of ``x`` [B, D] shared by the T samples when ``shared``
        (eval mode), which gives the same numbers without first copying every image's features T times."""
        drop = self.dropout > 0 and (self.training or (stochastic and self.mc_dropout))
        t = num_samples
        if shared and (self.training or t == 1):
            x, shared = x.repeat_interleave(t, 0), False
        for i, layer in enumerate(self.layers):
            if drop and shared and not isinstance(layer, BAYES_LAYERS):
                # The T masks broadcast over the images, and the layer runs on a few samples' rows at a time (blocks
                # of about 4 MB stay in cache; the [B*T, D] copy of the features is never written): same numbers.
                b, d = x.shape
                keep = dropout_masks(t, x, self.dropout)
                step = max(1, (1 << 20) // max(1, b * d))
                blocks = [layer((x.unsqueeze(1) * keep[s:s + step]).reshape(-1, d)) for s in range(0, t, step)]
                x = torch.cat([block.reshape(b, -1, block.shape[-1]) for block in blocks], 1).reshape(b * t, -1)
                shared = False
                if i < len(self.layers) - 1:
                    x = F.relu(x)
                continue
            if drop and self.training:
                x = F.dropout(x, self.dropout, training=True)
            elif drop and shared:  # a variational layer after dropout: the T masks broadcast over the images
                x = (x.unsqueeze(1) * dropout_masks(t, x, self.dropout)).reshape(-1, x.shape[-1])
                shared = False
            elif drop:
                x = shared_dropout(x, self.dropout, num_samples)
            if shared:  # no dropout here: every sample's first layer sees the same features
                if stochastic and isinstance(layer, BAYES_LINEAR):
                    weight, bias = sample_weights(layer, t, x.dtype)
                    x = torch.einsum("bi,toi->bto", x, weight)
                    x = (x if bias is None else x + bias).reshape(-1, x.shape[-1])
                else:
                    x = apply_layer(layer, x, 1, stochastic)
                    x = x.unsqueeze(1).expand(x.shape[0], t, x.shape[-1]).reshape(-1, x.shape[-1])
                shared = False
            else:
                x = apply_layer(layer, x, num_samples, stochastic)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def draw_samples(self, num_samples: int, dtype: torch.dtype | None = None) -> list:
        """T weight samples of every variational layer (None for a plain one), in the order ``forward`` draws them."""
        return [sample_weights(layer, num_samples, dtype) if isinstance(layer, BAYES_LINEAR) else None
                for layer in self.layers]

    def sample_pass(self, x: torch.Tensor, draws: list, index: int) -> torch.Tensor:
        """Logits [B, 2] of features ``x`` [B, D] under weight sample ``index`` of ``draws`` (no dropout: a variational
        head has none)."""
        for i, (layer, drawn) in enumerate(zip(self.layers, draws)):
            if drawn is None:
                x = apply_layer(layer, x, 1, False)
            else:
                weight, bias = drawn
                x = F.linear(x, weight[index], None if bias is None else bias[index])
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class GaussianNBHead(nn.Module):
    """Gaussian Naive Bayes on the backbone features: log p(c) + sum_d log N(x_d | theta_cd, var_cd), per class c.

    The generative baseline, expressed in torch so it ships, loads and samples like every other head. Its statistics
    are buffers fitted in closed form (``fit``, the same estimator as scikit-learn's GaussianNB); the logits it returns
    are the log joint, so their softmax is exactly the Naive Bayes posterior.
    """

    def __init__(self, config: BayesFakeConfig, in_features: int):
        super().__init__()
        self.register_buffer("theta", torch.zeros(2, in_features))
        self.register_buffer("var", torch.ones(2, in_features))
        self.register_buffer("log_prior", torch.full((2,), -math.log(2.0)))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, var_smoothing: float = 1e-9) -> GaussianNBHead:
        """Per-class mean and variance of ``features`` [N, D]; like scikit-learn, every variance gets
        ``var_smoothing`` times the largest feature variance added, so no feature divides by zero."""
        features = features.to(self.theta.device, torch.float64)
        labels = labels.to(self.theta.device)
        epsilon = var_smoothing * features.var(0, unbiased=False).max()
        for c in (0, 1):
            rows = features[labels == c]
            if len(rows) == 0:
                raise ValueError(f"GaussianNBHead.fit: no training example of class {c}")
            self.theta[c] = rows.mean(0).to(self.theta.dtype)
            self.var[c] = (rows.var(0, unbiased=False) + epsilon).to(self.var.dtype)
            self.log_prior[c] = math.log(len(rows) / len(features))
        return self

    def forward(self, x: torch.Tensor, num_samples: int = 1, stochastic: bool = False) -> torch.Tensor:
        x = x.unsqueeze(1)  # [N, 1, D] against [2, D]
        log_likelihood = -0.5 * (torch.log(2 * math.pi * self.var) + (x - self.theta) ** 2 / self.var).sum(-1)
        return log_likelihood + self.log_prior


def make_head(config: BayesFakeConfig, in_features: int) -> nn.Module:
    return GaussianNBHead(config, in_features) if config.head == "gaussian_nb" else ClassifierHead(config, in_features)


# Column block of the domain gate's triangular whitening product (DomainGate.whitener_blocks).
WHITENER_BLOCK = 256


class DomainGate(nn.Module):
    """How unlike the training data an image is: the Mahalanobis distance of its features to the nearer of two
    Gaussians (one per class, Ledoit-Wolf covariance) fitted on the training set, as in DDU (Mukhoti et al., 2023).

    A classifier's confidence says nothing about inputs unlike anything it saw (a CIFAKE detector is *more* sure on
    real phone photos than on CIFAKE); a density of the training features does. The features are the detector's own
    (``config.domain_gate == "features"``) when they carry that signal, else those of a small frozen ImageNet model
    shipped in the release (``extractor``, fed ``config.domain_image_size`` px). The statistics are buffers, written
    by ``train.domain.fit_domain_gate``; ``fitted_on`` (the number of training images) is 0 until then, and an
    unfitted gate refuses to score rather than call everything in domain.
    """

    def __init__(self, config: BayesFakeConfig, own_features: int):
        super().__init__()
        self.config = config
        if config.domain_gate == DOMAIN_OWN_FEATURES:
            self.extractor = None
            dim = own_features
        else:
            import timm  # only gates with their own extractor need it

            self.extractor = timm.create_model(config.domain_gate, pretrained=False, num_classes=0)
            # Width of the pooled output: some timm models (MobileNetV3) add a head layer after `num_features`.
            dim = getattr(self.extractor, "head_hidden_size", None) or self.extractor.num_features
        self.register_buffer("means", torch.zeros(2, dim))
        # Per class, a factor W of the precision matrix (P = W W^T): the squared distance is |(x - mean) W|^2.
        self.register_buffer("whiteners", torch.zeros(2, dim, dim))
        self.register_buffer("fitted_on", torch.zeros((), dtype=torch.long))

    @property
    def feature_dim(self) -> int:
        return self.means.shape[1]

    def extractor_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The detector's normalised pixels re-expressed as the extractor expects them: same image, its size and
        normalisation (bicubic up, antialiased down)."""
        cfg = self.config
        shape = (1, 3, 1, 1)
        mean, std = (torch.tensor(v, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
                     for v in (cfg.image_mean, cfg.image_std))
        x = pixel_values * std + mean
        size = cfg.domain_image_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > size).clamp(0.0, 1.0)
        d_mean, d_std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(shape)
                         for v in (cfg.domain_image_mean, cfg.domain_image_std))
        return (x - d_mean) / d_std

    def features(self, domain_pixel_values: torch.Tensor) -> torch.Tensor:
        """The extractor's pooled features [B, D] of its own input: ``domain_pixel_values`` as the image processor
        makes them (or ``extractor_input(pixel_values)``)."""
        if self.extractor is None:
            raise ValueError("this domain gate reads the detector's own backbone features, not pixels")
        x = domain_pixel_values
        if not self.training:
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's faster layout on CPU, as TimmBackbone
        return self.extractor(x)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Features as the Gaussians model them: L2-normalised. Measured on CIFAKE vs wild with frozen Lite0 features:
        the raw features separate them at AUROC 0.989, normalised at 0.999 (their direction, not their norm, says
        what the image is)."""
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, covariances: torch.Tensor) -> DomainGate:
        """Store per-class means of ``features`` [N, D] (already ``prepare``d) and the whitening factors of
        ``covariances`` [2, D, D] (estimated by the caller on the same features, e.g. scikit-learn's Ledoit-Wolf)."""
        features, labels = features.double(), labels.long()
        for c in (0, 1):
            rows = features[labels == c]
            if len(rows) < 2:
                raise ValueError(f"DomainGate.fit: need at least 2 training examples of class {c}")
            self.means[c] = rows.mean(0).to(self.means.dtype)
            self.whiteners[c] = precision_whitener(covariances[c]).to(self.whiteners.dtype)
        self.fitted_on.fill_(len(features))
        return self

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [B] of ``features`` [B, D] to the nearer class Gaussian."""
        if int(self.fitted_on) <= 0:
            raise ValueError("the domain gate holds no training statistics (fitted_on = 0): this release is missing "
                             "its domain statistics, so it cannot tell whether an image is like its training data")
        check_finite("the domain gate's features", features)
        diff = (self.prepare(features).to(self.means.dtype).unsqueeze(1) - self.means).transpose(0, 1)  # [2, B, D]
        blocks = self.whitener_blocks()
        if blocks is None:
            squared = torch.bmm(diff, self.whiteners).pow(2).sum(-1)
        else:
            squared = diff.new_zeros(diff.shape[:2])
            for start, block in blocks:
                squared += torch.bmm(diff[:, :, start:], block).pow(2).sum(-1)
        return squared.min(0).values.sqrt()

    def whitener_blocks(self) -> list[tuple[int, torch.Tensor]] | None:
        """The whiteners' non-zero column blocks, when they are lower-triangular (``fit`` stores Cholesky factors), else
        None. Output columns ``start:start + WHITENER_BLOCK`` of ``diff @ W`` read only rows ``start:`` of W, so the
        product costs 15/25 of the full one at D = 1280 (measured 0.62x its time, 1 thread, batch 256). Cached per
        version of the buffer: loading weights or moving devices rebuilds it."""
        whiteners = self.whiteners
        key = (whiteners.data_ptr(), whiteners._version, whiteners.device, whiteners.dtype)
        if getattr(self, "_blocks_key", None) != key:
            dim = whiteners.shape[-1]
            lower = dim > WHITENER_BLOCK and not torch.triu(whiteners, diagonal=1).any()
            self._blocks = [(start, whiteners[:, start:, start:start + WHITENER_BLOCK].contiguous())
                            for start in range(0, dim, WHITENER_BLOCK)] if lower else None
            self._blocks_key = key
        return self._blocks


# ----------------------------------------------------------------------------------------------------------------------
# The Hub model


@contextlib.contextmanager
def sampling_rng(seed: int | None, generator: torch.Generator | None, device: torch.device):
    """Make every random draw inside repeatable: fork the RNG of ``device`` and seed it from ``seed`` or ``generator``."""
    if seed is None and generator is None:
        yield
        return
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def check_finite(what: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or infinity: such a number is an error, never a verdict."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{what} holds {bad} NaN or infinite value(s) of {tensor.numel()}: no verdict can be given")


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def verdict_entropy(p_fake: torch.Tensor, threshold: float) -> torch.Tensor:
    """How near the mean P(FAKE) ``p_fake`` [B] is to flipping the verdict at ``threshold``, in nats: the binary
    entropy of q = sigmoid(logit(p_fake) - logit(threshold)), P(FAKE) re-centred so the threshold sits at 1/2. It is
    ln 2 at the threshold and falls to 0 away from it on either side, as the predictive entropy does around 1/2 (the
    two are one at threshold 0.5). Why: with a threshold of 0.8, p = 0.85 is a FAKE verdict 0.05 from flipping, yet
    its predictive entropy (0.42 nats) ranks it surer than p = 0.3, a REAL verdict 0.5 away (0.61 nats)."""
    p = p_fake.double().clamp(1e-12, 1 - 1e-12)
    q = torch.sigmoid(torch.logit(p) - math.log(threshold / (1 - threshold)))
    return entropy(torch.stack([1 - q, q], dim=-1)).to(p_fake.dtype)


class BayesFakePreTrainedModel(PreTrainedModel):
    config_class = BayesFakeConfig
    base_model_prefix = "bayesfake"
    main_input_name = "pixel_values"
    _no_split_modules = ["ScratchCNN", "TimmBackbone", "ClassifierHead", "GaussianNBHead", "DomainGate", "ConvDecoder"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # PreTrainedModel's default normal(0.02) cripples ReLU conv nets trained from scratch: use He init instead.
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, BAYES_LAYERS):
            self._init_bayesian(module)

    def _init_bayesian(self, layer: nn.Module) -> None:
        # The priors are non-persistent buffers, never in the checkpoint: transformers 5 allocates them with
        # torch.empty_like on load, so they must be filled here from the config or the KL comes back as garbage.
        cfg = self.config
        for name in ("prior_weight_mu", "prior_bias_mu"):
            if getattr(layer, name, None) is not None:
                getattr(layer, name).fill_(cfg.prior_mu)
        for name in ("prior_weight_sigma", "prior_bias_sigma"):
            if getattr(layer, name, None) is not None:
                getattr(layer, name).fill_(cfg.prior_sigma)
        mu_w, rho_w, mu_b, rho_b = _layer_params(layer)
        init.kaiming_normal_(mu_w, mode="fan_in", nonlinearity="relu")
        init.normal_(rho_w, mean=cfg.posterior_rho_init, std=0.1)
        if mu_b is not None:
            init.zeros_(mu_b)
            init.normal_(rho_b, mean=cfg.posterior_rho_init, std=0.1)


class BayesFakeDetector(BayesFakePreTrainedModel):
    """REAL/FAKE detector with Monte Carlo uncertainty; see the module docstring for the inference contract."""

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained``, refusing a weights file that does not match the architecture.

        transformers only reports missing tensors ("newly initialized") and unexpected ones; a detector served with a
        random layer gives confident nonsense, so any missing, unexpected or mis-shaped tensor, and any NaN or
        infinite weight, is a ``ValueError`` here.
        """
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: sorted(str(k) for k in value) for key, value in problems.items() if value}
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            listed = "; ".join(f"{key.replace('_', ' ')}: {', '.join(value[:8])}" + (" ..." if len(value) > 8 else "")
                               for key, value in problems.items())
            raise ValueError(f"{where}: the weights do not match this detector's architecture ({listed})")
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                check_finite(f"weight {name}", tensor)
        if model.config.int8_backbone:
            model.backbone.build_int8()
        return (model, info) if output_loading_info else model

    def __init__(self, config: BayesFakeConfig):
        super().__init__(config)
        self.backbone_stochastic = config.head == "variational" and config.variational_scope == "all"
        if config.backbone == SCRATCH_CNN:
            self.backbone = ScratchCNN(config, bayesian=self.backbone_stochastic)
        else:
            self.backbone = TimmBackbone(config)
        self.head = make_head(config, self.backbone.num_features)
        self.decoder = None
        if config.decoder_widths:  # an autoencoder detector: the decoder rebuilds the image from the encoder's map
            self.decoder = ConvDecoder(self.backbone.num_features, config.decoder_widths,
                                       1 if config.greyscale else 3, config.image_size)
        self.domain_gate = DomainGate(config, self.backbone.num_features) if config.domain_gate else None
        self.reconstruction_density = None
        if config.reconstruction_metric == "perceptual_mahalanobis":
            self.reconstruction_density = ReconstructionErrorDensity(self.error_vector_dim())
        self._warned_domain_input = False
        if self.domain_gate is not None and self.domain_gate.extractor is None and self.backbone_stochastic:
            raise ValueError("domain_gate='features' needs a deterministic backbone; every layer of this one is "
                             "sampled: give the gate its own extractor (a timm model name)")
        self.post_init()

    def bayesian_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, BAYES_LAYERS)]

    def kl_divergence(self) -> torch.Tensor:
        """Sum over every variational weight of KL(posterior || prior); 0 for models without one."""
        layers = self.bayesian_layers()
        if not layers:
            return torch.zeros((), device=self.device)
        return torch.stack([gaussian_kl(layer) for layer in layers]).sum()

    def sample_features(self, pixel_values: torch.Tensor, num_samples: int, stochastic: bool = True) -> torch.Tensor:
        """Backbone features: [B, D] from one pass per image, or [B*T, D] (image-major) when every layer is sampled."""
        if self.decoder is not None:
            return self.backbone(self.encoder_input(pixel_values))
        if self.backbone_stochastic and stochastic:
            b, t = pixel_values.shape[0], num_samples
            x = pixel_values.unsqueeze(1).expand(b, t, *pixel_values.shape[1:]).reshape(b * t, *pixel_values.shape[1:])
            return self.backbone(x, t, stochastic)
        return self.backbone(pixel_values, 1, stochastic)

    # ------------------------------------------------------------------------------------------------------------------
    # Autoencoder detectors (config.decoder_widths): the encoder runs once, the decoder once, only the head is sampled.

    def _pixel_range(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, 3, 1, 1)
        return tuple(torch.tensor(v, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
                     for v in (self.config.image_mean, self.config.image_std))

    def reconstruction_target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the decoder rebuilds: the image in [0, 1] (the processor's normalisation undone), [B, 3, S, S], or its
        luminance [B, 1, S, S] for a greyscale detector."""
        mean, std = self._pixel_range(pixel_values)
        image = (pixel_values * std + mean).clamp(0.0, 1.0)
        if self.config.greyscale:
            image = (image * image.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return image

    def encoder_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixels the encoder sees: ``pixel_values`` itself, or for a greyscale detector its luminance replicated to
        three channels and normalised again."""
        if not self.config.greyscale:
            return pixel_values
        mean, std = self._pixel_range(pixel_values)
        return (self.reconstruction_target(pixel_values).expand(-1, 3, -1, -1) - mean) / std

    def autoencode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder and one decoder pass: pooled features [B, D] for the head, the reconstruction and its target
        (``reconstruction_target``), both [B, C, S, S] in [0, 1]."""
        if self.decoder is None:
            raise ValueError("this detector has no decoder (config.decoder_widths is empty): nothing to reconstruct")
        feature_map = self.backbone.feature_map(self.encoder_input(pixel_values))
        features = self.backbone.pool(feature_map)
        return features, self.decoder(feature_map), self.reconstruction_target(pixel_values)

    @torch.no_grad()
    def reconstruct(self, pixel_values: torch.Tensor) -> dict:
        """The image an autoencoder detector rebuilds from its own features, for display: ``reconstruction`` and
        ``target`` [B, C, S, S] in [0, 1] (C = 1 for a greyscale detector), ``error_map`` [B, S, S] (absolute error,
        mean over channels) and ``reconstruction_error`` [B] (its mean, as the forward pass reports it)."""
        self.check_pixel_values(pixel_values)
        param = next(self.parameters())
        _, reconstruction, target = self.autoencode(pixel_values.to(device=param.device, dtype=param.dtype))
        return {"reconstruction": reconstruction, "target": target, "error_map": (reconstruction - target).abs().mean(1),
                "reconstruction_error": self.reconstruction_score(reconstruction, target)}

    @torch.no_grad()
    def reconstruction_score(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``reconstruction_error`` [B] as ``config.reconstruction_metric`` defines it: "l1", mean |r - t|;
        "highpass", mean |HP(r) - HP(t)| with HP = ``highpass_residual``; "perceptual", over the encoder's first
        ``PERCEPTUAL_STAGES`` feature stages, features unit-normalised over channels, squared differences summed over
        channels, averaged over space, summed over the stages (train.losses.PerceptualDistance's formula, on the
        detector's own encoder: one pass of its early stages over both images); "perceptual_deep", the same on its
        stages ``DEEP_PERCEPTUAL_STAGES`` pooled over space by the ``DEEP_PERCEPTUAL_QUANTILE`` quantile instead of
        the mean; "perceptual_mahalanobis", the
        Mahalanobis distance of ``reconstruction_error_vector`` (per channel of the encoder's first
        ``ERROR_DENSITY_STAGES`` stages, the log mean squared feature error) to the training images' errors
        (``ReconstructionErrorDensity``)."""
        metric = self.config.reconstruction_metric
        if metric == "l1":
            return reconstruction_error(reconstruction, target)
        if metric == "highpass":
            return reconstruction_error(highpass_residual(reconstruction), highpass_residual(target))
        if metric == "perceptual_mahalanobis":
            if self.reconstruction_density is None:
                raise ValueError("reconstruction_metric 'perceptual_mahalanobis' needs the fitted error density "
                                 "(train.reconstruction_density.fit_reconstruction_density); this model has none")
            return self.reconstruction_density.distance(self.reconstruction_error_vector(reconstruction, target))
        if metric == "perceptual_deep":
            stages = self.encoder_stages(reconstruction, target, list(DEEP_PERCEPTUAL_STAGES))
            return perceptual_distance((stage.float() for stage in stages), quantile=DEEP_PERCEPTUAL_QUANTILE)
        stages = self.encoder_stages(reconstruction, target, list(range(PERCEPTUAL_STAGES)))
        return perceptual_distance(stage.float() for stage in stages)

    def encoder_stages(self, reconstruction: torch.Tensor, target: torch.Tensor,
                       indices: list[int]) -> list[torch.Tensor]:
        """The encoder's feature stages ``indices`` of the reconstructions and the targets in one pass, each
        [2B, C, h, w] (reconstructions first), as ``perceptual_distance`` and ``perceptual_error_vector`` take them."""
        if self.config.backbone == SCRATCH_CNN:
            raise ValueError("the perceptual reconstruction errors read a timm encoder's feature stages; this detector "
                             "has the from-scratch CNN")
        mean, std = self._pixel_range(target)
        pair = (torch.cat([reconstruction, target]).expand(-1, 3, -1, -1) - mean) / std
        if not self.training:  # as TimmBackbone runs the encoder: its early stages dominate this cost on CPU
            pair = pair.contiguous(memory_format=torch.channels_last)
        return self.backbone.model.forward_intermediates(pair, indices=indices, stop_early=True,
                                                         intermediates_only=True)

    def reconstruction_error_vector(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``perceptual_error_vector`` [B, D] of the encoder's first ``ERROR_DENSITY_STAGES`` stages: what the
        "perceptual_mahalanobis" density models (and is fitted on)."""
        return perceptual_error_vector(self.encoder_stages(reconstruction, target, list(range(ERROR_DENSITY_STAGES))))

    def error_vector_dim(self) -> int:
        """D of ``reconstruction_error_vector``: the channels of the encoder's first ``ERROR_DENSITY_STAGES`` stages."""
        if self.config.backbone == SCRATCH_CNN or self.decoder is None:
            raise ValueError("reconstruction_metric 'perceptual_mahalanobis' is for an autoencoder detector on a timm "
                             "encoder (config.decoder_widths set, a timm backbone)")
        info = self.backbone.model.feature_info
        if len(info) < ERROR_DENSITY_STAGES:
            raise ValueError(f"the encoder {self.config.backbone} has {len(info)} feature stages; "
                             f"'perceptual_mahalanobis' reads {ERROR_DENSITY_STAGES}")
        return sum(stage["num_chs"] for stage in info[:ERROR_DENSITY_STAGES])

    def sample_head_logits(self, features: torch.Tensor, batch: int, num_samples: int,
                           stochastic: bool = True) -> torch.Tensor:
        """Logits [T, B, 2] of the head on ``features`` ([B, D] shared by the T samples, or [B*T, D])."""
        t = num_samples
        if features.shape[0] == batch and isinstance(self.head, ClassifierHead):
            logits = self.head(features, t, stochastic, shared=True)
        else:
            if features.shape[0] == batch:
                features = features.unsqueeze(1).expand(batch, t, features.shape[-1]).reshape(batch * t, -1)
            logits = self.head(features, t, stochastic)
        return logits.reshape(batch, t, -1).transpose(0, 1)

    def sample_logits(self, pixel_values: torch.Tensor, num_samples: int, stochastic: bool = True) -> torch.Tensor:
        """Logits of T Monte Carlo samples, [T, B, 2]; the deterministic trunk runs once per image."""
        features = self.sample_features(pixel_values, num_samples, stochastic)
        return self.sample_head_logits(features, pixel_values.shape[0], num_samples, stochastic)

    def _num_samples(self, num_samples: int | None) -> int:
        t = self.config.num_samples if num_samples is None else num_samples
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"num_samples must be an integer >= 1; got {t!r}")
        return t

    def check_pixel_values(self, pixel_values) -> None:
        """Raise ``ValueError`` saying what is wrong unless ``pixel_values`` is what the image processor makes:
        a non-empty float tensor [B, 3, S, S] with S = ``config.image_size``, every value finite; for a multi-view
        detector (``config.num_views`` K > 1) [B, K, 3, S, S]."""
        size = self.config.image_size
        views = self.config.num_views
        expected = f"a float tensor [B, 3, {size}, {size}] from the detector's image processor" if views == 1 else \
            f"a float tensor [B, {views}, 3, {size}, {size}] ({views} views per image) from the detector's image processor"
        if not torch.is_tensor(pixel_values):
            raise ValueError(f"pixel_values must be {expected}; got {type(pixel_values).__name__}")
        if views > 1 and (pixel_values.dim() != 5 or pixel_values.shape[1] != views):
            raise ValueError(f"pixel_values must be {expected}; got shape {tuple(pixel_values.shape)}")
        if views > 1:  # the per-view checks below read the views of all images as one batch
            pixel_values = pixel_values.flatten(0, 1)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be {expected}; got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be {expected}; got dtype {pixel_values.dtype} (uint8 images must go "
                             "through the image processor, which scales and normalises them)")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch: no image to judge")
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(f"pixel_values must be {size}x{size} (config.image_size); got "
                             f"{pixel_values.shape[2]}x{pixel_values.shape[3]}: let the image processor resize them")
        check_finite("pixel_values", pixel_values)

    def forward(
        self,
        pixel_values: torch.Tensor,
        num_samples: int | None = None,
        labels: torch.Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        stochastic: bool = True,
        return_dict: bool | None = None,
        adaptive: bool = False,
        domain_pixel_values: torch.Tensor | None = None,
        domain_features: torch.Tensor | None = None,
    ) -> BayesFakeOutput:
        """Monte Carlo predictive over ``num_samples`` (default ``config.num_samples``) samples.

        Args:
            pixel_values: [B, 3, H, W] float images, normalised as the image processor does.
            num_samples: T; with a deterministic head (or ``stochastic=False``) one pass is computed and repeated.
            labels: optional [B] class ids; then ``loss`` is the NLL of the mean predictive.
            seed / generator: make the sampling repeatable (the global RNG is left untouched). With neither, an
                eval-mode model samples with ``config.sampling_seed`` (so ``pipeline()`` is repeatable); set that to
                None for fresh draws from the global RNG. In training mode the global RNG is used.
            stochastic: False gives the mean-field deterministic pass (dropout off, posterior mean weights).
            adaptive: opt-in sequential sampling (eval mode): samples are drawn in rounds and an image stops once its
                verdict is settled (``adaptive_settled``), up to ``num_samples``. The samples are the first ones of the
                fixed-T call with the same seed (same draws), so an image that needs all T gets exactly the fixed
                answer. The output adds ``num_samples_used`` [B]; ``sample_probs`` rows past an image's count are NaN
                and every statistic is over its used samples. Only an all-layer variational model saves compute (its
                samples are full passes); a head-only model computes the T cheap samples and stops on the same rule.
            domain_pixel_values: for a detector whose domain gate has its own extractor, the image processor's
                second output (the image resized from the original to ``config.domain_image_size``). Without it the
                gate sees ``pixel_values`` upsampled, which cannot tell a photo shrunk to the detector's size from its
                training images: pass it (the processor and ``pipeline`` do).
            domain_features: instead of ``domain_pixel_values``, the gate extractor's features [B, D] of them,
                computed beforehand (``model.domain_gate.features``; a cache shared by detectors that ship the same
                extractor, as evaluation and scoring at scale use).
        With a domain gate (eval mode) the output adds ``domain_score`` [B] and ``in_domain`` [B].
        Unknown keyword arguments raise ``TypeError`` (a misspelt ``num_sample=`` must not silently run the default).
        Any image gives the same answer alone or in any batch, for a given seed and T (adaptive too).
        """
        self.check_pixel_values(pixel_values)
        gate = None if self.training else self.domain_gate
        for name, given in (("domain_pixel_values", domain_pixel_values), ("domain_features", domain_features)):
            if given is not None and (self.domain_gate is None or self.domain_gate.extractor is None):
                raise ValueError(f"{name} is only for a detector whose domain gate has its own extractor")
        if self.decoder is not None:
            return self._autoencoder_forward(pixel_values, num_samples, labels, seed, generator, stochastic, adaptive,
                                             domain_pixel_values, domain_features)
        if gate is not None and gate.extractor is None:
            # The gate reads the backbone's own features: one backbone pass serves the gate and the T head samples
            # (the backbone is deterministic here, so this equals the pixel path below).
            param = next(self.parameters())
            features = self.backbone(pixel_values.to(device=param.device, dtype=param.dtype))
            out = self._sampled_predictive(
                lambda f, t, sampled: self.sample_head_logits(f, f.shape[0], t, stochastic=sampled),
                features, num_samples, labels, seed, generator, stochastic, adaptive=adaptive)
            return self._apply_domain_gate(out, features)
        out = self._sampled_predictive(
            lambda x, t, sampled: self.sample_logits(x, t, stochastic=sampled),
            pixel_values, num_samples, labels, seed, generator, stochastic, adaptive=adaptive)
        if gate is not None:
            out = self._apply_domain_gate(out, self._extractor_features(pixel_values, domain_pixel_values,
                                                                        domain_features))
        return out

    def _autoencoder_forward(self, pixel_values, num_samples, labels, seed, generator, stochastic, adaptive,
                             domain_pixel_values, domain_features) -> BayesFakeOutput:
        """``forward`` of an autoencoder detector: one encoder and one decoder pass per image give the features, shared
        by the T head samples (and a domain gate on them), and the ``reconstruction_error``."""
        param = next(self.parameters())
        features, reconstruction, target = self.autoencode(pixel_values.to(device=param.device, dtype=param.dtype))
        out = self._sampled_predictive(
            lambda f, t, sampled: self.sample_head_logits(f, f.shape[0], t, stochastic=sampled),
            features, num_samples, labels, seed, generator, stochastic, adaptive=adaptive)
        out["reconstruction_error"] = self.reconstruction_score(reconstruction, target)
        gate = None if self.training else self.domain_gate
        if gate is not None:
            gate_features = features if gate.extractor is None else \
                self._extractor_features(pixel_values, domain_pixel_values, domain_features)
            out = self._apply_domain_gate(out, gate_features.detach())
        return out

    def _extractor_features(self, pixel_values: torch.Tensor, domain_pixel_values: torch.Tensor | None,
                            domain_features: torch.Tensor | None = None) -> torch.Tensor:
        """The domain gate's extractor features: ``domain_features`` as given (checked), else those of
        ``domain_pixel_values``, else of ``pixel_values`` upsampled."""
        gate = self.domain_gate
        param = next(self.parameters())
        if domain_features is not None:
            width, batch = gate.feature_dim, pixel_values.shape[0]
            if (not torch.is_tensor(domain_features) or domain_features.shape != (batch, width)
                    or not domain_features.is_floating_point()):
                shape = tuple(domain_features.shape) if torch.is_tensor(domain_features) else \
                    type(domain_features).__name__
                raise ValueError(f"domain_features must be a float tensor [{batch}, {width}] of the gate extractor's "
                                 f"features; got {shape}")
            return domain_features.to(gate.means.device)
        if domain_pixel_values is None:
            if not self._warned_domain_input:
                logger.warning("domain gate: no domain_pixel_values given, so it judges the %dpx pixel_values "
                               "upsampled; pass the image processor's domain_pixel_values for the full check",
                               self.config.image_size)
                self._warned_domain_input = True
            gate_input = gate.extractor_input(pixel_values.to(device=param.device, dtype=param.dtype))
        else:
            gate_input = self.check_domain_pixel_values(domain_pixel_values, pixel_values.shape[0])
        with torch.no_grad():
            return gate.features(gate_input.to(device=param.device, dtype=param.dtype))

    def check_domain_pixel_values(self, domain_pixel_values, batch: int) -> torch.Tensor:
        """``domain_pixel_values`` must be what the image processor makes for the gate: [B, 3, S, S] floats, finite."""
        size = self.config.domain_image_size
        if (not torch.is_tensor(domain_pixel_values) or not domain_pixel_values.is_floating_point()
                or tuple(domain_pixel_values.shape) != (batch, 3, size, size)):
            shape = tuple(domain_pixel_values.shape) if torch.is_tensor(domain_pixel_values) else \
                type(domain_pixel_values).__name__
            raise ValueError(f"domain_pixel_values must be a float tensor [{batch}, 3, {size}, {size}] from the "
                             f"detector's image processor; got {shape}")
        check_finite("domain_pixel_values", domain_pixel_values)
        return domain_pixel_values

    def _apply_domain_gate(self, out: BayesFakeOutput, gate_features: torch.Tensor) -> BayesFakeOutput:
        """Add ``domain_score`` (Mahalanobis distance to the training data) and ``in_domain`` to ``out``."""
        threshold = self.config.domain_threshold
        if threshold is None:
            raise ValueError("this detector has a domain gate but no config.domain_threshold: the release is missing "
                             "its domain statistics, so no verdict can be given")
        with torch.no_grad():
            score = self.domain_gate.distance(gate_features).float()
        out["domain_score"] = score
        out["in_domain"] = score <= threshold
        return out

    def forward_features(
        self,
        features: torch.Tensor,
        num_samples: int | None = None,
        labels: torch.Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        stochastic: bool = True,
    ) -> BayesFakeOutput:
        """The same predictive as ``forward``, from backbone features [B, D] computed beforehand (e.g. a feature
        cache): ``forward(x)`` equals ``forward_features(model.backbone(x))`` for the same seed. Not available when
        every layer is variational (the features then differ per sample). A domain gate on the detector's own
        features scores them here too; a gate with its own extractor needs pixels, so its fields stay None."""
        if self.backbone_stochastic:
            raise ValueError("forward_features: every layer of this model is sampled; call the model on pixels")
        width = self.backbone.num_features
        if (not torch.is_tensor(features) or features.dim() != 2 or features.shape[1] != width
                or not features.is_floating_point() or features.shape[0] == 0):
            shape = f"{tuple(features.shape)} {features.dtype}" if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"features must be a non-empty float tensor [B, {width}]; got {shape}")
        check_finite("features", features)
        out = self._sampled_predictive(
            lambda f, t, sampled: self.sample_head_logits(f, f.shape[0], t, stochastic=sampled),
            features, num_samples, labels, seed, generator, stochastic)
        gate = None if self.training else self.domain_gate
        if gate is not None and gate.extractor is None:
            out = self._apply_domain_gate(out, features.to(self.domain_gate.means.device))
        return out

    def _sampled_predictive(self, sample_logits, inputs: torch.Tensor, num_samples: int | None,
                            labels: torch.Tensor | None, seed: int | None, generator: torch.Generator | None,
                            stochastic: bool, adaptive: bool = False) -> BayesFakeOutput:
        """``sample_logits(inputs, T, sampled)`` on the model's device under the seeded sampling RNG; one draw (then
        repeated T times) when nothing is sampled."""
        t = self._num_samples(num_samples)
        param = next(self.parameters())
        inputs = inputs.to(device=param.device, dtype=param.dtype)
        sampled = stochastic and self.config.stochastic
        if adaptive and self.training:
            raise ValueError("adaptive=True is for inference: call model.eval() first")
        if seed is None and generator is None and not self.training:
            seed = self.config.sampling_seed
        with sampling_rng(seed, generator, param.device):
            if adaptive and sampled and t > 1:
                if self.backbone_stochastic:
                    sample_probs, used = self._adaptive_samples(self._lazy_sampler(inputs, t), inputs.shape[0], t)
                else:  # head-only: the T samples cost little; the same stopping rule, on their prefixes
                    logits = sample_logits(inputs, t, True)
                    sample_probs, used = self._adaptive_samples(lambda rows, lo, hi: logits[lo:hi, rows],
                                                                inputs.shape[0], t)
                return self._masked_predictive(sample_probs, used, labels)
            logits = sample_logits(inputs, t if sampled else 1, sampled)
        out = self._predictive(logits, t, labels)
        if adaptive:
            out["num_samples_used"] = torch.full((inputs.shape[0],), t, dtype=torch.long, device=out.probs.device)
        return out

    # ------------------------------------------------------------------------------------------------------------------
    # Adaptive sampling (opt-in): stop drawing for an image once its verdict is settled.

    def _lazy_sampler(self, pixel_values: torch.Tensor, t: int):
        """For an all-layer variational model: draw all T weight samples now (backbone then head, as a fixed-T call
        draws them), and return ``logits_of(rows, lo, hi)`` -> [hi - lo, len(rows), 2] computing only those passes."""
        backbone_draws = self.backbone.fold_samples(self.backbone.draw_samples(t, pixel_values.dtype))
        head_draws = self.head.draw_samples(t, pixel_values.dtype)

        def logits_of(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            x = pixel_values[rows]
            out = []
            for i in range(lo, hi):
                features = self.backbone.sample_pass(x, [(w[i], b[i]) for w, b in backbone_draws], folded=True)
                out.append(self.head.sample_pass(features, head_draws, i))
            return torch.stack(out)

        return logits_of

    def verdict_cut_points(self) -> list[float]:
        """The values of mean P(FAKE) where ``verdicts`` changes its answer: the threshold, and the two points where
        the reject score (``config.reject_score``) crosses ``reject_entropy`` (only those that separate two different
        verdicts)."""
        threshold, reject = self.config.threshold, self.config.reject_entropy
        # The reject score is the binary entropy of P(FAKE) shifted by ``centre`` in logit space.
        centre = 0.0 if self.config.reject_score == "predictive_entropy" else math.log(threshold / (1 - threshold))

        def score(p):
            q = 1 / (1 + math.exp(-(math.log(p / (1 - p)) - centre)))
            return -(q * math.log(q) + (1 - q) * math.log(1 - q))

        candidates = [threshold]
        if reject is not None and reject < math.log(2):
            lo, hi = 0.0, 0.5  # binary entropy rises on (0, 0.5): bisect for H(a) = reject
            for _ in range(60):
                mid = (lo + hi) / 2
                h = -(mid * math.log(mid) + (1 - mid) * math.log(1 - mid))
                lo, hi = (mid, hi) if h < reject else (lo, mid)
            candidates += [1 / (1 + math.exp(-(math.log(a / (1 - a)) + centre))) for a in (lo, 1 - lo)]

        def verdict(p):
            return 0 if reject is not None and score(p) > reject else (1 if p >= threshold else 2)

        return sorted(c for c in candidates if 1e-6 < c < 1 - 1e-6 and verdict(c - 1e-6) != verdict(c + 1e-6))

    def adaptive_settled(self, p_fake: torch.Tensor, t: int) -> torch.Tensor:
        """Which images' verdicts are settled after the first n samples ``p_fake`` [n, A] (P(FAKE) per sample) of T.

        The T-sample mean differs from the n-sample mean m by (T - n) / T times the mean of the T - n samples still
        to come minus m; with per-sample spread sigma that difference has standard deviation
        sigma * sqrt((T - n) / (T n)). An image is settled when every verdict cut point lies more than
        ``ADAPTIVE_Z`` such deviations from m (sigma: the sample standard deviation, at least ``ADAPTIVE_SD_FLOOR``,
        since a few samples can agree by chance), or when n = T.
        """
        n = p_fake.shape[0]
        if n >= t:
            return torch.ones(p_fake.shape[1], dtype=torch.bool, device=p_fake.device)
        mean = p_fake.mean(0)
        spread = p_fake.std(0) if n > 1 else torch.zeros_like(mean)
        deviation = spread.clamp_min(ADAPTIVE_SD_FLOOR) * math.sqrt((t - n) / (t * n))
        cuts = self.verdict_cut_points()
        if not cuts:
            return torch.ones_like(mean, dtype=torch.bool)
        margin = (mean.unsqueeze(0) - torch.tensor(cuts, dtype=mean.dtype, device=mean.device).unsqueeze(1)).abs()
        return margin.amin(0) > ADAPTIVE_Z * deviation

    def _adaptive_samples(self, logits_of, batch: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample probabilities [T, B, 2] (NaN where not drawn) and samples used [B]: ``ADAPTIVE_FIRST`` samples for
        every image, then ``ADAPTIVE_STEP`` more per round for the images not yet settled."""
        temperature = self.config.calibration_temperature
        sample_probs = None
        used = torch.zeros(batch, dtype=torch.long)
        active = torch.arange(batch)
        n = 0
        while active.numel() and n < t:
            hi = min(t, ADAPTIVE_FIRST if n == 0 else max(n + ADAPTIVE_STEP, math.ceil(n * ADAPTIVE_GROWTH)))
            probs = torch.softmax(logits_of(active.to(self.device), n, hi).float() / temperature, dim=-1)
            if sample_probs is None:
                sample_probs = torch.full((t, batch, 2), math.nan, device=probs.device)
            sample_probs[n:hi, active.to(probs.device)] = probs
            n = hi
            used[active] = n
            settled = self.adaptive_settled(sample_probs[:n, active.to(probs.device), 1], t).cpu()
            active = active[~settled]
        return sample_probs, used.to(sample_probs.device)

    def _masked_predictive(self, sample_probs: torch.Tensor, used: torch.Tensor,
                           labels: torch.Tensor | None) -> BayesFakeOutput:
        """The predictive of each image over its first ``used`` samples (rows past it are NaN in ``sample_probs``)."""
        t = sample_probs.shape[0]
        mask = (torch.arange(t, device=used.device).unsqueeze(1) < used.unsqueeze(0)).unsqueeze(-1)  # [T, B, 1]
        count = used.to(sample_probs.dtype).unsqueeze(-1)
        filled = torch.where(mask, sample_probs, torch.zeros_like(sample_probs))
        probs = filled.sum(0) / count
        std = (torch.where(mask, (sample_probs - probs) ** 2, torch.zeros_like(sample_probs)).sum(0) / count).sqrt()
        predictive_entropy = entropy(probs)
        expected_entropy = entropy(filled).sum(0) / count.squeeze(-1)
        mutual_information = (predictive_entropy - expected_entropy).clamp_min(0.0)
        check_finite("the detector's output (are its weights corrupt?)", probs)
        log_probs = torch.log(probs.clamp_min(1e-12))
        loss = None if labels is None else F.nll_loss(log_probs, labels.to(log_probs.device).long())
        kl = self.kl_divergence() if labels is not None and self.bayesian_layers() else None
        return BayesFakeOutput(loss=loss, logits=log_probs, probs=probs, sample_probs=sample_probs, std=std,
                               predictive_entropy=predictive_entropy,
                               verdict_entropy=verdict_entropy(probs[:, 1], self.config.threshold),
                               mutual_information=mutual_information,
                               expected_entropy=expected_entropy, kl=kl, num_samples_used=used)

    def _predictive(self, logits: torch.Tensor, t: int, labels: torch.Tensor | None) -> BayesFakeOutput:
        if logits.shape[0] == 1 and t > 1:
            logits = logits.expand(t, *logits.shape[1:])
        sample_probs = torch.softmax(logits.float() / self.config.calibration_temperature, dim=-1)
        probs = sample_probs.mean(0)
        predictive_entropy = entropy(probs)
        expected_entropy = entropy(sample_probs).mean(0)
        # MI >= 0 by Jensen; clamp the float round-off so callers can rely on it.
        mutual_information = (predictive_entropy - expected_entropy).clamp_min(0.0)
        if not self.training:  # a NaN compares false with every threshold: it would read as "likely real"
            check_finite("the detector's output (are its weights corrupt?)", probs)
        log_probs = torch.log(probs.clamp_min(1e-12))
        loss = None
        if labels is not None:
            loss = F.nll_loss(log_probs, labels.to(log_probs.device).long())
        kl = self.kl_divergence() if self.bayesian_layers() and (self.training or labels is not None) else None
        return BayesFakeOutput(
            loss=loss,
            logits=log_probs,
            probs=probs,
            sample_probs=sample_probs,
            std=sample_probs.std(0, unbiased=False),
            predictive_entropy=predictive_entropy,
            verdict_entropy=verdict_entropy(probs[:, 1], self.config.threshold),
            mutual_information=mutual_information,
            expected_entropy=expected_entropy,
            kl=kl,
        )

    def explain(self, pixel_values: torch.Tensor, num_samples: int | None = None, seed: int | None = 0,
                domain_pixel_values: torch.Tensor | None = None) -> dict:
        """Why the detector says what it says: gradients of the Monte Carlo P(FAKE) of each image.

        Returns a dict of tensors (no graph attached):
            ``saliency`` [B, H, W]: |d P(FAKE) / d pixel|, the largest over the colour channels (input-gradient map);
            ``feature_gradient`` [B, D]: d P(FAKE) / d feature, for each backbone feature;
            ``feature_importance`` [B, D]: |feature * gradient|, how much each feature moves P(FAKE) (gradient x input);
            ``p_fake`` [B]: the P(FAKE) that was differentiated;
            ``output``: the whole ``BayesFakeOutput`` of those samples, equal to ``model(pixel_values, num_samples,
            seed=seed)``, so a caller that wants the verdict and its reasons runs the detector once (with a domain
            gate, in eval mode, its ``domain_score`` and ``in_domain`` too; pass ``domain_pixel_values`` as to
            ``forward``).
        The T samples share one seeded draw (``seed``), so the map is repeatable; the backbone still runs once.
        """
        t = self._num_samples(num_samples)
        param = next(self.parameters())
        x = pixel_values.detach().to(device=param.device, dtype=param.dtype).requires_grad_(True)
        sampled = self.config.stochastic
        with torch.enable_grad(), sampling_rng(seed, None, param.device):
            features = self.sample_features(x, t if sampled else 1, stochastic=sampled)
            logits = self.sample_head_logits(features, x.shape[0], t if sampled else 1, stochastic=sampled)
            output = self._predictive(logits, t, None)
            p_fake = output.probs[:, 1]
            # Images are independent, so one gradient of the sum gives every image's own; autograd.grad (not
            # backward) leaves the parameters' .grad alone, so explaining never disturbs a training loop.
            pixel_grad, feature_grad = torch.autograd.grad(p_fake.sum(), [x, features])
        output = BayesFakeOutput(**{k: v.detach() for k, v in output.items()})
        gate = None if self.training else self.domain_gate
        if gate is not None:
            own = gate.extractor is None and not self.backbone_stochastic
            output = self._apply_domain_gate(output, features.detach() if own else
                                             self._extractor_features(x.detach(), domain_pixel_values))
        b = x.shape[0]
        feature_gradient = feature_grad.reshape(b, -1, features.shape[-1])
        attribution = (features.detach().reshape(b, -1, features.shape[-1]) * feature_gradient).abs()
        return {
            # the largest over the colour channels, and over the views of a multi-view detector ([B, K, 3, H, W])
            "saliency": pixel_grad.abs().flatten(1, -3).amax(dim=1),
            "feature_gradient": feature_gradient.sum(1),  # all-layer VI: summed over the per-sample features
            "feature_importance": attribution.sum(1),
            "p_fake": p_fake.detach(),
            "output": output,
        }

    # ------------------------------------------------------------------------------------------------------------------
    # int8 backbone (changes outputs by ~1e-2: a release in int8 is its own version, certified and golden in int8)

    def quantize_int8(self, calibration_pixel_values: torch.Tensor) -> BayesFakeDetector:
        """Run the from-scratch CNN backbone, at inference on CPU, as a statically quantized int8 network (PyTorch's
        x86 backend: fbgemm/oneDNN with VNNI), calibrated on ``calibration_pixel_values`` [N, 3, S, S] (a few hundred
        processed training images). About 4x the float backbone's speed on this CPU, with P(FAKE) moved by up to a
        few 1e-2, so verdicts near the threshold can change: a release made this way is a new version, evaluated and
        certified in int8. Sets ``config.int8_backbone`` and stores the calibrated observers as weights, so
        ``save_pretrained`` / ``from_pretrained`` rebuild the same int8 network. Only models whose backbone is
        deterministic (head-only sampling); ``explain``, training and CUDA keep the float weights; ``dequantize()``
        goes back. Returns the model."""
        if not isinstance(self.backbone, ScratchCNN) or self.backbone_stochastic:
            raise ValueError("quantize_int8: only the from-scratch CNN backbone of a head-only model can be quantized")
        self.check_pixel_values(calibration_pixel_values)
        self.backbone.build_int8(calibration_pixel_values)
        self.config.int8_backbone = True
        return self

    def dequantize(self) -> BayesFakeDetector:
        """Undo ``quantize_int8``: the float backbone again (and a float model when saved)."""
        if isinstance(self.backbone, ScratchCNN):
            self.backbone.__dict__.pop("_int8", None)
            self.backbone.int8_observers = None
        self.config.int8_backbone = False
        return self

    @property
    def is_quantized(self) -> bool:
        return self.backbone.__dict__.get("_int8") is not None

    @property
    def answers_anything(self) -> bool:
        """False when no reject rule could be certified for this detector (``config.abstention["certified"]`` is
        False): then it keeps its probabilities but sends every in-domain image to human review."""
        return not (self.config.abstention and self.config.abstention.get("certified") is False)

    def reject_scores(self, output: BayesFakeOutput) -> torch.Tensor:
        """[B] the score the reject rule compares with ``config.reject_entropy``: by ``config.reject_score``, the
        output's predictive entropy, or the verdict entropy of its mean P(FAKE) at this detector's threshold."""
        if self.config.reject_score == "predictive_entropy":
            return output.predictive_entropy
        return verdict_entropy(output.probs[:, 1], self.config.threshold)

    def verdicts(self, output: BayesFakeOutput) -> list[str]:
        """Plain-words verdict per image, one of ``VERDICTS``: "outside what this detector was trained on: no verdict"
        where the domain gate says the image is unlike the training data (``in_domain`` False), else "uncertain:
        needs human review" where the reject score is above the reject rule (``reject_scores``, ``config.reject_entropy``),
        else "likely AI-generated" / "likely real" from the threshold on P(FAKE)."""
        check_finite("output.probs", output.probs)
        check_finite("output.predictive_entropy", output.predictive_entropy)
        scores = self.reject_scores(output)
        in_domain = output.get("in_domain")
        if self.domain_gate is not None and in_domain is None:
            raise ValueError("this detector has a domain gate, and the output has no in_domain: call the model on "
                             "pixels (in eval mode) so the gate can judge whether the image is like its training data")
        in_domain = [True] * len(output.probs) if in_domain is None else in_domain.tolist()
        words = []
        reject = self.config.reject_entropy
        for p_fake, h, inside in zip(output.probs[:, 1].tolist(), scores.tolist(), in_domain):
            if not inside:
                words.append(VERDICT_OUTSIDE)
            elif not self.answers_anything or (reject is not None and h > reject):
                words.append(VERDICT_UNSURE)
            else:
                words.append(VERDICT_FAKE if p_fake >= self.config.threshold else VERDICT_REAL)
        return words


BayesFakeConfig.register_for_auto_class()
BayesFakeDetector.register_for_auto_class("AutoModel")
