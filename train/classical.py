"""Classical (scikit-learn) heads on frozen backbone features, with calibrated probabilities and a sampled predictive.

One function does the whole job of a study cell, ``fit_predict``: on float features [N, D]

1. the features are standardised and reduced (``REDUCTIONS``: none, PCA, an autoencoder bottleneck; fitted once on
   the training features, no labels), then a scikit-learn classifier is built by name (``CLASSIFIERS``); its few
   hyper-parameters (``GRIDS``: C of the logistic probe and the SVMs) are chosen by ROC-AUC
   on the validation split;
2. the chosen pipeline is refitted on ``bootstrap`` resamples of the training split: the members' disagreement is the
   sampled predictive (a bootstrap ensemble, the frequentist stand-in for a posterior over the fitted classifier);
3. every member's real-valued score (``decision_function``, else the logit of ``predict_proba``) is calibrated on the
   validation split (``ScoreCalibrator``: ``sigmoid`` = a temperature and a bias, or ``isotonic``), so each member
   gives P(FAKE) and the T = ``bootstrap`` members give a ``Predictions`` with the
   mean predictive, its std, the predictive entropy and the mutual information, as a Monte Carlo detector does.

The validation split is used for the hyper-parameters and the calibration only; nothing here sees a test split. The
autoencoder bottleneck (``AutoencoderReducer``) is a small torch MLP trained on the training features alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import BaggingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.tree import DecisionTreeClassifier

from train.metrics import auroc
from train.prediction import Predictions

# name -> factory(seed) of an unfitted classifier. Sizes are kept modest: the study fits each one several times.
CLASSIFIERS: dict[str, Callable[[int], BaseEstimator]] = {
    "logistic": lambda seed: LogisticRegression(C=0.1, max_iter=3000),
    "lda": lambda seed: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
    "gaussian_nb": lambda seed: GaussianNB(),
    "svm_linear": lambda seed: LinearSVC(C=0.01, max_iter=5000, random_state=seed),
    "svm_rbf": lambda seed: SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed),
    "knn1": lambda seed: KNeighborsClassifier(n_neighbors=1),
    "knn3": lambda seed: KNeighborsClassifier(n_neighbors=3),
    "knn5": lambda seed: KNeighborsClassifier(n_neighbors=5),
    "decision_tree": lambda seed: DecisionTreeClassifier(min_samples_leaf=5, random_state=seed),
    "random_forest": lambda seed: RandomForestClassifier(n_estimators=60, min_samples_leaf=2, n_jobs=1,
                                                         random_state=seed),
    # Bagged full trees, each on 20% of the features, and boosting that samples 20% of them per split: with all
    # 1,280 features these two alone would take most of the study's time budget.
    "bagging": lambda seed: BaggingClassifier(n_estimators=10, max_features=0.2, n_jobs=1, random_state=seed),
    "gradient_boosting": lambda seed: HistGradientBoostingClassifier(max_iter=40, max_features=0.2,
                                                                     early_stopping=False, random_state=seed),
}
# Hyper-parameters chosen on validation (pipeline parameter -> candidates); classifiers not listed keep the above.
GRIDS: dict[str, dict[str, list]] = {
    "logistic": {"clf__C": [0.01, 0.1, 1.0]},
    "svm_linear": {"clf__C": [0.001, 0.01, 0.1]},
    "svm_rbf": {"clf__C": [0.3, 1.0, 3.0]},
}
REDUCTIONS = ("none", "pca", "autoencoder")
CALIBRATIONS = ("sigmoid", "isotonic")
# Scores of a classifier with predict_proba only are turned into logits with the probabilities clipped here.
PROBA_CLIP = 1e-6


class AutoencoderReducer(TransformerMixin, BaseEstimator):
    """A small autoencoder on (standardised) features: D -> hidden -> ``dim`` -> hidden -> D, trained with Adam on the
    mean squared reconstruction error; ``transform`` gives the ``dim``-d bottleneck. Deterministic for a seed."""

    def __init__(self, dim: int = 64, hidden: int = 256, epochs: int = 60, lr: float = 1e-3, batch_size: int = 128,
                 seed: int = 0):
        self.dim, self.hidden, self.epochs, self.lr = dim, hidden, epochs, lr
        self.batch_size, self.seed = batch_size, seed

    @torch.enable_grad()
    def fit(self, x, y=None):
        x = _finite(x, "autoencoder input")
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        d = x.shape[1]
        self.encoder_ = torch.nn.Sequential(torch.nn.Linear(d, self.hidden), torch.nn.GELU(),
                                            torch.nn.Linear(self.hidden, self.dim))
        decoder = torch.nn.Sequential(torch.nn.Linear(self.dim, self.hidden), torch.nn.GELU(),
                                      torch.nn.Linear(self.hidden, d))
        params = list(self.encoder_.parameters()) + list(decoder.parameters())
        optimiser = torch.optim.Adam(params, lr=self.lr, weight_decay=1e-5)
        data = torch.from_numpy(x.astype(np.float32))
        for _ in range(self.epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), self.batch_size):
                batch = data[order[start:start + self.batch_size]]
                loss = torch.nn.functional.mse_loss(decoder(self.encoder_(batch)), batch)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.reconstruction_mse_ = float(loss.detach())
        return self

    def transform(self, x):
        with torch.no_grad():
            return self.encoder_(torch.from_numpy(_finite(x, "autoencoder input").astype(np.float32))).numpy()


def _finite(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} non-finite values (NaN/inf); refusing to fit on them")
    return x


def make_reducer(reduction: str, reduction_dim: int = 64, seed: int = 0) -> Pipeline:
    """StandardScaler -> reduction: none, PCA or the autoencoder bottleneck (``reduction_dim`` wide, re-standardised).
    Unsupervised: fitted on training features alone."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; known: {list(REDUCTIONS)}")
    steps = [("scale", StandardScaler())]
    if reduction == "pca":
        steps.append(("reduce", PCA(n_components=reduction_dim, random_state=seed)))
    elif reduction == "autoencoder":
        steps += [("reduce", AutoencoderReducer(dim=reduction_dim, seed=seed)), ("rescale", StandardScaler())]
    return Pipeline(steps)


