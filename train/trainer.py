"""The training loop of every detector: from scratch, fine-tuned, or a head on a frozen backbone's cached features.

    result = train(load_config("train/configs/cifake-mcdropout-cnn.yaml"), resume=False)
    result.final      # OUT/final: the detector as a complete Hub repo folder (+ train_history.json)

One loop, two kinds of batch (``TrainConfig.features``): uint8 images, laundered at random (``launder``:
train.laundering.random_launder, both classes alike), augmented and normalised, go through the whole model; cached
backbone features go through its head only (``TrainStep``). Either way the loss is the cross-entropy of one Monte Carlo
draw's logits plus ``kl_weight * KL / N`` for variational layers (the ELBO per example), and each epoch ends with a
validation (``predict`` then ``train.metrics``: accuracy at 0.5 and ``nll``). A Gaussian NB head has no optimiser: it
is fitted in closed form as the run's single epoch. An autoencoder detector (``model.decoder_widths``) trains on
``train.losses.HybridLoss`` instead: reconstruction plus a focal loss whose weight is 0 (head frozen) for the first
steps, then ramps up, with only the encoder's last blocks trainable (``train.autoencoder``).

A run starts from ``seed``'s initialisation, or from a trained detector's weights (``init_from``: fine-tuning; its
calibration is not carried over). The data order is a pure function of (seed, epoch) and launderings and augmentations
are seeded per (seed, epoch, step, rank), so a resumed run replays exactly what an uninterrupted run would do. Every
``ckpt_every`` steps and at every epoch end ``accelerator.save_state`` writes model, optimiser, every RNG (python,
numpy, torch, CUDA) and the run state (epoch, step, history, elapsed time, config, validation split) into
``OUT/checkpoint`` atomically: into a temp folder first, then renamed, so a kill during a save leaves the previous
checkpoint. ``resume=True`` continues from it (see ``check_resumable`` for what may differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from hub_models import BayesFakeDetector, BayesFakeImageProcessor
from train.autoencoder import AutoencoderTrainStep, build_loss, classifier_weight, freeze_encoder
from train.config import TrainConfig, config_defaults
from train.data import augment_batch, decode_processor, epoch_order, load_splits, training_subset
from train.features import load_backbone_weights, split_features
from train.laundering import random_launder
from train.metrics import accuracy, nll
from train.prediction import predict

# Keys that change how a run executes, not what it computes: a resumed run may set them differently.
RUNTIME_KEYS = {"threads", "ckpt_every", "out_dir"}
# Keys that only lengthen the schedule: a checkpoint written under another value is resumed when every step it has
# taken used the learning rate the new config gives that step, i.e. the new config from scratch would have reached
# the same state. This is how a finished run is extended by a warm-restart cycle without re-running it.
SCHEDULE_KEYS = {"epochs", "lr_cycles", "lr_cycle_decay"}


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of a step. "cosine": per cycle, linear warm-up then cosine decay to zero (one cycle over all epochs
    unless ``lr_cycles`` says more), each restart peaking at ``lr * lr_cycle_decay**k``; "constant": ``lr``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    cycles = cfg.lr_cycles or [cfg.epochs]
    k = 0  # the cycle this step falls in; steps past the end stay in the last one
    while k < len(cycles) - 1 and step >= cycles[k] * steps_per_epoch:
        step -= cycles[k] * steps_per_epoch
        k += 1
    peak, total = cfg.lr * cfg.lr_cycle_decay**k, cycles[k] * steps_per_epoch
    warm = max(1, int(total * cfg.warmup_fraction))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def check_resumable(saved: dict, cfg: TrainConfig, steps_done: int, steps_per_epoch: int) -> None:
    """Raise unless a checkpoint written under the config ``saved`` can continue under ``cfg``."""
    saved = {**config_defaults(), **saved}  # keys added to TrainConfig after the checkpoint count as their defaults
    current = dataclasses.asdict(cfg)
    differing = {k for k in current if saved.get(k) != current[k]} - RUNTIME_KEYS
    if not differing:
        return
    if differing - SCHEDULE_KEYS:
        raise ValueError(f"--resume: the checkpoint was written by a different config ({sorted(differing)} differ); "
                         "start a new out_dir")
    old = dataclasses.replace(cfg, **{k: saved[k] for k in SCHEDULE_KEYS})
    if steps_done > cfg.epochs * steps_per_epoch or any(
            not math.isclose(lr_at(s, steps_per_epoch, old), lr_at(s, steps_per_epoch, cfg), rel_tol=1e-12)
            for s in range(steps_done)):
        raise ValueError(f"--resume: the checkpoint's {steps_done} steps followed another learning-rate schedule "
                         f"than {sorted(differing)} give now; start a new out_dir")


# ----------------------------------------------------------------------------------------------------------------------
# Model and data


# BayesFakeConfig fields that decide the network's layers and their shapes: a run may start from another detector's
# weights (init_from) only when these agree. Sampling (dropout rate, priors, T), preprocessing and calibration may
# differ: the weights still fit.
ARCHITECTURE_FIELDS = ("backbone", "cnn_widths", "head", "head_hidden", "variational_layer", "variational_scope",
                       "image_size", "decoder_widths", "greyscale")


def build_model(cfg: TrainConfig) -> tuple[BayesFakeDetector, str]:
    """The detector of ``cfg.model`` in eval mode, initialised from ``cfg.seed``, with its pretrained backbone weights
    loaded when ``backbone_weights`` names them, or every weight of the detector in ``init_from``; returns it and what
    was loaded (for the record)."""
    set_seed(cfg.seed)
    model = BayesFakeDetector(cfg.model_config())
    if cfg.init_from:
        return init_from_detector(model, cfg.init_from).eval(), f"init_from {cfg.init_from}"
    loaded = load_backbone_weights(model, cfg.backbone_weights) if cfg.backbone_weights else ""
    return model.eval(), loaded


def init_from_detector(model: BayesFakeDetector, folder: str) -> BayesFakeDetector:
    """Copy the weights of the detector in ``folder`` into ``model`` (same architecture, else ``ValueError``). Only the
    state dict is copied: ``model`` keeps its own config, so the source's calibration (temperature, threshold, reject
    entropy, all config fields) stays behind and the evaluation of the new run refits it on validation."""
    source = BayesFakeDetector.from_pretrained(folder)
    differing = {k: (getattr(source.config, k), getattr(model.config, k)) for k in ARCHITECTURE_FIELDS
                 if getattr(source.config, k) != getattr(model.config, k)}
    if differing:
        raise ValueError(f"init_from {folder}: its architecture differs from the run's model config "
                         f"({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in differing.items())}); "
                         "set model to the source's architecture")
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as err:  # same named architecture, other tensors (e.g. another version of the code)
        raise ValueError(f"init_from {folder}: its weights do not fit the run's model: {err}") from err
    return model


@dataclass
class TrainData:
    """The inputs the loop trains and validates on: uint8 images [N, 3, H, W] or float32 features [N, D]."""

    train: tuple[torch.Tensor, torch.Tensor]  # inputs, int64 labels
    val: tuple[np.ndarray, np.ndarray]
    split: dict  # train.data.split_record: how val was carved


def load_data(cfg: TrainConfig, model: BayesFakeDetector, progress: bool = True) -> TrainData:
    """Decode the data with the detector's own processor (``decode_size`` for feature runs), carve validation, keep
    the ``max_train`` subset of train; for a feature run, the backbone's cached features of train and val."""
    processor = decode_processor(model.config, cfg.decode_size)
    splits = load_splits(cfg.data, processor, cfg.val_fraction, cfg.seed)
    keep = training_subset(len(splits["train"][1]), cfg.max_train, cfg.seed)
    train = (splits["train"][0][keep], splits["train"][1][keep])
    val = splits["val"]
    if cfg.features:
        feats = split_features(model, {"train": train, "val": val}, splits.record, processor, cfg.max_train, progress)
        train, val = feats["train"], feats["val"]
        inputs = torch.from_numpy(train[0])
    else:
        inputs = torch.from_numpy(train[0]).permute(0, 3, 1, 2).contiguous()  # NCHW uint8, in RAM
    return TrainData(train=(inputs, torch.from_numpy(train[1])), val=val, split=splits.record)


