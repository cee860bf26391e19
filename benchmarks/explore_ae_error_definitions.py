"""The wider search behind the autoencoder's "perceptual_deep" and "perceptual_mahalanobis" reconstruction errors
(issue 15, item 6): ~100 candidate definitions, each scored as a wild-vs-CIFAKE score, the same sets and AUROCs as
benchmarks/bench_ae_error_definitions.py (choose: wild train vs CIFAKE val; report: wild train + test vs CIFAKE test;
and wild shrunk to 32 px first). A search, not a release measurement: the definitions worth keeping went into the model
source and are measured by the bench.

    OMP_NUM_THREADS=1 python benchmarks/explore_ae_error_definitions.py runs/robust-cifake-ae-mobilenetv2/final \
        --output runs/robust-cifake-ae-mobilenetv2/error_definitions_explored.json

Candidates, from the detector's reconstruction r and target t (in [0, 1]) and its own encoder's first 5 stages:

- ``p{stages}_{mean|max|q90}``: the "perceptual" distance (``perceptual_distance``) over those stages, each stage's
  per-position distance pooled over space by its mean, max or 90th percentile;
- ``p{i}_relnorm``: stage i's squared feature error relative to the target's own feature energy;
- ``maha_{p|u}{stages}_{log|lin}_{diag|full}``: Mahalanobis distance of the per-channel mean squared feature error
  (p: unit-normalised features, u: raw), log or not, diagonal or Ledoit-Wolf covariance, fitted on a seeded 4,000-image
  subset of the run's CIFAKE TRAIN split;
- pixel ones: ``l1``, ``l1_max``, ``l1_q99``, ``hp`` (= "highpass"), ``hp_rel`` (relative to the target's high-pass
  energy), ``band0/1/2`` (the Laplacian-pyramid band at 64/32/16 px), ``low1/2`` (error after 2x / 4x average
  pooling), and input-only references ``hp_t``, ``band0_t`` (no reconstruction: not eligible).

The reconstructions are cached (float16) under cache/ae_error_explore/ so the scoring can be rerun cheaply.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub_models import BayesFakeDetector, BayesFakeImageProcessor  # noqa: E402
from hub_models.modeling_bayesfake import highpass_residual  # noqa: E402
from train.data import decode_processor  # noqa: E402
from train.evaluate import read_run_record, recorded_splits, subsample  # noqa: E402
from train.offdomain import WILD  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ae_error_definitions import decode_wild  # noqa: E402

STAGES = 5


def cache_reconstructions(model, name: str, images: np.ndarray, folder: Path, batch_size: int) -> None:
    if (folder / f"{name}_t.npy").exists():
        return
    processor = BayesFakeImageProcessor.from_config(model.config)
    rs, ts = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=f"reconstruct {name}", unit="batch"):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
        rec = model.reconstruct(processor.normalize_uint8(batch))
        rs.append(rec["reconstruction"].half().numpy())
        ts.append(rec["target"].half().numpy())
    np.save(folder / f"{name}_r.npy", np.concatenate(rs))
    np.save(folder / f"{name}_t.npy", np.concatenate(ts))


def band(x: torch.Tensor) -> torch.Tensor:
    """x minus its 2x average-pooled copy brought back up (one Laplacian-pyramid level)."""
    return x - F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


@torch.no_grad()
def candidates(model, r: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    pixels = ((torch.cat([r, t]) - mean) / std).contiguous(memory_format=torch.channels_last)
    stages = model.backbone.model.forward_intermediates(pixels, indices=list(range(STAGES)), stop_early=True,
                                                        intermediates_only=True)
    for i, stage in enumerate(stages):
        stage = stage.float()
        a, b = F.normalize(stage, dim=1, eps=1e-10).chunk(2)
        per_position = (a - b).pow(2).sum(1).flatten(1)
        out[f"p{i}_mean"], out[f"p{i}_max"] = per_position.mean(1), per_position.amax(1)
        out[f"p{i}_q90"] = per_position.quantile(0.9, dim=1)
        out[f"p{i}_chan"] = (a - b).pow(2).mean((2, 3))
        raw_r, raw_t = stage.chunk(2)
        out[f"u{i}_chan"] = (raw_r - raw_t).pow(2).mean((2, 3))
        out[f"p{i}_relnorm"] = ((raw_r - raw_t).pow(2).sum(1).flatten(1).mean(1)
                                / raw_t.pow(2).sum(1).flatten(1).mean(1))
    diff = r - t
    error_map = diff.abs().mean(1).flatten(1)
    hp_r, hp_t = highpass_residual(r), highpass_residual(t)
    out |= {"l1": diff.abs().flatten(1).mean(1), "l1_max": error_map.amax(1), "l1_q99": error_map.quantile(0.99, 1),
            "hp": (hp_r - hp_t).abs().flatten(1).mean(1), "hp_t": hp_t.abs().flatten(1).mean(1),
            "band0_t": band(t).abs().flatten(1).mean(1)}
    out["hp_rel"] = out["hp"] / (out["hp_t"] + 1e-3)
    for level in range(3):
        rs, ts = r, t
        for _ in range(level):
            rs, ts = F.avg_pool2d(rs, 2), F.avg_pool2d(ts, 2)
        out[f"band{level}"] = (band(rs) - band(ts)).abs().flatten(1).mean(1)
        if level:
            out[f"low{level}"] = (rs - ts).abs().flatten(1).mean(1)
    return out


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative]))


def mahalanobis_scores(features: dict[str, dict[str, np.ndarray]], keys: list[str], log: bool,
                       diagonal: bool) -> dict[str, np.ndarray]:
    x = {name: np.concatenate([f[k] for k in keys], 1).astype(np.float64) for name, f in features.items()}
    if log:
        x = {name: np.log(v + 1e-8) for name, v in x.items()}
    fit = x["cifake_train"]
    mu = fit.mean(0)
    if diagonal:
        sd = fit.std(0) + 1e-6
        return {name: (((v - mu) / sd) ** 2).sum(1) for name, v in x.items()}
    precision = LedoitWolf().fit(fit).precision_
    return {name: np.einsum("ij,jk,ik->i", v - mu, precision, v - mu) for name, v in x.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--max-cifake", type=int, default=4000, help="seeded subset of CIFAKE train, val, test each")
    parser.add_argument("--wild", default=WILD)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cache", default="cache/ae_error_explore")
    parser.add_argument("--output", help="write the table here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = BayesFakeDetector.from_pretrained(args.model_dir).eval()
    folder = Path(args.cache) / Path(args.model_dir).resolve().parent.name
    folder.mkdir(parents=True, exist_ok=True)
    _, record = read_run_record(args.model_dir)
    splits = recorded_splits(record, decode_processor(model.config, 0))
    for split, seed in (("val", 0), ("test", 0), ("train", 1)):  # val / test: the bench's subsets
        cache_reconstructions(model, f"cifake_{split}", subsample(*splits[split], args.max_cifake, seed)[0], folder,
                              args.batch_size)
    del splits
    for shrink in (False, True):
        for split, images in decode_wild(model, args.wild, shrink).items():
            cache_reconstructions(model, f"wild_{split}" + ("_shrunk" if shrink else ""), images, folder,
                                  args.batch_size)
    names = ["cifake_train", "cifake_val", "cifake_test", "wild_train", "wild_test", "wild_train_shrunk",
             "wild_test_shrunk"]
    features = {}
    for name in names:
        r, t = (np.load(folder / f"{name}_{part}.npy", mmap_mode="r") for part in "rt")
        parts = {}
        for start in tqdm(range(0, len(r), 200), desc=f"score {name}", unit="batch"):
            batch = candidates(model, *(torch.from_numpy(np.array(a[start:start + 200])).float() for a in (r, t)))
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
        features[name] = {key: torch.cat(value).numpy() for key, value in parts.items()}
    scores = {key: {n: features[n][key] for n in names} for key, v in features["cifake_val"].items() if v.ndim == 1}
    for combo in [(0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4), (1, 2), (2, 3), (1, 2, 3), (3, 4)]:
        for pooling in ("mean", "max", "q90"):
            scores[f"p{''.join(map(str, combo))}_{pooling}"] = {
                n: sum(features[n][f"p{i}_{pooling}"] for i in combo) for n in names}
    for combo in [(0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4), (1, 2, 3)]:
        for kind in ("p", "u"):
            for log in (True, False):
                for diagonal in (True, False):
                    key = (f"maha_{kind}{''.join(map(str, combo))}_{'log' if log else 'lin'}_"
                           f"{'diag' if diagonal else 'full'}")
                    scores[key] = mahalanobis_scores(features, [f"{kind}{i}_chan" for i in combo], log, diagonal)
    rows = {}
    for key, s in scores.items():
        rows[key] = {"choose: wild train vs CIFAKE val": auroc(s["wild_train"], s["cifake_val"]),
                     "report: wild train+test vs CIFAKE test": auroc(np.r_[s["wild_train"], s["wild_test"]],
                                                                     s["cifake_test"]),
                     "report: wild shrunk to source side vs CIFAKE test": auroc(
                         np.r_[s["wild_train_shrunk"], s["wild_test_shrunk"]], s["cifake_test"])}
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[1]["choose: wild train vs CIFAKE val"]))
    for key, row in rows.items():
        print(f"{key:36s} " + "  ".join(f"{v:.4f}" for v in row.values()))
    if args.output:
        Path(args.output).write_text(json.dumps({"model": args.model_dir, "definitions": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