def make_pipeline(classifier: str, reduction: str = "none", reduction_dim: int = 64, seed: int = 0) -> Pipeline:
    """``make_reducer`` -> classifier."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; known: {sorted(CLASSIFIERS)}")
    return Pipeline([*make_reducer(reduction, reduction_dim, seed).steps, ("clf", CLASSIFIERS[classifier](seed))])


def decision_scores(model, x: np.ndarray) -> np.ndarray:
    """A real score per row, larger = more FAKE: ``decision_function`` where the model has one, else the logit of its
    clipped P(FAKE) (trees, forests, k-NN, naive Bayes)."""
    if hasattr(model, "decision_function"):
        try:
            return np.asarray(model.decision_function(x), dtype=np.float64)
        except AttributeError:  # a pipeline whose last step lacks it
            pass
    p = np.clip(model.predict_proba(x)[:, 1], PROBA_CLIP, 1 - PROBA_CLIP)
    return np.log(p) - np.log1p(-p)


def _check_xy(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = _finite(np.asarray(x, dtype=np.float64), f"{what} features")
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what}: need features [N, D] and labels [N]; got {x.shape} and {y.shape}")
    if what != "test" and set(np.unique(y)) != {0, 1}:
        raise ValueError(f"{what}: need both classes (0 REAL, 1 FAKE); got labels {sorted(set(np.unique(y)))}")
    return x, y


def bootstrap_indices(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A class-stratified bootstrap resample (each class resampled to its own size, so both are always present)."""
    return np.concatenate([rng.choice(np.flatnonzero(y == c), size=int((y == c).sum()), replace=True)
                           for c in (0, 1)])


def choose_params(classifier: str, reduction: str, reduction_dim: int, x_train, y_train, x_val, y_val,
                  seed: int = 0) -> tuple[dict, float]:
    """The ``GRIDS`` point with the best validation ROC-AUC (the first on ties); ({}, AUC) when there is no grid."""
    grid = GRIDS.get(classifier, {})
    points = [{}] if not grid else [dict(zip(grid, values)) for values in _product(list(grid.values()))]
    best, best_auc = {}, -math.inf
    for params in points:
        model = make_pipeline(classifier, reduction, reduction_dim, seed).set_params(**params).fit(x_train, y_train)
        score = auroc(y_val, decision_scores(model, x_val))
        score = -math.inf if math.isnan(score) else score
        if score > best_auc:
            best, best_auc = params, score
    return best, best_auc


def _product(lists: list[list]) -> list[tuple]:
    out = [()]
    for values in lists:
        out = [prefix + (v,) for prefix in out for v in values]
    return out


