"""The backbone x classifier study: frozen pretrained backbones x classical classifiers x reduction x transforms,
trained on one data set and tested on others, every row with calibrated probabilities and a sampled predictive.

    bayesfake study train/configs/study/study.yaml            # the whole study, resumable
    python -m train.study train/configs/study/smoke.yaml --set bootstrap=2

One command reruns everything: images are decoded from ../shared/data, backbone features come from the feature cache
(``train.study_data.view_features``: chunked, resumable), and every finished cell is one line of a JSON-lines store
(``StudyConfig.store``), so a rerun (or a resumed, interrupted run) skips what it has and only writes the report again.
The report (``train.study_report``) is written from the store: results.md, results.csv and the heatmaps.

Experiments (each a list of cells; a cell = one classifier fitted once, with its bootstrap ensemble, and tested on
one or more test sets):

- ``main``: every backbone x classifier x reduction; train CIFAKE -> test CIFAKE and wild; train wild -> test wild and
  CIFAKE;
- ``logo``: leave one generator out inside wild train: train on the other generators' images and the real photos,
  test on the held-out generator's images against the wild test photos;
- ``shortcut``: wild -> wild with the frame kept (``squash``) and with the resolution equalised (``lowres``), next
  to the centre crop; and a classifier on the stored image size alone;
- ``transform``: train transform x test transform (none, blur, colour jitter, JPEG, resize), both directions;
- ``crops``: wild features pooled over five crops at the backbone's input size (the full-size detector's candidate).

Validation chooses (hyper-parameters, PCA size, calibration; the best configuration of each experiment); test only
reports. A CIFAKE-trained cell is calibrated on CIFAKE validation and a wild-trained one on wild validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from train.classical import CALIBRATIONS, CLASSIFIERS, REDUCTIONS, fit_predict, make_reducer
from train.metrics import compute_metrics
from train.study_data import TRANSFORMS, ImageSet, load_cifake, load_wild, view_features

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent

# Backbones: name -> (weights file in weights_dir, input side, mean, std). The CIFAKE CNN is the released detector's
# own trunk; the DINO / CLIP names of the reference study are accepted and refused with the reason.
TIMM_BACKBONES = {
    "tf_efficientnet_lite0": ("tf_efficientnet_lite0.in1k.safetensors", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "tf_efficientnet_lite2": ("tf_efficientnet_lite2.in1k.safetensors", 260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "mobilenetv2_100": ("mobilenetv2_100.in1k.safetensors", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CIFAKE_CNN = "cifake_cnn"
CIFAKE_CNN_FOLDER = "hub_models/cifake-mcdropout-cnn"
UNAVAILABLE_BACKBONES = {
    "dino_vitb16": "DINO ViT-B/16 (facebook/dino-vitb16)",
    "dino_resnet50": "DINO ResNet-50 (facebook/dino-resnet50)",
    "clip_vitb16": "CLIP ViT-B/16 (openai/clip-vit-base-patch16)",
}
BACKBONES = (*TIMM_BACKBONES, CIFAKE_CNN, *UNAVAILABLE_BACKBONES)
EXPERIMENTS = ("main", "logo", "shortcut", "transform", "crops")


class BackboneUnavailable(RuntimeError):
    """A backbone the study knows by name whose weights cannot be had here."""


@dataclass
class StudyConfig:
    name: str = "study"
    cifake: str = "../shared/data/cifake"
    wild: str = "../shared/data/wild"
    weights_dir: str = "../shared/weights"
    # CIFAKE subsets (label-balanced, seeded): feature extraction dominates the study's time.
    cifake_train: int = 1500
    cifake_val: int = 500
    cifake_test: int = 1000
    wild_val_fraction: float = 0.2  # of wild train, per generator (and of the real photos)
    seed: int = 0
    backbones: list = field(default_factory=lambda: [CIFAKE_CNN, "mobilenetv2_100", "tf_efficientnet_lite0",
                                                     "tf_efficientnet_lite2"])
    classifiers: list = field(default_factory=lambda: list(CLASSIFIERS))
    reductions: list = field(default_factory=lambda: list(REDUCTIONS))
    reduction_dims: list = field(default_factory=lambda: [16, 64, 256])  # PCA size candidates, chosen on val
    bootstrap: int = 5  # ensemble members = samples of the predictive
    calibration: str = "sigmoid"  # or "isotonic"
    experiments: list = field(default_factory=lambda: ["main", "shortcut", "crops", "logo", "transform"])  # run order
    # The smaller experiments run on a few backbones and classifiers (the full cross would not fit the budget).
    logo_backbones: list = field(default_factory=lambda: ["mobilenetv2_100"])
    logo_classifiers: list = field(default_factory=lambda: ["logistic", "lda", "svm_rbf"])
    shortcut_backbones: list = field(default_factory=lambda: ["mobilenetv2_100"])
    shortcut_classifiers: list = field(default_factory=lambda: ["logistic", "lda", "svm_rbf", "knn5"])
    transform_backbones: list = field(default_factory=lambda: [CIFAKE_CNN])
    transform_classifiers: list = field(default_factory=lambda: ["logistic", "lda", "svm_rbf"])
    transforms: list = field(default_factory=lambda: list(TRANSFORMS))
    crops_backbones: list = field(default_factory=lambda: ["mobilenetv2_100", "tf_efficientnet_lite0"])
    crops_classifiers: list = field(default_factory=lambda: ["logistic", "lda", "svm_rbf", "knn5"])
    store: str = "runs/study/results.jsonl"
    out_dir: str = "train/results/study"
    command: str = ""  # how the study was run, for the report (filled in by main)

    def __post_init__(self):
        for name in ("cifake_train", "cifake_val", "cifake_test", "bootstrap"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if not 0 < self.wild_val_fraction < 1:
            raise ValueError(f"wild_val_fraction must be in (0, 1); got {self.wild_val_fraction}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {list(CALIBRATIONS)}; got {self.calibration!r}")
        for key in ("backbones", "logo_backbones", "shortcut_backbones", "transform_backbones", "crops_backbones"):
            bad = [b for b in getattr(self, key) if b not in BACKBONES]
            if bad:
                raise ValueError(f"{key}: unknown backbone(s) {bad}; known: {list(BACKBONES)}")
        for key in ("classifiers", "logo_classifiers", "shortcut_classifiers", "transform_classifiers",
                    "crops_classifiers"):
            bad = [c for c in getattr(self, key) if c not in CLASSIFIERS]
            if bad:
                raise ValueError(f"{key}: unknown classifier(s) {bad}; known: {sorted(CLASSIFIERS)}")
        for key, known in (("reductions", REDUCTIONS), ("transforms", TRANSFORMS), ("experiments", EXPERIMENTS)):
            bad = [v for v in getattr(self, key) if v not in known]
            if bad:
                raise ValueError(f"{key}: unknown value(s) {bad}; known: {list(known)}")
        if not self.reduction_dims or any(not isinstance(k, int) or k < 1 for k in self.reduction_dims):
            raise ValueError(f"reduction_dims must be positive integers; got {self.reduction_dims}")


def load_study_config(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """A ``StudyConfig`` from YAML, with ``KEY=VALUE`` overrides (values parsed as YAML)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        data[key] = yaml.safe_load(value)
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown study config key(s) {unknown}; known: {sorted(known)}")
    return StudyConfig(**data)


