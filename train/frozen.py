"""Heads on a frozen pretrained backbone: train on cached features, calibrate, evaluate, release.

    python -m train.frozen train/configs/frozen/effnetlite0-mcd-mlp.yaml                  # train + report (val only)
    python -m train.frozen CONFIG --split test --export hub_models/NAME                   # + test report, Hub folder
    python -m train.frozen CONFIG --grid dropout=0.1,0.3,0.5 model.head_hidden=[128],[256],[512] \
        --out train/results/hpsearch-NAME.md                                                # search, scored on val

The backbone (timm, ImageNet weights from ``backbone_weights``) runs once per image and split: its pooled features
are cached (``train.features``) and every head, search point and evaluation reuses them. Only the head is trained.
The released folder holds the whole detector, backbone weights included: ``forward(pixels)`` gives what
``forward_features`` gave on the cache (tested), so the report measures the model a user downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from hub_models import BayesFakeConfig, BayesFakeDetector
from train.data import load_splits
from train.evaluate import calibrate_and_evaluate, calibrate_on_validation, predict
from train.features import cache_folder, extract_features, load_backbone_weights
from train.hpsearch import parse_grid, write_table
from train.train import YamlConfig, epoch_order


@dataclass
class FrozenHeadConfig(YamlConfig):
    name: str
    model: dict = field(default_factory=dict)  # BayesFakeConfig kwargs (backbone = a timm name)
    backbone_weights: str = "../shared/weights/tf_efficientnet_lite0.in1k.safetensors"  # or "timm" (download)
    data: str = "../shared/data/cifake"
    out_dir: str = ""  # default runs/NAME
    max_train: int = 20000  # training images whose features are extracted (0 = all of train)
    # Side the images are decoded and cached at, before the processor's resize to image_size (0 = image_size).
    # CIFAKE is 32 px: decoding at 32 and resizing later gives the same pixels and a 16x smaller cache.
    decode_size: int = 0
    val_fraction: float = 0.05
    seed: int = 0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    kl_weight: float = 1.0  # variational heads: loss = NLL + kl_weight * KL / N (the ELBO per example)
    gnb_var_smoothing: float = 1e-9  # Gaussian NB: share of the largest feature variance added to every variance
    val_samples: int = 10  # T of the per-epoch validation
    threads: int = 0  # 0 = all cores


def feature_splits(cfg: FrozenHeadConfig, model: BayesFakeDetector, progress: bool = True) -> dict:
    """{"train", "val", "test"} -> (features float32 [N, D], labels int64), extracted once and cached."""
    splits = load_splits(cfg.data, cfg.val_fraction, cfg.seed, size=cfg.decode_size or model.config.image_size)
    if cfg.max_train:
        keep = np.sort(epoch_order(len(splits["train"][1]), cfg.seed, -1)[: cfg.max_train].numpy())
        splits["train"] = (splits["train"][0][keep], splits["train"][1][keep])
    out = {}
    for split, (images, labels) in splits.items():
        key = json.dumps([str(Path(cfg.data).resolve()), split, cfg.val_fraction, cfg.seed,
                          cfg.max_train if split == "train" else 0])
        folder = cache_folder(model, key) / split
        out[split] = (extract_features(model, images, folder, desc=f"features {split}", progress=progress), labels)
    return out


def train_head(model: BayesFakeDetector, cfg: FrozenHeadConfig, train: tuple, val: tuple,
               progress: bool = True) -> list[dict]:
    """Fit ``model.head`` on cached features: closed form for Gaussian NB, Adam on the NLL (+ KL / N) otherwise."""
    x, y = (torch.as_tensor(a) for a in train)
    y = y.long()
    history = []
    t0 = time.time()
    if model.config.head == "gaussian_nb":
        model.head.fit(x, y, var_smoothing=cfg.gnb_var_smoothing)
        history.append({**validate(model, val, cfg.val_samples), "epoch": 1, "train_seconds": time.time() - t0})
        return history
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(y)
    for epoch in range(cfg.epochs):
        model.head.train()
        for idx in epoch_order(n, cfg.seed, epoch).split(cfg.batch_size):
            logits = model.sample_head_logits(x[idx], len(idx), 1, stochastic=True)[0]
            loss = F.cross_entropy(logits, y[idx])
            if model.bayesian_layers():
                # ELBO per example: the minibatch NLL is a mean, so the KL (one term for the whole data set) is
                # divided by N to sit on the same scale; kl_weight tempers it.
                loss = loss + cfg.kl_weight * model.kl_divergence() / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        metrics = validate(model, val, cfg.val_samples)
        history.append({**metrics, "epoch": epoch + 1, "train_seconds": round(time.time() - t0, 2)})
        if progress and (epoch + 1) % 5 == 0:
            print(json.dumps(history[-1]))
    model.eval()
    return history


def validate(model: BayesFakeDetector, val: tuple, num_samples: int) -> dict:
    preds = predict(model, val[0], val[1], num_samples, progress=False)
    # Clipped at 1e-7 as the committed search tables were scored (sklearn no longer clips; this keeps them comparable).
    nll = log_loss(preds.labels, np.clip(preds.p_fake, 1e-7, 1 - 1e-7), labels=[0, 1])
    return {"val/acc": float(((preds.p_fake >= 0.5) == preds.labels).mean()), "val/nll": float(nll)}


def build_model(cfg: FrozenHeadConfig) -> tuple[BayesFakeDetector, str]:
    torch.manual_seed(cfg.seed)  # the head's initial weights: a search point trains exactly as its release would
    model = BayesFakeDetector(BayesFakeConfig(**cfg.model))
    loaded = load_backbone_weights(model, cfg.backbone_weights)
    return model.eval(), loaded


def run(cfg: FrozenHeadConfig, split: str | None = None, export: str | None = None, command: str = "",
        progress: bool = True) -> dict:
    """Train the head, calibrate on validation, write the report (on ``split`` if given) and optionally export."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, loaded = build_model(cfg)
    data = feature_splits(cfg, model, progress)
    history = train_head(model, cfg, data["train"], data["val"], progress)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "backbone": loaded,
                                                  "history": history}, indent=2) + "\n")
    report = None
    if split:
        eval_dir = out / f"eval_{split}"
        # On cached features, the report also draws their PCA (feature_pca.png).
        report = calibrate_and_evaluate(model, {"val": data["val"], split: data[split]}, eval_dir, split=split,
                                        name=export and Path(export).name or cfg.name, progress=progress)
        print(json.dumps(report["metrics"], indent=2))
    if export:
        from hub_models.export import export_detector

        plots = [out / f"eval_{split}" / p for p in report["plots"]] if report else []
        export_detector(model, export, report=report, plots=plots, command=command)
        (Path(export) / "train_history.json").write_text((out / "history.json").read_text())
        print(f"exported {export}")
    return {"history": history, "report": report}