def members_to_predictions(labels: np.ndarray, member_p: np.ndarray) -> Predictions:
    """Predictions from the P(FAKE) of T members [T, N]: mean predictive, its std, predictive entropy (total),
    expected entropy (aleatoric) and their difference, the mutual information (epistemic), all in nats."""
    member_p = np.clip(np.asarray(member_p, dtype=np.float64), 0.0, 1.0)
    if member_p.ndim != 2 or member_p.shape[1] != len(labels):
        raise ValueError(f"member probabilities must be [T, N] with N = {len(labels)}; got {member_p.shape}")
    if not np.isfinite(member_p).all():
        raise ValueError("member probabilities contain NaN")

    def binary_entropy(p):
        q = 1.0 - p
        return -(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0)
                 + np.where(q > 0, q * np.log(np.maximum(q, 1e-300)), 0.0))

    mean = member_p.mean(0)
    total = binary_entropy(mean)
    expected = binary_entropy(member_p).mean(0)
    return Predictions(labels=np.asarray(labels, dtype=np.int64), p_fake=mean.astype(np.float32),
                       std_fake=member_p.std(0).astype(np.float32), predictive_entropy=total.astype(np.float32),
                       mutual_information=np.maximum(total - expected, 0.0).astype(np.float32),
                       expected_entropy=expected.astype(np.float32), num_samples=member_p.shape[0])


class ScoreCalibrator:
    """P(FAKE) from a member's 1-d score, fitted on validation: ``sigmoid`` = sigma(a * score + b) by maximum
    likelihood (Platt scaling: a temperature 1/a and a bias; scikit-learn's LogisticRegression, unpenalised), or
    ``isotonic`` (scikit-learn's IsotonicRegression, clipped outside the fitted range)."""

    def __init__(self, method: str = "sigmoid"):
        if method not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {method!r}; known: {list(CALIBRATIONS)}")
        self.method = method

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> ScoreCalibrator:
        scores = _finite(np.asarray(scores, dtype=np.float64), "calibration scores")
        if self.method == "sigmoid":
            self.model_ = LogisticRegression(C=np.inf, max_iter=1000).fit(scores[:, None], labels)
        else:
            self.model_ = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
        return self

    def predict(self, scores: np.ndarray) -> np.ndarray:
        scores = _finite(np.asarray(scores, dtype=np.float64), "scores")
        if self.method == "sigmoid":
            return self.model_.predict_proba(scores[:, None])[:, 1]
        return self.model_.predict(scores)


def fit_predict(classifier: str, x_train, y_train, x_val, y_val, tests: dict[str, tuple[np.ndarray, np.ndarray]],
                reduction: str = "none", reduction_dim: int = 64, bootstrap: int = 5, calibration: str = "sigmoid",
                seed: int = 0) -> tuple[dict[str, Predictions], dict]:
    """Fit ``classifier`` (after ``reduction``) on train, choose its grid point and calibrate on val, and predict every
    test set in ``tests`` ({name: (features, labels)}) with a ``bootstrap``-member ensemble. Returns
    ({"val": ..., name: ...} Predictions, info: the chosen parameters and validation AUC)."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; known: {list(CALIBRATIONS)}")
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be >= 1; got {bootstrap}")
    x_train, y_train = _check_xy(x_train, y_train, "train")
    x_val, y_val = _check_xy(x_val, y_val, "validation")
    tests = {name: _check_xy(x, y, "test") for name, (x, y) in tests.items()}
    for name, (x, _) in tests.items():
        if x.shape[1] != x_train.shape[1]:
            raise ValueError(f"test set {name!r} has {x.shape[1]} features, train has {x_train.shape[1]}")
    if reduction != "none":
        # Fitted once on all of train (it never sees a label): the bootstrap samples the classifier, not the reduction.
        reducer = make_reducer(reduction, reduction_dim, seed).fit(x_train)
        x_train, x_val = reducer.transform(x_train), reducer.transform(x_val)
        tests = {name: (reducer.transform(x), y) for name, (x, y) in tests.items()}
    params, val_auc = choose_params(classifier, "none", 0, x_train, y_train, x_val, y_val, seed)
    base = make_pipeline(classifier, "none", 0, seed).set_params(**params)
    rng = np.random.default_rng(seed)
    member_p = {name: [] for name in ["val", *tests]}
    for member in range(bootstrap):
        # One member (T = 1) is the plain fit on all of train; more are stratified bootstrap refits.
        idx = np.arange(len(y_train)) if bootstrap == 1 else bootstrap_indices(y_train, rng)
        model = clone(base)
        if "clf__random_state" in model.get_params():
            model.set_params(clf__random_state=seed + member)
        model.fit(x_train[idx], y_train[idx])
        calibrator = ScoreCalibrator(calibration).fit(decision_scores(model, x_val), y_val)
        member_p["val"].append(calibrator.predict(decision_scores(model, x_val)))
        for name, (x, _) in tests.items():
            member_p[name].append(calibrator.predict(decision_scores(model, x)))
    labels = {"val": y_val, **{name: y for name, (_, y) in tests.items()}}
    preds = {name: members_to_predictions(labels[name], np.stack(ps)) for name, ps in member_p.items()}
    return preds, {"params": params, "val_auc_choice": val_auc}
