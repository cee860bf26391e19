"""Losses of the autoencoder detector: a hybrid reconstruction loss and a classification loss, weighted together.

    reconstruction = ssim_share * (1 - SSIM) + (1 - ssim_share) * L1 + perceptual_weight * perceptual
    total          = recon_weight * reconstruction + class_weight(step) * focal(logits, smoothed labels)

In the seed's names: alpha_r = ``ssim_share`` (0.84 is the classic SSIM/L1 mix of Zhao et al., "Loss Functions for
Image Restoration with Neural Networks"), beta = ``perceptual_weight``, gamma_r = ``recon_weight``, gamma_c and
alpha_c = ``focal_gamma`` and ``focal_alpha``. ``class_weight(step)`` is the progressive weight of
``train.autoencoder.classifier_weight`` (0 while the classifier is frozen).

SSIM is torchmetrics' (Gaussian window, images in [0, 1]); focal loss is torchvision's ``sigmoid_focal_loss`` on the
binary logit (logit_FAKE - logit_REAL, whose sigmoid is the head's softmax P(FAKE)); with ``focal_gamma = 0`` and
``focal_alpha = None`` it is exactly the label-smoothed binary cross-entropy.

The perceptual term: LPIPS (Zhang et al., 2018) compares unit-normalised early features of a pretrained network, then
weights each channel with linear layers learned on human judgements. Those learned weights cannot be had offline, so
``PerceptualDistance`` is LPIPS without them: the unit-normalised, equally weighted channel differences of the first
feature stages of the pretrained backbone's own ImageNet weights (a frozen copy, not the encoder being fine-tuned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.ops import sigmoid_focal_loss

from hub_models.modeling_bayesfake import perceptual_distance

SSIM_KERNEL = 11  # torchmetrics' default Gaussian window (sigma 1.5); smaller images use the largest odd side that fits


def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM [B] of images in [0, 1] (``data_range`` 1)."""
    side = min(reconstruction.shape[-2:])
    kernel = min(SSIM_KERNEL, side if side % 2 else side - 1)
    if kernel < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels; got {tuple(reconstruction.shape[-2:])}")
    return structural_similarity_index_measure(reconstruction, target, data_range=1.0, kernel_size=kernel,
                                               sigma=1.5 * kernel / SSIM_KERNEL, reduction="none")


def binary_logit(logits: torch.Tensor) -> torch.Tensor:
    """logit_FAKE - logit_REAL [B] of two-class logits [B, 2]: its sigmoid is the softmax's P(FAKE)."""
    return logits[:, 1] - logits[:, 0]


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float | None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean binary focal loss (Lin et al., 2017) of two-class logits [B, 2] against labels [B] (1 = FAKE), on targets
    smoothed to ``1 - label_smoothing / 2`` and ``label_smoothing / 2``. ``alpha`` weighs the FAKE class (the REAL
    class ``1 - alpha``); None weighs both alike. ``gamma = 0, alpha = None``: label-smoothed binary cross-entropy."""
    targets = labels.to(logits.dtype) * (1.0 - label_smoothing) + label_smoothing / 2
    return sigmoid_focal_loss(binary_logit(logits), targets, alpha=-1.0 if alpha is None else alpha, gamma=gamma,
                              reduction="mean")


class PerceptualDistance(nn.Module):
    """LPIPS-style distance [B] between two images in [0, 1] on the first ``stages`` feature stages of a frozen
    pretrained timm network: per stage, features unit-normalised over channels, squared differences summed over
    channels and averaged over space; the stages summed. One-channel (greyscale) images are replicated to RGB."""

    def __init__(self, backbone: str, weights: str, image_mean, image_std, stages: int = 3):
        super().__init__()
        import timm

        self.net = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                     features_only=True, out_indices=tuple(range(stages))).eval()
        self.net.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> PerceptualDistance:
        super().train(mode)
        self.net.eval()  # frozen: its BatchNorm keeps the ImageNet statistics
        return self

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([reconstruction, target]).expand(-1, 3, -1, -1)
        return perceptual_distance(self.net((pair - self.mean) / self.std))


@dataclass
class HybridLossParts:
    total: torch.Tensor
    reconstruction: torch.Tensor  # the weighted reconstruction loss, before recon_weight
    l1: torch.Tensor
    ssim: torch.Tensor  # mean SSIM (1 = perfect)
    perceptual: torch.Tensor | None
    classification: torch.Tensor | None  # None while the classifier is frozen (class weight 0)


class HybridLoss(nn.Module):
    """recon_weight * (ssim_share * (1 - SSIM) + (1 - ssim_share) * L1 + perceptual_weight * perceptual)
    + class_weight * focal; see the module docstring."""

    def __init__(self, ssim_share: float, perceptual_weight: float, recon_weight: float, focal_gamma: float,
                 focal_alpha: float | None, label_smoothing: float = 0.0,
                 perceptual: PerceptualDistance | None = None):
        super().__init__()
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a PerceptualDistance (a pretrained network's features)")
        self.ssim_share, self.perceptual_weight, self.recon_weight = ssim_share, perceptual_weight, recon_weight
        self.focal_gamma, self.focal_alpha, self.label_smoothing = focal_gamma, focal_alpha, label_smoothing
        self.perceptual = perceptual if perceptual_weight > 0 else None

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, class_weight: float) -> HybridLossParts:
        l1 = (reconstruction - target).abs().mean()
        ssim = ssim_per_image(reconstruction, target).mean()
        pixel = self.ssim_share * (1.0 - ssim) + (1.0 - self.ssim_share) * l1
        perceptual = None
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction, target).mean()
            pixel = pixel + self.perceptual_weight * perceptual
        total = self.recon_weight * pixel
        classification = None
        if class_weight > 0:  # frozen classifier: no classification gradient reaches the encoder either
            classification = focal_loss(logits, labels, self.focal_gamma, self.focal_alpha, self.label_smoothing)
            total = total + class_weight * classification
        return HybridLossParts(total=total, reconstruction=pixel, l1=l1, ssim=ssim, perceptual=perceptual,
                               classification=classification)
