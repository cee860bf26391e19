"""How the training loop (train.trainer) trains an autoencoder detector (``model.decoder_widths`` set).

- ``AutoencoderTrainStep``: one encoder and one decoder pass and one Monte Carlo draw of the head per batch: the
  module accelerate prepares in place of ``train.trainer.TrainStep``.
- ``freeze_encoder``: only the last ``unfreeze_blocks`` blocks of the pretrained encoder (and the layers after them)
  train; the earlier ones keep their ImageNet weights and BatchNorm statistics.
- ``classifier_weight``: the progressive weighting. The classifier is frozen (weight 0: no classification loss, no
  gradient into the head or from it into the encoder) for the first ``classifier_frozen_fraction`` of the steps, so
  the decoder learns to rebuild the images first; its weight then ramps linearly to ``class_weight`` over the next
  ``classifier_ramp_fraction``. A pure function of the step, so a resumed run weighs every step as an uninterrupted
  one would.
- ``build_loss``: the ``train.losses.HybridLoss`` of a config.
"""

from __future__ import annotations

from torch import nn

from train.losses import HybridLoss, PerceptualDistance


def frozen_step_count(total_steps: int, fraction: float) -> int:
    return int(round(total_steps * fraction))


def classifier_weight(step: int, total_steps: int, cfg) -> float:
    """Weight of the classification loss at global step ``step`` (0-based) of ``total_steps``."""
    frozen = frozen_step_count(total_steps, cfg.classifier_frozen_fraction)
    if step < frozen:
        return 0.0
    ramp = frozen_step_count(total_steps, cfg.classifier_ramp_fraction)
    if ramp == 0:
        return cfg.class_weight
    return cfg.class_weight * min(1.0, (step - frozen + 1) / ramp)


def freeze_encoder(model, unfreeze_blocks: int) -> list[nn.Module]:
    """Freeze the timm encoder of ``model`` but its last ``unfreeze_blocks`` blocks and what follows them (the final
    conv and norm); 0 leaves every layer trainable. Returns the frozen modules (kept in eval mode in training)."""
    if unfreeze_blocks == 0:
        return []
    encoder = model.backbone.model
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(f"unfreeze_blocks: the encoder {model.config.backbone!r} has no timm 'blocks' sequence to "
                         "unfreeze the last of; set unfreeze_blocks: 0 (all layers train)")
    if unfreeze_blocks > len(blocks):
        raise ValueError(f"unfreeze_blocks={unfreeze_blocks}: the encoder {model.config.backbone!r} has "
                         f"{len(blocks)} blocks")
    frozen = []
    for name, child in encoder.named_children():
        if name == "blocks":
            frozen += list(blocks[:len(blocks) - unfreeze_blocks])
            break
        frozen.append(child)
    for module in frozen:
        module.requires_grad_(False)
    return frozen


class AutoencoderTrainStep(nn.Module):
    """One training forward of an autoencoder detector: returns one Monte Carlo draw's raw logits [B, 2], the
    reconstruction and its target [B, C, S, S]. ``frozen`` modules stay in eval mode (their BatchNorm statistics)."""

    def __init__(self, model, frozen: list[nn.Module]):
        super().__init__()
        self.model = model
        self.frozen = frozen

    def forward(self, x):
        model = self.model
        features, reconstruction, target = model.autoencode(x)
        logits = model.sample_head_logits(features, x.shape[0], 1, stochastic=True)
        return logits[0], reconstruction, target

    def train(self, mode: bool = True) -> AutoencoderTrainStep:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


def build_loss(cfg, model) -> HybridLoss:
    """The hybrid loss of a ``TrainConfig``; its perceptual term reads the ImageNet weights in ``backbone_weights``."""
    perceptual = None
    if cfg.perceptual_weight > 0:
        if not cfg.backbone_weights or cfg.backbone_weights == "timm":
            raise ValueError("perceptual_weight > 0 compares features of the pretrained backbone: backbone_weights "
                             "must name its weights file (or set perceptual_weight: 0)")
        perceptual = PerceptualDistance(model.config.backbone, cfg.backbone_weights, model.config.image_mean,
                                        model.config.image_std)
    alpha = None if cfg.focal_alpha < 0 else cfg.focal_alpha
    return HybridLoss(cfg.ssim_share, cfg.perceptual_weight, cfg.recon_weight, cfg.focal_gamma, alpha,
                      cfg.label_smoothing, perceptual)