def load_backbone(name: str, weights_dir: str):
    """A frozen feature extractor as a ``BayesFakeDetector`` (its ``backbone`` and its image preprocessing in the
    config), eval mode. Raises ``BackboneUnavailable`` for the DINO / CLIP names, FileNotFoundError for missing
    weights."""
    from hub_models import BayesFakeConfig, BayesFakeDetector
    from train.features import load_backbone_weights

    if name in UNAVAILABLE_BACKBONES:
        raise BackboneUnavailable(
            f"backbone {name!r} ({UNAVAILABLE_BACKBONES[name]}) is a name of the reference study, but its weights are "
            f"not obtainable offline here (no model hub, not in {weights_dir}); the study runs on "
            f"{list(TIMM_BACKBONES)} and {CIFAKE_CNN!r}")
    if name == CIFAKE_CNN:
        folder = ROOT / CIFAKE_CNN_FOLDER
        model = BayesFakeDetector.from_pretrained(folder)
    elif name in TIMM_BACKBONES:
        file, size, mean, std = TIMM_BACKBONES[name]
        model = BayesFakeDetector(BayesFakeConfig(backbone=name, image_size=size, image_mean=list(mean),
                                                  image_std=list(std), resample="bicubic", head="deterministic",
                                                  num_samples=1))
        load_backbone_weights(model, str(Path(weights_dir) / file))
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {list(BACKBONES)}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------- cells