def run_search(config_path: str, grid: dict[str, list[str]], overrides: list[str]) -> list[dict]:
    """Every grid point trains a head on the same cached features; scored on validation, sorted by the NLL after
    temperature scaling (the NLL of the detector as it would be released)."""
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        cfg = FrozenHeadConfig.from_file(config_path, [*overrides, *(f"{k}={v}" for k, v in point.items())])
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, _ = build_model(cfg)
        data = feature_splits(cfg, model, progress=False)
        history = train_head(model, cfg, data["train"], data["val"], progress=False)
        last = history[-1]
        # Also what the released detector would output: after its temperature is fitted on the same validation.
        calibrated = calibrate_on_validation(model, *data["val"], progress=False)["calibration"]
        rows.append({**point, "val/acc": last["val/acc"], "val/nll": last["val/nll"],
                     "val/nll_calibrated": calibrated["val_nll_after"], "val/ece_calibrated": calibrated["val_ece_after"],
                     "temperature": calibrated["temperature"], "train_seconds": last["train_seconds"]})
        print(json.dumps(rows[-1]))
    return sorted(rows, key=lambda r: r["val/nll_calibrated"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML FrozenHeadConfig (train/configs/frozen/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--split", help="evaluate on this split after calibrating on val (e.g. test)")
    parser.add_argument("--export", help="write the calibrated detector as a Hub repo folder here")
    parser.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="hyper-parameter search instead of one run")
    parser.add_argument("--out", help="search results table (Markdown; a .json twin is written beside it)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "train.frozen", *argv])
    if args.grid:
        if not args.out:
            parser.error("--grid needs --out")
        rows = run_search(args.config, parse_grid(args.grid), args.set)
        name = FrozenHeadConfig.from_file(args.config, args.set).name
        write_table(rows, Path(args.out), f"Hyper-parameter search: {name}", command)
        print(Path(args.out).read_text())
        return
    run(FrozenHeadConfig.from_file(args.config, args.set), args.split, args.export, command)


if __name__ == "__main__":
    main()
