"""Optuna study of the autoencoder detector's loss weights, scored on the validation split (never on test).

    python -m train.optuna_search train/configs/autoencoder/cifake-ae-mobilenetv2.yaml --budget-minutes 60 \
        --set max_train=4000 epochs=3
    # the same command again continues the study (SQLite storage) until its budget is spent

The search space is the seed's (alpha_r, beta, gamma_r, gamma_c, alpha_c; see train.losses), as TrainConfig keys:
``SEARCH_SPACE``. Each trial is one ordinary training run (``train.trainer.train``) in ``ROOT/trial-HASH``, the folder
named by its parameters, so a trial cut short resumes from its own checkpoint when it is retried. Its score is the
validation NLL after the temperature is fitted on the same split (``calibrate_on_validation``, as train.search sorts),
lower is better; each epoch's uncalibrated validation NLL is reported to a median pruner, which stops trials that
trail the median of earlier ones at the same epoch.

Resumable and time-budgeted: the study lives in a SQLite file (``--storage``); the seconds spent are kept in it, so
``--budget-minutes`` is the budget of the whole study over every invocation. No trial starts once it is spent; a trial
still running when it runs out stops at its next epoch end and is queued again with the same parameters, to resume
from its checkpoint next time, unless that epoch was its last: then it is scored (so the budget can be overrun by
about one epoch and the scoring; 60 minutes became 62.1 in the committed study). A trial killed with its process is
failed and retried with the same parameters by Optuna's heartbeat (``RetryHeartbeatStaleTrialCallback``) once its
heartbeat is older than ``GRACE_SECONDS``. One process per study at a time.

Every invocation writes the results table (Markdown + JSON, all trials, best first) and, with two finished trials or
more, the parameter-importance plot (Optuna's fANOVA importances) to ``train/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from train.calibration import calibrate_on_validation
from train.config import load_config
from train.trainer import find_checkpoint, train

# seed name -> (TrainConfig key, low, high, log scale)
SEARCH_SPACE = {
    "alpha_r": ("ssim_share", 0.5, 0.95, False),
    "beta": ("perceptual_weight", 0.0, 0.5, False),
    "gamma_r": ("recon_weight", 0.3, 3.0, True),
    "gamma_c": ("focal_gamma", 0.0, 4.0, False),
    "alpha_c": ("focal_alpha", 0.25, 0.75, False),
}
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
SPENT_KEY = "seconds_spent"


class BudgetSpent(Exception):
    """The study's time budget ran out during a trial: it stops at an epoch end and is queued again."""


def open_study(storage: str, name: str, seed: int) -> optuna.Study:
    """The study ``name`` in the SQLite file ``storage`` (created, or loaded to continue). The sampler is seeded by
    ``seed`` and the number of trials already stored, so a continued study draws new points, not the first ones
    again."""
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    rdb = RDBStorage(f"sqlite:///{storage}", heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    study = optuna.create_study(storage=rdb, study_name=name, direction="minimize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def trial_folder(root: Path, params: dict) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return root / f"trial-{digest}"


def make_objective(config: str, overrides: list[str], root: Path, deadline: float, progress: bool):
    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_float(name, low, high, log=log)
                  for name, (_, low, high, log) in SEARCH_SPACE.items()}
        settings = [*overrides, *(f"{SEARCH_SPACE[name][0]}={value!r}" for name, value in params.items())]
        out_dir = trial_folder(root, params)
        cfg = load_config(config, [*settings, f"out_dir={out_dir}"])
        trial.set_user_attr("out_dir", str(out_dir))

        def epoch_end(metrics: dict) -> None:
            trial.report(metrics["val/nll"], metrics["epoch"] - 1)
            if metrics["epoch"] < cfg.epochs and time.time() > deadline:
                trial.study.enqueue_trial(params, user_attrs={"resumes": trial.number})
                raise BudgetSpent(f"trial {trial.number}: budget spent after epoch {metrics['epoch']}")
            if metrics["epoch"] < cfg.epochs and trial.should_prune():  # a finished run is scored, not pruned
                raise optuna.TrialPruned(f"val/nll {metrics['val/nll']:.4f} at epoch {metrics['epoch']}")

        result = train(cfg, resume=find_checkpoint(out_dir / "checkpoint") is not None, progress=progress,
                       epoch_end=epoch_end)
        last = result.history[-1]
        summary = calibrate_on_validation(result.model, *result.val, progress=False)
        calibration = summary["calibration"]
        trial.set_user_attr("val/acc@0.5", last["val/acc"])
        trial.set_user_attr("val/nll", last["val/nll"])
        trial.set_user_attr("val/ece_calibrated", calibration["val_ece_after"])
        trial.set_user_attr("threshold", summary["thresholds"]["chosen"])
        trial.set_user_attr("threshold_rule", calibration["threshold_rule"])
        trial.set_user_attr("train_seconds", last["train_seconds"])
        return calibration["val_nll_after"]

    return objective


def results_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: finished ones first, best (lowest calibrated validation NLL) first; a pruned trial shows the
    uncalibrated validation NLL it was stopped on, and after which epoch."""
    rows = []
    for t in study.trials:
        complete = t.state == TrialState.COMPLETE
        last_epoch = max(t.intermediate_values) if t.intermediate_values else None
        row = {"trial": t.number, "state": t.state.name, "val/nll_calibrated": t.value if complete else None,
               "stopped at (epoch: val/nll)": None if complete or last_epoch is None else
               f"{last_epoch + 1}: {t.intermediate_values[last_epoch]:.4f}"}
        row.update({f"{name} ({SEARCH_SPACE[name][0]})": t.params.get(name) for name in SEARCH_SPACE})
        row.update({k: t.user_attrs.get(k) for k in ("val/acc@0.5", "val/nll", "val/ece_calibrated", "threshold",
                                                     "train_seconds")})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["val/nll_calibrated"] is None, r["val/nll_calibrated"] or 0, r["trial"]))


def write_results(study: optuna.Study, out: Path, command: str) -> Path | None:
    """The table (``out`` + a .json twin) and the importance plot (``out`` stem + ``-importance.png``, returned;
    None with fewer than two finished trials)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = results_rows(study)
    spent = study.user_attrs.get(SPENT_KEY, 0.0)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    keys = list(rows[0]) if rows else ["trial"]
    lines = [f"# Optuna study: {study.study_name}", "", f"Command: `{command}`", "",
             f"Scored on the validation split carved from train (calibrated NLL, lower is better). {len(done)} "
             f"finished of {len(rows)} trials, {spent / 60:.1f} minutes spent.", ""]
    plot = None
    if len(done) >= 2:
        importances = optuna.importance.get_param_importances(study)
        lines += [f"Parameter importance (fANOVA over the {len(done)} finished trials; few trials make it a rough "
                  "guide): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()), ""]
        plot = out.with_name(out.stem + "-importance.png")
        plot_importances(importances, plot, study.study_name)
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                                       for v in row.values()) + " |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "seconds_spent": spent, "trials": rows},
                                                   indent=2) + "\n")
    return plot


