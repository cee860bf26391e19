"""Train a BayesFake detector from one config file.

    python -m train.train train/configs/cifake-mcdropout-cnn.yaml [--resume] [--set epochs=2 ...]
    accelerate launch -m train.train CONFIG      # several GPUs, unchanged

The config file holds a ``TrainConfig`` (below) whose ``model`` mapping is a ``BayesFakeConfig``. Every ``ckpt_every``
steps and at each epoch end the full state (model, optimiser, schedule, epoch, step, RNG) is written atomically to
``OUT/checkpoint.pt``; ``--resume`` continues from it with the same data order, so an interrupted run loses at most
``ckpt_every`` steps. The trained model lands in ``OUT/final`` as a complete Hub repo folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from hub_models import BayesFakeConfig, BayesFakeDetector, BayesFakeImageProcessor
from train.data import load_splits


class YamlConfig:
    """A dataclass config read from YAML, with ``KEY=VALUE`` overrides (``model.KEY`` for the detector's config)."""

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()):
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        for item in overrides:
            key, _, value = item.partition("=")
            target = raw.setdefault("model", {}) if key.startswith("model.") else raw
            key = key.removeprefix("model.")
            if target is raw and key not in known:
                raise ValueError(f"--set {item}: unknown key {key!r}")
            target[key] = yaml.safe_load(value)
        # YAML 1.1 reads "1e-9" as a string: numbers go through their field's type.
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if types.get(key) in ("float", float) and isinstance(value, (str, int)) and not isinstance(value, bool):
                raw[key] = float(value)
        cfg = cls(**raw)
        BayesFakeConfig(**cfg.model)  # fail now, with the config's own message, not after decoding the data
        return cfg

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


@dataclass
class TrainConfig(YamlConfig):
    name: str
    model: dict = field(default_factory=dict)  # BayesFakeConfig kwargs
    data: str = "../shared/data/cifake"
    out_dir: str = ""  # default runs/NAME
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05  # of each cosine cycle
    # Cosine cycles with warm restarts (SGDR): epochs per cycle, summing to `epochs`; empty = one cycle. Each restart
    # peaks at lr * lr_cycle_decay**k. A finished run extended by a new cycle resumes from its checkpoint (see below).
    lr_cycles: list = field(default_factory=list)
    lr_cycle_decay: float = 1.0
    label_smoothing: float = 0.0
    kl_weight: float = 1.0  # variational heads only
    augment: bool = True  # random horizontal flip + translation by up to `crop_pad` pixels
    crop_pad: int = 2
    val_fraction: float = 0.05
    val_samples: int = 10  # T used for the per-epoch validation
    seed: int = 0
    ckpt_every: int = 200
    threads: int = 0  # 0 = all cores
    max_train: int = 0  # >0: subsample the training set (smoke runs, searches)
    channels_last: bool = True  # NHWC activations: oneDNN's faster convolution layout on CPU
    backbone_weights: str = ""  # timm backbones: pretrained weights file, or "timm" to download them by name

    def __post_init__(self):
        if self.lr_cycles and (sum(self.lr_cycles) != self.epochs or min(self.lr_cycles) < 1):
            raise ValueError(f"lr_cycles {self.lr_cycles} must be positive epoch counts summing to "
                             f"epochs={self.epochs}")