class TrainStep(nn.Module):
    """One Monte Carlo draw of the detector on a training batch, as the module accelerate prepares (so that DDP wraps
    and syncs either kind of batch): pixels through the whole model (``model.sample_logits``), features through the
    head (``model.sample_head_logits``), the same draws ``model(x)`` and ``model.forward_features(x)`` average. Returns
    the draw's raw logits [B, 2] (no temperature, no probability floor: a confidently wrong example keeps its
    gradient) and the KL term of the variational layers (None without any)."""

    def __init__(self, model: BayesFakeDetector, features: bool):
        super().__init__()
        self.model, self.features = model, features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.model
        if self.features:
            logits = model.sample_head_logits(x, x.shape[0], 1, stochastic=True)
        else:
            logits = model.sample_logits(x, 1, stochastic=True)
        return logits[0], model.kl_divergence() if model.bayesian_layers() else None

    def train(self, mode: bool = True) -> TrainStep:
        """Feature runs train the head only: the frozen backbone stays in eval mode (its BatchNorm statistics)."""
        super().train(mode)
        if self.features:
            self.model.backbone.eval()
        return self


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def validate(model: BayesFakeDetector, val: tuple, num_samples: int) -> dict:
    """Accuracy at 0.5 and NLL (``train.metrics.nll``) of the T-sample predictive on validation."""
    preds = predict(model, *val, num_samples=num_samples, progress=False)
    return {"val/acc": accuracy(preds.labels, preds.p_fake), "val/nll": nll(preds.labels, preds.p_fake)}


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class RunState:
    """Where a run stands, checkpointed with it (``accelerator.register_for_checkpointing``)."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in the current epoch
    history: list = field(default_factory=list)  # one validation dict per finished epoch
    elapsed: float = 0.0  # training seconds (validation excluded)
    config: dict = field(default_factory=dict)  # the TrainConfig that wrote the checkpoint
    split: dict = field(default_factory=dict)  # the validation split (train.data.split_record)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


STATE_FILE = "run_state.json"  # written last into a checkpoint folder: readable without loading it


def save_checkpoint(accelerator: Accelerator, folder: Path, state: RunState) -> None:
    """``accelerator.save_state`` into ``folder``, atomically: written to ``folder.tmp``, then renamed over it (the
    previous checkpoint is moved aside to ``folder.old`` for the instant between the two renames)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=1) + "\n")
        replace_folder(tmp, folder)
    accelerator.wait_for_everyone()