def cell_id(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


def planned_cells(cfg: StudyConfig, logo_generators: list[str]) -> list[dict]:
    """Every cell of the study, in the order they run (most important first, so a partial run has the core): the
    unreduced main grid, the other experiments in the order ``cfg.experiments`` lists them, then the main grid's
    reductions."""
    by_experiment: dict[str, list[dict]] = {name: [] for name in EXPERIMENTS}
    reduced = []
    base = dict(train_tf="none", test_tf="none", geometry="centre", holdout="")
    for backbone in cfg.backbones:
        for train in ("wild", "cifake"):
            for reduction in cfg.reductions:
                for clf in cfg.classifiers:
                    (by_experiment["main"] if reduction == "none" else reduced).append(
                        dict(base, experiment="main", backbone=backbone, train=train, classifier=clf,
                             reduction=reduction))
    for backbone in cfg.crops_backbones:
        for clf in cfg.crops_classifiers:
            by_experiment["crops"].append(dict(base, experiment="crops", backbone=backbone, train="wild",
                                               classifier=clf, reduction="none", geometry="crops5"))
    for backbone in cfg.shortcut_backbones:
        for geometry in ("squash", "lowres"):
            for clf in cfg.shortcut_classifiers:
                by_experiment["shortcut"].append(dict(base, experiment="shortcut", backbone=backbone, train="wild",
                                                      classifier=clf, reduction="none", geometry=geometry))
    for backbone in cfg.logo_backbones:
        for generator in logo_generators:
            for clf in cfg.logo_classifiers:
                by_experiment["logo"].append(dict(base, experiment="logo", backbone=backbone, train="wild",
                                                  classifier=clf, reduction="none", holdout=generator))
    for backbone in cfg.transform_backbones:
        for train in ("wild", "cifake"):
            for train_tf in cfg.transforms:
                for clf in cfg.transform_classifiers:
                    # One fit per train transform; it is tested under every test transform (the cell's test sets).
                    by_experiment["transform"].append(dict(base, experiment="transform", backbone=backbone,
                                                           train=train, classifier=clf, reduction="none",
                                                           train_tf=train_tf, test_tf="all"))
    cells = [c for name in cfg.experiments for c in by_experiment[name]]
    return cells + (reduced if "main" in cfg.experiments else [])


class Store:
    """JSON-lines results store: one line per finished cell (and per PCA-size choice), appended atomically enough
    (one write + flush + fsync per line); a torn last line from a kill is ignored on reading."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: ignoring a torn line", self.path)
                    continue
                self.records[record["id"]] = record

    def refresh(self) -> None:
        """Re-read the file: another worker may have appended cells since."""
        self.__init__(self.path)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> None:
        record = {"id": key, **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[key] = record


HEADLINE = {"cls/acc": "acc", "cls/auroc": "auroc", "cal/ece": "ece", "cal/nll": "nll",
            "sc/auroc_entropy": "err_auroc", "sc/auroc_std": "err_auroc_std", "sc/auroc_mi": "err_auroc_mi",
            "sc/acc@reject10": "acc_at_reject10", "meta/n": "n"}


def summarize(preds, groups: np.ndarray | None = None) -> dict:
    """The headline metrics of one test set (threshold 0.5 on the calibrated P(FAKE)), and accuracy per group."""
    metrics = compute_metrics(preds, 0.5)
    out = {short: (None if isinstance(metrics[k], float) and np.isnan(metrics[k]) else metrics[k])
           for k, short in HEADLINE.items()}
    if groups is not None:
        correct = preds.predicted(0.5) == preds.labels
        out["groups"] = {str(g): [float(correct[groups == g].mean()), int((groups == g).sum())]
                         for g in np.unique(groups)}
    return out


class Study:
    """Runs the cells of a ``StudyConfig``: data and backbones loaded on first use, features from the cache."""

    def __init__(self, cfg: StudyConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.store = Store(ROOT / cfg.store if not Path(cfg.store).is_absolute() else cfg.store)
        self._sets: dict[str, ImageSet] | None = None
        self._models: dict = {}
        self._features: dict = {}
        self._reducers: dict = {}  # the last fitted reducer (cells of one training set and reduction run in a row)
        self.extraction_seconds = 0.0  # spent on features this run (loading cached ones included)

    @property
    def sets(self) -> dict[str, ImageSet]:
        if self._sets is None:
            cfg = self.cfg
            self._sets = {**load_cifake(_path(cfg.cifake), cfg.cifake_train, cfg.cifake_val, cfg.cifake_test,
                                        cfg.seed),
                          **load_wild(_path(cfg.wild), cfg.wild_val_fraction, cfg.seed)}
        return self._sets

    def model(self, backbone: str):
        if backbone not in self._models:
            self._models = {backbone: load_backbone(backbone, _path(self.cfg.weights_dir))}  # one in memory at a time
        return self._models[backbone]

    def features(self, backbone: str, part: str, transform: str = "none", geometry: str = "centre") -> np.ndarray:
        """Features of a part (``cifake_train`` ... ``wild_test``); CIFAKE images are square 32 px: any geometry of
        them is the centre view."""
        if part.startswith("cifake"):
            geometry = "centre"  # 32 px squares: no frame to keep, no full-size detail to crop
        key = (backbone, part, transform, geometry)
        if key not in self._features:
            start = time.time()
            self._features[key] = view_features(self.model(backbone), self.sets[part], transform, geometry,
                                                self.cfg.seed, self.progress)
            self.extraction_seconds += time.time() - start
        return self._features[key]

    def logo_generators(self) -> list[str]:
        return sorted(g for g in np.unique(self.sets["wild_train"].generator) if g != "none")

    def training_data(self, cell: dict) -> tuple[tuple, tuple, dict]:
        """((x_train, y_train), (x_val, y_val), {test name: (x, y, groups)}) of a cell."""
        bb, geo, sets = cell["backbone"], cell["geometry"], self.sets
        train_tf = cell["train_tf"]

        def xy(part, tf="none", mask=None):
            x, s = self.features(bb, part, tf, geo), sets[part]
            mask = np.ones(len(s), bool) if mask is None else mask
            return x[mask], s.labels[mask], np.where(s.labels[mask] == 1, s.generator[mask], s.source[mask])

        src = cell["train"]
        if cell["experiment"] == "logo":
            g = cell["holdout"]
            keep_train, keep_val = sets["wild_train"].generator != g, sets["wild_val"].generator != g
            x_tr, y_tr, _ = xy("wild_train", mask=keep_train)
            x_va, y_va, _ = xy("wild_val", mask=keep_val)
            # Held-out generator: all its wild-train images (train and val parts), against the unseen test photos.
            parts = [xy("wild_train", mask=~keep_train), xy("wild_val", mask=~keep_val),
                     xy("wild_test", mask=sets["wild_test"].labels == 0)]
            tests = {f"heldout:{g}": tuple(np.concatenate(p) for p in zip(*parts))}
            return (x_tr, y_tr), (x_va, y_va), tests
        x_tr, y_tr, _ = xy(f"{src}_train", train_tf)
        x_va, y_va, _ = xy(f"{src}_val", train_tf)
        test_tfs = self.cfg.transforms if cell["test_tf"] == "all" else [cell["test_tf"]]
        other = "cifake" if src == "wild" else "wild"
        targets = [src] if cell["experiment"] in ("shortcut", "crops") else [src, other]
        tests = {}
        for target in targets:
            for tf in test_tfs:
                name = f"{target}_test" + ("" if cell["test_tf"] != "all" else f"@{tf}")
                tests[name] = xy(f"{target}_test", tf)
        return (x_tr, y_tr), (x_va, y_va), tests

    def reduction_dim(self, cell: dict, x_tr, y_tr, x_va, y_va) -> int:
        """The PCA / autoencoder size of a (backbone, training set, view): the logistic probe's best validation
        ROC-AUC over ``reduction_dims`` after PCA, chosen once and stored."""
        from train.classical import choose_params

        key = cell_id({"choice": "reduction_dim", "backbone": cell["backbone"], "train": cell["train"],
                       "geometry": cell["geometry"], "train_tf": cell["train_tf"], "dims": self.cfg.reduction_dims})
        record = self.store.get(key)
        if record is None:
            dims = [k for k in self.cfg.reduction_dims if k < min(x_tr.shape)] or [min(x_tr.shape) - 1]
            aucs = [choose_params("logistic", "pca", k, x_tr, y_tr, x_va, y_va, self.cfg.seed)[1] for k in dims]
            record = {"dim": int(dims[int(np.argmax(aucs))]), "val_auc": dict(zip(map(str, dims), aucs))}
            self.store.put(key, record)
        return record["dim"]

    def run_cell(self, cell: dict) -> dict:
        start = time.time()
        (x_tr, y_tr), (x_va, y_va), tests = self.training_data(cell)
        dim = 0
        if cell["reduction"] != "none":
            # One fitted reducer per training set and reduction (unsupervised, no labels): every classifier reuses it.
            dim = self.reduction_dim(cell, x_tr, y_tr, x_va, y_va)
            key = (cell["backbone"], cell["train"], cell["geometry"], cell["train_tf"], cell["holdout"],
                   cell["reduction"], dim)
            if key not in self._reducers:
                self._reducers = {key: make_reducer(cell["reduction"], dim, self.cfg.seed).fit(x_tr)}
            reducer = self._reducers[key]
            x_tr, x_va = reducer.transform(x_tr), reducer.transform(x_va)
            tests = {name: (reducer.transform(x), y, g) for name, (x, y, g) in tests.items()}
        preds, info = fit_predict(cell["classifier"], x_tr, y_tr, x_va, y_va,
                                  {name: (x, y) for name, (x, y, _) in tests.items()}, reduction="none",
                                  bootstrap=self.cfg.bootstrap, calibration=self.cfg.calibration, seed=self.cfg.seed)
        results = {"val": summarize(preds["val"])}
        for name, (_, _, groups) in tests.items():
            results[name] = summarize(preds[name], groups)
        return {"cell": cell, "reduction_dim": dim, **info, "n_train": int(len(y_tr)), "results": results,
                "seconds": round(time.time() - start, 2)}


def shortcut_metadata_probe(study: Study) -> dict:
    """How much the stored image size alone (width, height, aspect ratio, pixel count of the stored JPEG) tells REAL
    from FAKE on wild: a random forest fitted on wild train, ROC-AUC and accuracy on wild val and test."""
    import io

    from PIL import Image
    from sklearn.ensemble import RandomForestClassifier

    from train.metrics import auroc

    def sizes(part):
        rows = []
        for blob in study.sets[part].images:
            with Image.open(io.BytesIO(blob)) as image:
                w, h = image.size
            rows.append([w, h, w / h, w * h, float(w == h)])
        return np.asarray(rows, dtype=np.float64)

    model = RandomForestClassifier(n_estimators=200, min_samples_leaf=3, random_state=0, n_jobs=1)
    model.fit(sizes("wild_train"), study.sets["wild_train"].labels)
    out = {}
    for part in ("wild_val", "wild_test"):
        x, y = sizes(part), study.sets[part].labels
        p = model.predict_proba(x)[:, 1]
        out[part] = {"auroc": auroc(y, p), "acc": float(np.mean((p >= 0.5) == y)),
                     "square_share_real": float(x[y == 0, 4].mean()), "square_share_fake": float(x[y == 1, 4].mean())}
    return out


def _path(p: str) -> str:
    """Relative data paths are read from the repository root (as in the configs), whatever the working folder."""
    return p if Path(p).is_absolute() or Path(p).exists() else str(ROOT / p)


def deal_cells(cells: list[dict], workers: int) -> list[list[dict]]:
    """The cells dealt to ``workers`` lists, whole backbones at a time (so each backbone's feature views are extracted by
    one worker), balanced by an estimate of their feature cost: the distinct views a backbone's cells ask for, times its
    input side squared (the CIFAKE CNN's 32 px views cost next to nothing). Largest first, each to the lightest list
    (LPT); within a list the planned order is kept."""
    views: dict[str, set] = {}
    for cell in cells:
        views.setdefault(cell["backbone"], set()).add(
            (cell["train"], cell["train_tf"], cell["test_tf"], cell["geometry"]))
    side = {name: TIMM_BACKBONES[name][1] if name in TIMM_BACKBONES else 32 for name in views}
    load, owner = [0.0] * workers, {}
    for name in sorted(views, key=lambda b: (-len(views[b]) * side[b] ** 2, b)):
        k = int(np.argmin(load))
        owner[name] = k
        load[k] += len(views[name]) * side[name] ** 2
    return [[c for c in cells if owner[c["backbone"]] == k] for k in range(workers)]


def claim(claims: Path, cell: dict) -> bool:
    """Atomically claim a cell for this worker (O_EXCL create of a file named after it): False if another worker of
    the same invocation has it."""
    name = hashlib.sha1(cell_id(cell).encode()).hexdigest()
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def study_worker(cfg: StudyConfig, own: list[dict], others: list[dict], claims: str, index: int) -> None:
    """One worker process of ``run_study(workers=N)``: its own cells in the planned order, then, once they are done,
    the other workers' remaining cells from the end (work stealing); each cell claimed first, so none runs twice."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # BLAS / OpenMP of numpy and scikit-learn too: one core per worker, no oversubscription
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s worker {index}: %(message)s")
    study = Study(cfg, progress=False)
    for cell in [*own, *others[::-1]]:
        study.store.refresh()
        if study.store.get(cell_id(cell)) is not None or not claim(Path(claims), cell):
            continue
        study.store.put(cell_id(cell), study.run_cell(cell))
    study.store.put(cell_id({"timing": "worker", "claims": Path(claims).name, "worker": index}),
                    {"extraction_seconds": round(study.extraction_seconds, 1)})
    log.info("done; %.0f s spent on features", study.extraction_seconds)


def run_workers(cfg: StudyConfig, store: Store, todo: list[dict], workers: int, progress: bool, on_progress) -> None:
    """Run ``todo`` in ``workers`` processes (``study_worker``, one torch thread each) on ``store``; report progress
    from it every few seconds (``on_progress(cells stored)``). A failed worker fails the run (resumable)."""
    import multiprocessing
    import shutil

    claims = store.path.parent / f".claims-{os.getpid()}-{time.time_ns()}"
    claims.mkdir(parents=True)
    dealt = deal_cells(todo, workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch / OpenMP thread state
    procs = [context.Process(target=study_worker, name=f"study-worker-{k}",
                             args=(cfg, dealt[k], [c for j in range(workers) if j != k for c in dealt[j]],
                                   str(claims), k))
             for k in range(workers)]
    keys = {cell_id(c) for c in todo}
    bar = tqdm(total=len(todo), desc=f"study cells ({workers} workers)", unit="cell", disable=not progress)
    try:
        for proc in procs:
            proc.start()
        while any(proc.is_alive() for proc in procs):
            time.sleep(5)
            store.refresh()
            stored = len(keys & store.records.keys())
            bar.update(stored - bar.n)
            on_progress(stored)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        bar.close()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [f"{proc.name} (exit code {proc.exitcode})" for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"study worker(s) failed: {', '.join(failed)}; the finished cells are stored, rerun the "
                           "command to resume")


def run_study(cfg: StudyConfig, progress: bool = True, max_cells: int = 0, last_first: bool = False,
              workers: int = 1, report_only: bool = False) -> dict:
    """Run (or resume) every cell of ``cfg``; write the report. Returns timing and counts. ``last_first``: take the
    remaining cells from the end (a second worker on the same store; each skips what the other has stored).
    ``workers`` > 1: that many worker processes of one thread each (``run_workers``), e.g. one per core.
    ``report_only``: compute nothing and record no invocation time, only write the report from the store."""
    from train.study_report import write_report

    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    start = time.time()
    load_at_start = os.getloadavg()[0]
    study = Study(cfg, progress)
    cells = planned_cells(cfg, study.logo_generators() if "logo" in cfg.experiments else [])
    # Refused backbones are recorded as such, once, and their cells skipped with the reason.
    refused = {}
    for backbone in {c["backbone"] for c in cells}:
        if backbone in UNAVAILABLE_BACKBONES:
            try:
                load_backbone(backbone, cfg.weights_dir)
            except BackboneUnavailable as err:
                refused[backbone] = str(err)
                log.warning("%s", err)
    todo = [c for c in cells if c["backbone"] not in refused and study.store.get(cell_id(c)) is None]
    if report_only:
        todo = []
    if max_cells:
        todo = todo[:max_cells]
    done_before = len(cells) - len(todo) - sum(c["backbone"] in refused for c in cells)
    computed = 0
    timing_key = cell_id({"timing": "run", "started": round(start)})

    def record_time(finished: bool) -> None:
        # Rewritten after every cell (the store keeps the last line of a key): a killed run still counts its time.
        study.store.put(timing_key, {"seconds": round(time.time() - start, 1), "cells_computed": computed,
                                     "cells_reused": done_before, "extraction_seconds":
                                     round(study.extraction_seconds, 1), "command": cfg.command,
                                     "finished": finished, "workers": workers,
                                     "load_average": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]})

    if workers > 1 and todo:
        def on_progress(stored: int) -> None:
            nonlocal computed
            if stored != computed:
                computed = stored
                record_time(False)

        run_workers(cfg, study.store, todo, workers, progress, on_progress)
        study.store.refresh()
        computed = sum(study.store.get(cell_id(c)) is not None for c in todo)
    else:
        if last_first:
            todo = todo[::-1]
        for cell in tqdm(todo, desc="study cells", unit="cell", disable=not progress):
            study.store.refresh()
            if study.store.get(cell_id(cell)) is not None:  # done meanwhile by another worker on the same store
                continue
            record = study.run_cell(cell)
            study.store.put(cell_id(cell), record)
            computed += 1
            record_time(False)
    meta_key = cell_id({"choice": "metadata_probe", "seed": cfg.seed})
    if "shortcut" in cfg.experiments and study.store.get(meta_key) is None and not report_only:
        study.store.put(meta_key, {"probe": shortcut_metadata_probe(study)})
    seconds = time.time() - start
    if not report_only:
        record_time(True)
    counts = {name: (len(study.sets[name]), int(study.sets[name].labels.sum()))
              for name in ("cifake_test", "wild_test")}
    paths = write_report(cfg, study.store, refused, cells, counts)
    return {"seconds": seconds, "computed": computed, "reused": done_before, "refused": refused, "report": paths}


def main(argv: list[str] | None = None, prog: str = "python -m train.study") -> dict:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML StudyConfig (train/configs/study/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--max-cells", type=int, default=0, help="stop after computing this many new cells")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes of one torch thread each (default 1; 2 on a 2-core machine): each "
                             "takes whole backbones, then steals what is left")
    parser.add_argument("--report-only", action="store_true",
                        help="compute nothing (and record no invocation time): rewrite the report from the store")
    parser.add_argument("--last-first", action="store_true",
                        help="take the remaining cells from the end: a second worker on the same store")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_study_config(args.config, args.set)
    cfg.command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    result = run_study(cfg, max_cells=args.max_cells, last_first=args.last_first, workers=args.workers,
                       report_only=args.report_only)
    minutes = result["seconds"] / 60
    print(f"study {cfg.name}: {result['computed']} cells computed, {result['reused']} reused from "
          f"{cfg.store}, took {result['seconds']:.0f} s ({minutes:.1f} min); report: {result['report']}")
    return result


if __name__ == "__main__":
    main()
