"""Monte Carlo predictions of a detector on labelled inputs: uint8 images, or a frozen backbone's cached features.

``predict`` is the one inference path of training validation, search scoring, calibration and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor
from hub_models.modeling_bayesfake import sampling_rng, verdict_entropy
from train.abstention import selective_outcome


@dataclass
class Predictions:
    """Monte Carlo predictions of a detector on N labelled images (numpy arrays, [N] unless noted)."""

    labels: np.ndarray  # int64, 0 REAL / 1 FAKE
    p_fake: np.ndarray  # mean predictive P(FAKE)
    std_fake: np.ndarray  # std of P(FAKE) over the T samples
    predictive_entropy: np.ndarray  # total uncertainty, nats
    mutual_information: np.ndarray  # epistemic part
    expected_entropy: np.ndarray  # aleatoric part
    num_samples: int
    sample_logits: np.ndarray | None = None  # raw sampled logits [T, N, 2] before temperature, only when asked for
    domain_score: np.ndarray | None = None  # detectors with a domain gate: distance to the training data
    in_domain: np.ndarray | None = None  # bool, domain_score <= config.domain_threshold

    def __len__(self) -> int:
        return len(self.labels)

    def predicted(self, threshold: float) -> np.ndarray:
        """Predicted labels: FAKE when P(FAKE) >= threshold (the detector's own rule)."""
        return (self.p_fake >= threshold).astype(np.int64)

    def wrong(self, threshold: float) -> np.ndarray:
        return self.predicted(threshold) != self.labels

    def reject_scores(self, config) -> np.ndarray:
        """What a detector with ``config`` compares with its ``reject_entropy`` (``config.reject_score``): the
        predictive entropy, or the verdict entropy of P(FAKE) at ``config.threshold`` (the model's own function)."""
        if getattr(config, "reject_score", "predictive_entropy") == "predictive_entropy":
            return self.predictive_entropy
        return verdict_entropy(torch.from_numpy(np.asarray(self.p_fake, dtype=np.float64)),
                               config.threshold).numpy()

    def answered_outcome(self, model) -> dict:
        """What ``model``'s verdicts do on these images (``train.abstention.selective_outcome``): its threshold, its
        reject rule on its reject score, and no answer at all when its rule could not be certified."""
        config = model.config
        return selective_outcome(self.reject_scores(config), self.wrong(config.threshold), self.in_domain,
                                 config.reject_entropy if model.answers_anything else None)


def as_nchw_uint8(images) -> torch.Tensor:
    """uint8 images [N, H, W, 3] or [N, 3, H, W] (numpy or torch) -> a [N, 3, H, W] uint8 tensor (a view, no copy)."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.dim() != 4:
        raise ValueError(f"images must be uint8 [N, H, W, 3] or [N, 3, H, W]; got {tensor.dtype} "
                         f"{tuple(tensor.shape)}")
    if tensor.shape[1] != 3 and tensor.shape[-1] == 3:
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] != 3:
        raise ValueError(f"images must have 3 colour channels; got shape {tuple(tensor.shape)}")
    return tensor


def is_features(inputs) -> bool:
    """Float [N, D] arrays are backbone features (a frozen backbone's cache); anything else is images."""
    return getattr(inputs, "ndim", 0) == 2 and not np.issubdtype(np.asarray(inputs[:1]).dtype, np.integer)


def raw_sample_logits(model, inputs: torch.Tensor, num_samples: int, seed: int, features: bool = False) -> torch.Tensor:
    """The [T, B, 2] logits behind ``model(inputs, num_samples, seed=seed)`` (or ``model.forward_features``), before
    the temperature. Same seeded RNG and same sampling switch as the forward pass: exactly the samples it averaged."""
    stochastic = model.config.stochastic
    t = num_samples if stochastic else 1
    with sampling_rng(seed, None, inputs.device):
        if features:
            return model.sample_head_logits(inputs, inputs.shape[0], t, stochastic=stochastic)
        return model.sample_logits(inputs, t, stochastic=stochastic)


def predict(model, inputs, labels, num_samples: int | None = None, batch_size: int = 512, seed: int = 0,
            progress: bool = True, keep_sample_logits: bool = False, domain_inputs=None) -> Predictions:
    """Monte Carlo predictions of ``model`` (eval mode, T = ``num_samples``, default the config's) on uint8 images,
    or on float [N, D] backbone features (a frozen backbone's cache, run through ``model.forward_features``).

    Batch ``i`` is sampled with seed ``seed + i``: repeatable, and images in different batches get different draws;
    features give the same draws as the images they came from. ``keep_sample_logits`` also returns the raw sampled
    logits (what temperature fitting needs). ``domain_inputs``: for a detector whose domain gate has its own
    extractor, uint8 images [N, S, S, 3] at the gate's input size (``config.domain_image_size``), resized from the
    same originals; their extractor features are computed once (cached, ``train.domain.extractor_features``) and go in
    as ``domain_features``.
    """
    features = is_features(inputs)
    inputs = torch.as_tensor(np.asarray(inputs, dtype=np.float32)) if features else as_nchw_uint8(inputs)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("predict: no inputs")
    num_samples = num_samples or model.config.num_samples
    model.eval()
    processor = BayesFakeImageProcessor.from_config(model.config)
    domain_features = None
    if domain_inputs is not None:
        if len(domain_inputs) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(domain_inputs)} domain inputs")
        from train.domain import extractor_features  # the gate's features, cached and shared across detectors

        domain_features = torch.from_numpy(extractor_features(model, np.asarray(domain_inputs), progress=progress))
    device = next(model.parameters()).device
    fields = ("p_fake", "std_fake", "predictive_entropy", "mutual_information", "expected_entropy", "sample_logits",
              "domain_score", "in_domain")
    columns = {name: [] for name in fields}
    starts = range(0, len(inputs), batch_size)
    with torch.no_grad():
        for index, start in enumerate(tqdm(starts, desc="predict", unit="batch", disable=not progress)):
            if features:
                batch = inputs[start:start + batch_size].to(device)
                out = model.forward_features(batch, num_samples=num_samples, seed=seed + index)
            else:
                batch = processor.normalize_uint8(inputs[start:start + batch_size].to(device))
                extra = {} if domain_features is None else {
                    "domain_features": domain_features[start:start + batch_size].to(device)}
                out = model(batch, num_samples=num_samples, seed=seed + index, **extra)
            columns["p_fake"].append(out.probs[:, 1])
            columns["std_fake"].append(out.std[:, 1])
            columns["predictive_entropy"].append(out.predictive_entropy)
            columns["mutual_information"].append(out.mutual_information)
            columns["expected_entropy"].append(out.expected_entropy)
            if out.get("domain_score") is not None:
                columns["domain_score"].append(out.domain_score)
                columns["in_domain"].append(out.in_domain)
            if keep_sample_logits:
                logits = raw_sample_logits(model, batch, num_samples, seed + index, features)
                columns["sample_logits"].append(logits.expand(num_samples, *logits.shape[1:]))
    arrays = {name: torch.cat(parts, dim=1 if name == "sample_logits" else 0).cpu().numpy()
              for name, parts in columns.items() if parts}
    arrays = {name: array if array.dtype == bool else array.astype(np.float32) for name, array in arrays.items()}
    return Predictions(labels=labels, num_samples=num_samples, **arrays)