def augment_batch(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random translation (reflect-padded crop) of a uint8 [B, 3, H, W] batch."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip.view(b, 1, 1, 1), images.flip(3), images)
    if pad <= 0:
        return images
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(b, 3, h, w + 2 * pad)
    cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(b, 3, h, w)
    return padded.gather(2, rows).gather(3, cols).to(torch.uint8)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Per cycle: linear warm-up then cosine decay to zero (one cycle over all epochs unless `lr_cycles` says more)."""
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


# Keys that change how a run executes, not what it computes: a resumed run may set them differently.
RUNTIME_KEYS = {"threads", "ckpt_every", "out_dir"}
# Keys that only lengthen the schedule: a checkpoint written under another value is resumed when every step it has
# taken used the learning rate the new config gives that step, i.e. the new config from scratch would have reached
# the same state. This is how a finished run is extended by a warm-restart cycle without re-running it.
SCHEDULE_KEYS = {"epochs", "lr_cycles", "lr_cycle_decay"}


def check_resumable(saved: dict, cfg: TrainConfig, steps_done: int, steps_per_epoch: int) -> None:
    """Raise unless a checkpoint written under the config ``saved`` can continue under ``cfg``."""
    defaults = dataclasses.asdict(type(cfg)(name=cfg.name))
    saved = {**defaults, **saved}  # keys added to TrainConfig after the checkpoint count as their defaults
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


@torch.no_grad()
def validate(model, processor, images, labels, num_samples: int, device, batch_size: int = 512) -> dict:
    model.eval()
    nll, correct = 0.0, 0
    for i in range(0, len(labels), batch_size):
        x = processor.normalize_uint8(images[i : i + batch_size].to(device))
        y = labels[i : i + batch_size].to(device)
        out = model(x, num_samples=num_samples, seed=i)
        nll += F.nll_loss(out.logits, y, reduction="sum").item()
        correct += (out.probs.argmax(1) == y).sum().item()
    model.train()
    return {"val/acc": correct / len(labels), "val/nll": nll / len(labels)}


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill during the write leaves the previous checkpoint intact


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    accelerator = Accelerator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    model_config = BayesFakeConfig(**cfg.model)
    model = BayesFakeDetector(model_config)
    if cfg.backbone_weights:
        from train.features import load_backbone_weights

        print("backbone weights:", load_backbone_weights(model, cfg.backbone_weights))
    processor = BayesFakeImageProcessor.from_config(model_config)
    splits = load_splits(cfg.data, cfg.val_fraction, cfg.seed, model_config.image_size)
    train_x, train_y = (torch.from_numpy(a) for a in splits["train"])
    if cfg.max_train:
        keep = epoch_order(len(train_y), cfg.seed, -1)[: cfg.max_train]
        train_x, train_y = train_x[keep], train_y[keep]
    train_x = train_x.permute(0, 3, 1, 2).contiguous()  # NCHW uint8, in RAM
    val_x = torch.from_numpy(splits["val"][0]).permute(0, 3, 1, 2).contiguous()
    val_y = torch.from_numpy(splits["val"][1])
    n_train = len(train_y)

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = n_train // (cfg.batch_size * world)
    start_epoch, start_step, history, elapsed = 0, 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        check_resumable(state["train_config"], cfg, state["epoch"] * steps_per_epoch + state["step"], steps_per_epoch)
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step, history, elapsed = state["epoch"], state["step"], state["history"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        accelerator.print(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_step}")

    def checkpoint(epoch: int, step: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt_path, {
                "train_config": dataclasses.asdict(cfg), "model_config": model_config.to_dict(),
                "model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "step": step, "history": history, "elapsed": elapsed + time.time() - t0,
                "rng": torch.get_rng_state(),
            })

    model.train()
    device = accelerator.device
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(n_train, cfg.seed, epoch)[rank::world]
        t0 = time.time()
        bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_local_main_process, mininterval=5.0)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = train_x[idx]
            if cfg.augment:
                # Seeded per (epoch, step, rank): a resumed run draws the same augmentations with no replay.
                aug_rng = torch.Generator().manual_seed(hash((cfg.seed, epoch, step, rank)) % 2**62)
                x = augment_batch(x, cfg.crop_pad, aug_rng)
            x = processor.normalize_uint8(x.to(device)).contiguous(memory_format=memory_format)
            y = train_y[idx].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, steps_per_epoch, cfg)
            pred = model(x, num_samples=1)
            loss = F.cross_entropy(pred.logits, y, label_smoothing=cfg.label_smoothing)
            if pred.kl is not None:
                # ELBO per training example: the minibatch NLL is a mean over examples, so the KL (one term for the
                # whole dataset) is divided by N to sit on the same per-example scale; kl_weight tempers it.
                loss = loss + cfg.kl_weight * pred.kl / n_train
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if (step + 1) % cfg.ckpt_every == 0:
                checkpoint(epoch, step + 1)
        elapsed += time.time() - t0
        start_step = 0
        metrics = validate(accelerator.unwrap_model(model), processor, val_x, val_y, cfg.val_samples, device)
        metrics.update(epoch=epoch + 1, train_seconds=round(elapsed, 1))
        history.append(metrics)
        accelerator.print(json.dumps(metrics))
        t0 = time.time()
        checkpoint(epoch + 1, 0)

    final = out / "final"
    if accelerator.is_main_process:
        from hub_models.export import export_detector

        # safetensors stores contiguous tensors only: back to NCHW weights before export
        unwrapped = accelerator.unwrap_model(model).eval().to(memory_format=torch.contiguous_format)
        export_detector(unwrapped, final, command=f"python -m train.train {cfg.name}")
        (out / "history.json").write_text(json.dumps(
            {"train_config": dataclasses.asdict(cfg), "history": history, "train_seconds": round(elapsed, 1),
             "processes": world, "device": str(device), "threads": torch.get_num_threads()}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML file with a TrainConfig (train/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys (model.KEY for the model config)")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_file(args.config, args.set)
    final = train(cfg, resume=args.resume)
    print(f"model written to {final}")


if __name__ == "__main__":
    main()