def replace_folder(new: Path, folder: Path) -> None:
    """Put the complete folder ``new`` in place of ``folder``: two renames, the old one kept as ``folder.old`` in
    between (``find_checkpoint`` falls back to it), then deleted."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    """The latest complete checkpoint: ``folder``, or ``folder.old`` when a kill fell between the two renames."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    final: Path  # OUT/final, the detector as a Hub repo folder
    model: BayesFakeDetector  # the trained detector (eval mode)
    history: list  # per-epoch validation
    val: tuple  # the validation inputs and labels it was scored on (images or features)
    record: dict  # what OUT/history.json and final/train_history.json hold


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, command: str = "",
          epoch_end=None) -> TrainResult:
    """Train (or fit) the detector of ``cfg``; write ``OUT/final``, ``OUT/history.json`` and checkpoints in
    ``OUT/checkpoint``. ``resume`` continues from the checkpoint; without it the run starts from scratch.
    ``epoch_end(metrics)`` is called after each epoch's validation and checkpoint (an Optuna pruner raises there)."""
    accelerator = Accelerator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = progress and accelerator.is_local_main_process
    model, loaded = build_model(cfg)
    model.to(accelerator.device)
    with accelerator.main_process_first():  # one process decodes and extracts; the others read its cache
        data = load_data(cfg, model, progress)
    train_x, train_y = data.train
    n_train = len(train_y)
    state = RunState(config=dataclasses.asdict(cfg), split=data.split)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    set_seed(cfg.seed)  # the loop's random draws do not depend on what data loading or weight loading drew

    if cfg.closed_form:
        t0 = time.time()
        model.head.fit(train_x, train_y, var_smoothing=cfg.gnb_var_smoothing)
        state.elapsed = time.time() - t0
        state.history.append({**validate(model, data.val, cfg.val_samples), "epoch": 1,
                              "train_seconds": round(state.elapsed, 2)})
        state.epoch = cfg.epochs
        return finish(cfg, accelerator, model, state, data, loaded, command)

    memory_format = torch.channels_last if cfg.channels_last and not cfg.features else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if cfg.features:
        model.backbone.requires_grad_(False)
    # An autoencoder detector trains its encoder (last unfreeze_blocks), decoder and head on the hybrid loss.
    hybrid = build_loss(cfg, model).to(accelerator.device) if model.decoder is not None else None
    if hybrid is not None:
        step_module = AutoencoderTrainStep(model, freeze_encoder(model, cfg.unfreeze_blocks))
    else:
        step_module = TrainStep(model, cfg.features)
    optimizer = make_optimizer(cfg, model.head.parameters() if cfg.features else model.parameters())
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    accelerator.register_for_checkpointing(state)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * world
    steps_per_epoch = n_train // per_step if cfg.drop_last else math.ceil(n_train / per_step)
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training examples make no full batch of {cfg.batch_size} x {world} processes")
    if resume:
        resume_from(accelerator, ckpt, cfg, state, steps_per_epoch)
    elif (out / "checkpoint.pt").is_file() or find_checkpoint(ckpt):
        accelerator.print(f"starting from scratch in {out} (its checkpoint is overwritten; --resume continues it)")

    processor = BayesFakeImageProcessor.from_config(model.config)
    device = accelerator.device
    for epoch in range(state.epoch, cfg.epochs):
        step_module.train()
        order = epoch_order(n_train, cfg.seed, epoch)[rank::world]
        t0 = time.time()
        bar = tqdm(range(state.step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   mininterval=5.0)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = train_x[idx], train_y[idx].to(device)
            if not cfg.features:
                if cfg.launder:
                    # Before flip/translate, as on a real image (laundered first, then framed). Seeded per (seed,
                    # epoch, step, rank) like the augmentation below: a resumed run draws the same launderings.
                    launder_rng = np.random.default_rng((cfg.seed, epoch, step, rank))
                    nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
                    x = torch.from_numpy(random_launder(nhwc, cfg.launder, launder_rng))
                    x = x.permute(0, 3, 1, 2).contiguous()
                if cfg.augment:
                    # Seeded per (epoch, step, rank): a resumed run draws the same augmentations with no replay.
                    aug_rng = torch.Generator().manual_seed(hash((cfg.seed, epoch, step, rank)) % 2**62)
                    x = augment_batch(x, cfg.crop_pad, aug_rng)
                x = processor.normalize_uint8(x.to(device)).contiguous(memory_format=memory_format)
            lr = lr_at(epoch * steps_per_epoch + step, steps_per_epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if hybrid is not None:
                # Progressive weighting: weight 0 freezes the head (no gradient into it, nor through it).
                weight = classifier_weight(epoch * steps_per_epoch + step, cfg.epochs * steps_per_epoch, cfg)
                model.head.requires_grad_(weight > 0)
                logits, reconstruction, target = step_module(x.to(device))
                loss = hybrid(reconstruction, target, logits, y, weight).total
                kl = model.kl_divergence() if model.bayesian_layers() else None
            else:
                logits, kl = step_module(x.to(device))
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if kl is not None:
                # ELBO per training example: the minibatch NLL is a mean over examples, so the KL (one term for the
                # whole data set) is divided by N to sit on the same per-example scale; kl_weight tempers it.
                loss = loss + cfg.kl_weight * kl / n_train
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            state.step = step + 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if state.step % cfg.ckpt_every == 0 and state.step < steps_per_epoch:
                state.elapsed, t0 = state.elapsed + time.time() - t0, time.time()
                save_checkpoint(accelerator, ckpt, state)
        state.elapsed += time.time() - t0
        metrics = validate(model, data.val, cfg.val_samples)
        metrics.update(epoch=epoch + 1, train_seconds=round(state.elapsed, 2))
        state.history.append(metrics)
        state.epoch, state.step = epoch + 1, 0
        if progress:
            accelerator.print(json.dumps(metrics))
        save_checkpoint(accelerator, ckpt, state)
        if epoch_end is not None:
            epoch_end(metrics)
    return finish(cfg, accelerator, model, state, data, loaded, command)


def resume_from(accelerator: Accelerator, ckpt: Path, cfg: TrainConfig, state: RunState, steps_per_epoch: int) -> None:
    """Load the checkpoint into the prepared model and optimiser, every RNG and ``state``, after checking that it may
    continue under ``cfg`` on the same validation split."""
    folder = find_checkpoint(ckpt)
    if folder is None:
        old = ckpt.parent / "checkpoint.pt"
        hint = f" ({old} was written by an older version of the trainer: not resumable)" if old.is_file() else ""
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}{hint}")
    saved = json.loads((folder / STATE_FILE).read_text())
    check_resumable(saved["config"], cfg, saved["epoch"] * steps_per_epoch + saved["step"], steps_per_epoch)
    if saved["split"].get("val_sha256") != state.split["val_sha256"]:
        raise ValueError(f"--resume: the validation split differs from the checkpoint's (the data changed: "
                         f"{saved['split']} vs {state.split}); start a new out_dir")
    split = state.split
    accelerator.load_state(str(folder))  # model, optimiser, RNGs and `state` (registered for checkpointing)
    state.config, state.split = dataclasses.asdict(cfg), split
    accelerator.print(f"resumed from {folder}: epoch {state.epoch}, step {state.step}")


def finish(cfg: TrainConfig, accelerator: Accelerator, model: BayesFakeDetector, state: RunState, data: TrainData,
           loaded: str, command: str) -> TrainResult:
    """Export ``OUT/final`` (the whole detector, backbone included) and write the run's record beside it."""
    from hub_models.export import export_detector
    from hub_models.hub import HUB_ORG

    final = cfg.out / "final"
    # safetensors stores contiguous tensors only: back to NCHW weights before export
    model = model.eval().to(memory_format=torch.contiguous_format)
    record = {"train_config": dataclasses.asdict(cfg), "split": data.split, "backbone": loaded,
              "history": state.history, "train_seconds": round(state.elapsed, 1),
              "processes": accelerator.num_processes, "device": str(accelerator.device),
              "threads": torch.get_num_threads()}
    if accelerator.is_main_process:
        # Written aside, then swapped in: OUT/final is this run's output, replaced whole (never a release to update).
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_detector(model, tmp, command=command or f"python -m train.train CONFIG  # {cfg.name}",
                        repo_id=f"{HUB_ORG}/{cfg.name}")
        text = json.dumps(record, indent=2) + "\n"
        (tmp / "train_history.json").write_text(text)  # evaluation reads the validation split back from here
        replace_folder(tmp, final)
        (cfg.out / "history.json").write_text(text)
    accelerator.wait_for_everyone()
    return TrainResult(final=final, model=model, history=state.history, val=data.val, record=record)