def plot_importances(importances: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.2))
    ax.barh([f"{n} ({SEARCH_SPACE[n][0]})" for n in names], [importances[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance (fANOVA, share of the validation-NLL variance)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(config: str, overrides: list[str], budget_minutes: float, storage: str, root: Path,
              trials: int | None = None, seed: int = 0, progress: bool = False) -> optuna.Study:
    """Run (or continue) the study until ``budget_minutes`` in all are spent or ``trials`` more have run."""
    name = load_config(config, overrides).name
    study = open_study(storage, name, seed)
    spent = study.user_attrs.get(SPENT_KEY, 0.0)
    remaining = budget_minutes * 60 - spent
    if remaining <= 0:
        print(f"study {name}: its budget of {budget_minutes} minutes is spent ({spent / 60:.1f} min)")
        return study
    start = time.time()
    deadline = start + remaining

    def keep_time(study: optuna.Study, trial) -> None:  # after every trial: the seconds survive a kill
        study.set_user_attr(SPENT_KEY, spent + time.time() - start)

    try:
        study.optimize(make_objective(config, overrides, root, deadline, progress), n_trials=trials,
                       timeout=remaining, catch=(BudgetSpent,), callbacks=[keep_time])
    finally:
        study.set_user_attr(SPENT_KEY, spent + time.time() - start)
    return study


def main(argv: list[str] | None = None, prog: str = "python -m train.optuna_search") -> optuna.Study:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="an autoencoder detector's TrainConfig (train/configs/autoencoder/*.yaml)")
    parser.add_argument("--budget-minutes", type=float, required=True,
                        help="minutes the whole study may take, over every invocation")
    parser.add_argument("--trials", type=int, help="at most this many trials in this invocation")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides shared by all trials")
    parser.add_argument("--storage", help="SQLite file of the study (default runs/optuna/NAME.db)")
    parser.add_argument("--root", help="folder of the trials' runs (default runs/optuna/NAME)")
    parser.add_argument("--out", help="results table (default train/results/optuna-NAME.md)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0:
        parser.error("--budget-minutes must be > 0")
    cfg = load_config(args.config, args.set)
    if not cfg.model_config().decoder_widths:
        parser.error(f"{args.config}: not an autoencoder detector (model.decoder_widths is empty); the study searches "
                     "its loss weights")
    storage = args.storage or f"runs/optuna/{cfg.name}.db"
    root = Path(args.root or f"runs/optuna/{cfg.name}")
    study = run_study(args.config, args.set, args.budget_minutes, storage, root, args.trials, args.seed,
                      progress=True)
    out = Path(args.out or f"train/results/optuna-{cfg.name}.md")
    plot = write_results(study, out, shlex.join([*shlex.split(prog), *argv]))
    print(out.read_text())
    if plot:
        print(f"importance plot: {plot}")
    return study


if __name__ == "__main__":
    main()
