"""Does judging a few degraded copies, and abstaining when they disagree, help? (issue 13: "if scoring a few degraded
copies and abstaining when they disagree helps measurably, ship it as an option")

    OMP_NUM_THREADS=1 python benchmarks/bench_copies.py [--val-images 200] [--test-images 2000] [--timing-images 100]
        [--names ...] [--output benchmarks/results_copies.md]

The rule is ``hub_models.copies`` (answer only when the original's answer is also every degraded copy's verdict; the
copies are made from the original image; an "outside" or "uncertain" original stands). All 8 released detectors, each
at its own T (``config.num_samples``) and seed, as users run them (their processor on the image; the gate's own
128 px input resized from the original).

## The criterion, written down before anything was measured

Stage 1 chooses the copy kinds on VALIDATION only (the releases' recorded split: 5% of CIFAKE train, seed 0; a seeded
subset of ``--val-images``, clean and under each of the five launderings of ``train.laundering``): among the subsets of
at most 3 kinds of ``hub_models.copies.COPY_KINDS``, the one with the highest answered accuracy pooled over the
laundered validation sets and the detectors that answer at all (a certified reject rule), subject to no such detector
losing more than 5 points of clean validation coverage (share answered); ties go to fewer kinds.

Stage 2 measures that choice on TEST (the 2,000-image seeded subset of CIFAKE test that the release evaluation
launders, clean and under each laundering) and on wild (all 1,635 images, train + test). The option **helps
measurably** only if all of C1-C3 hold (C4 holds by construction and is checked):

- C1 (fewer wrong answers, not by chance): pooled over the detectors that answer and the five laundered test sets, the
  wrong answers fall by at least a quarter, and the answers the copies withdraw are wrong more often than the ones
  they keep (one-sided Fisher exact test, p < 0.01);
- C2 (where it is needed): in at least 80% of the (detector, laundered set) cells whose single-copy answered accuracy
  is below 99%, the answered accuracy rises; in no cell (clean, laundered or wild, with at least 50 answers) does it
  fall by more than 0.5 points;
- C3 (affordable on clean images): on clean CIFAKE test no answering detector's answered accuracy falls by more than
  0.2 points, and none loses more than 10 points of coverage (the cost in coverage is stated per detector);
- C4 (never less careful off-domain): on wild, no detector's "outside or uncertain" share falls, nor the headline's
  abstentions over all the detectors run.
The time cost is stated, not judged: the wall time of ``verdicts_with_copies`` against the detector alone on
``--timing-images`` clean test images, and the copies judged per image on every set.

Long work is resumable: each (stage, detector, image set) writes its verdicts to ``runs/bench_copies/`` as it
finishes, and a rerun reuses them (remove the folder to measure again).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import fisher_exact
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub_models.copies import (ANSWERS, COPY_KINDS, DEFAULT_COPIES, combine_verdicts,  # noqa: E402
                               detector_verdicts, judge_with_copies, verdicts_with_copies)
from hub_models.headline import headline  # noqa: E402
from hub_models.hub import HUB_MODELS_DIR, RELEASED, load_detector  # noqa: E402
from hub_models.image_processing_bayesfake import BayesFakeImageProcessor  # noqa: E402
from hub_models.modeling_bayesfake import VERDICT_OUTSIDE, VERDICT_UNSURE  # noqa: E402
from train.data import decode_images, indices_sha256, raw_splits, validation_indices  # noqa: E402
from train.laundering import LAUNDERINGS, launder_images  # noqa: E402

WILD = ROOT.parent / "shared" / "data" / "wild"
CIFAKE = ROOT.parent / "shared" / "data" / "cifake"
STATE = ROOT / "runs" / "bench_copies"
MAX_KINDS = 3
MAX_CLEAN_COVERAGE_LOSS = 0.05  # stage 1's constraint, per answering detector, on clean validation
EXAMPLE_COPIES = ("jpeg75", "downup0.5", "crop90")  # the example set: its validation row is always shown
BATCH = 64


def pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


# ----------------------------------------------------------------------------------------------------------------------
# Image sets


def decode_native(items: list) -> tuple[np.ndarray, np.ndarray]:
    """CIFAKE items decoded at their own 32 px (the release evaluation launders them at that size)."""
    (images, labels), skipped = decode_images(items, BayesFakeImageProcessor(size=32), "decode")
    if skipped:
        raise ValueError(f"{skipped} CIFAKE images could not be decoded")
    return images, labels


def cifake_sets(items: list, prefix: str) -> dict[str, tuple[list, np.ndarray]]:
    """{"PREFIX/clean", "PREFIX/<laundering>"...} -> (uint8 32 px images, labels)."""
    images, labels = decode_native(items)
    sets = {f"{prefix}/clean": (list(images), labels)}
    for kind in LAUNDERINGS:
        sets[f"{prefix}/{kind}"] = (list(launder_images(images, kind)), labels)
    return sets


def validation_sets(n: int) -> dict:
    """A seeded subset of ``n`` images of the releases' validation split (5% of CIFAKE train, seed 0), checked against
    the split the releases recorded."""
    train = raw_splits(str(CIFAKE))["train"]
    labels = np.array([label for _, label in train])
    val = validation_indices(labels, 0.05, 0)
    recorded = json.loads((HUB_MODELS_DIR / "cifake-mcdropout-cnn" / "train_history.json").read_text())["split"]
    if indices_sha256(val) != recorded["val_sha256"]:
        raise ValueError("the validation split re-derived here is not the one the releases recorded")
    keep = np.sort(np.random.default_rng(0).choice(val, size=min(n, len(val)), replace=False))
    return cifake_sets([train[i] for i in keep], "val")


def test_sets(n: int, wild: Path, wild_n: int = 0) -> dict:
    """The seeded subset of CIFAKE test that ``train.offdomain.stress_sets`` launders (seed 0), and all of wild."""
    test = raw_splits(str(CIFAKE))["test"]
    keep = np.sort(np.random.default_rng(0).choice(len(test), size=min(n, len(test)), replace=False))
    sets = cifake_sets([test[i] for i in keep], "test")
    items = [item for split in raw_splits(str(wild)).values() for item in split][:wild_n or None]
    sets["wild"] = ([source for source, _ in items], np.array([label for _, label in items]))
    return sets


# ----------------------------------------------------------------------------------------------------------------------
# Verdicts, with one frozen Lite0 pass per distinct image shared by every detector


class SharedFeatures:
    """The frozen ImageNet EfficientNet-Lite0 at 128 px is the backbone of the five Lite0 heads and the domain gate's
    extractor of the three CNN releases: the same weights and the same 128 px input (checked: identical features), so
    it runs once per distinct image (keyed by its 128 px pixels) and every detector reuses it. Only a speed-up: the
    verdicts are ``model.verdicts(model(**processor(images)))``'s (``forward_features`` / ``domain_features``)."""

    def __init__(self):
        self.cache: dict[str, torch.Tensor] = {}
        self.digest = None

    def __call__(self, pixels: torch.Tensor, net, digest: str) -> torch.Tensor:
        if self.digest not in (None, digest):
            raise ValueError("SharedFeatures: two different extractors")
        self.digest = digest
        keys = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in pixels]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            with torch.inference_mode():
                features = net(pixels[missing])
            for i, row in zip(missing, features):
                self.cache[keys[i]] = row
        return torch.stack([self.cache[key] for key in keys])


def lite0_digest(model) -> str:
    net = model.backbone.model if model.config.domain_gate == "features" else model.domain_gate.extractor
    digest = hashlib.sha1()
    for key, tensor in sorted(net.state_dict().items()):
        digest.update(key.encode() + tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def shared_verdicts(model, processor, shared: SharedFeatures, digest: str):
    """``verdicts_of`` for ``hub_models.copies.judge_with_copies``, through the shared Lite0 features."""
    own = model.config.domain_gate == "features"

    def verdicts_of(images: list) -> list[str]:
        words = []
        for start in range(0, len(images), BATCH):
            inputs = processor(images[start:start + BATCH])
            with torch.inference_mode():
                if own:
                    out = model.forward_features(shared(inputs["pixel_values"], model.backbone, digest))
                else:
                    features = shared(inputs["domain_pixel_values"], model.domain_gate.features, digest)
                    out = model(inputs["pixel_values"], domain_features=features)
            words += model.verdicts(out)
        return words

    return verdicts_of


def judged(state: Path, stage: str, name: str, set_name: str, images: list, kinds: tuple, verdicts_of) -> dict:
    """{"original", "copies"} of one detector on one set, from the resume state or measured (in chunks, with a
    progress bar) and saved."""
    path = state / stage / f"{name}__{set_name.replace('/', '_')}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["kinds"] == list(kinds) and saved["n"] == len(images):
            return saved
    result = {"kinds": list(kinds), "n": len(images), "original": [], "copies": [], "seconds": 0.0}
    start = time.perf_counter()
    for lo in tqdm(range(0, len(images), 256), desc=f"{name} {set_name}", unit="chunk", mininterval=10):
        judgement = judge_with_copies(verdicts_of, images[lo:lo + 256], kinds)
        result["original"] += judgement.original
        result["copies"] += judgement.copies
    result["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def run_all(state: Path, stage: str, names: list[str], sets: dict, kinds_of) -> dict:
    """{detector: {set: judged}}; ``kinds_of(model)``: the copy kinds to judge for that detector."""
    shared, results = SharedFeatures(), {}
    for name in names:
        model, processor = load_detector(HUB_MODELS_DIR / name)
        verdicts_of = shared_verdicts(model, processor, shared, lite0_digest(model))
        kinds = kinds_of(model)
        results[name] = {key: judged(state, stage, name, key, images, kinds, verdicts_of)
                         for key, (images, _) in sets.items()}
        print(f"  {name}: done ({len(shared.cache)} Lite0 feature rows cached)", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Outcomes


def rule_verdicts(result: dict, kinds: tuple) -> list[str]:
    return [combine_verdicts(o, [c[k] for k in kinds] if c else []) for o, c in zip(result["original"],
                                                                                  result["copies"])]


def outcome(verdicts: list[str], labels: np.ndarray) -> dict:
    words = np.array(verdicts)
    answered = np.isin(words, ANSWERS)
    wrong = answered & ((words == ANSWERS[0]).astype(int) != labels)
    n = int(answered.sum())
    return {"n": len(words), "answered": n, "wrong": int(wrong.sum()), "coverage": n / len(words),
            "accuracy": 1 - wrong.sum() / n if n else None,
            "refused": float(np.isin(words, (VERDICT_OUTSIDE, VERDICT_UNSURE)).mean())}


def answering(names: list[str]) -> list[str]:
    certified = []
    for name in names:
        config = json.loads((HUB_MODELS_DIR / name / "config.json").read_text())
        if (config.get("abstention") or {}).get("certified") is not False:
            certified.append(name)
    return certified


def choose(results: dict, sets: dict, names: list[str]) -> tuple[tuple, list[str]]:
    """Stage 1's rule (module docstring) over every subset of at most ``MAX_KINDS`` kinds; the table of candidates."""
    laundered = [key for key in sets if not key.endswith("/clean")]
    rows, best = [], None
    for k in range(1, MAX_KINDS + 1):
        for kinds in itertools.combinations(COPY_KINDS, k):
            loss = max(outcome(rule_verdicts(results[n]["val/clean"], ()), sets["val/clean"][1])["coverage"]
                       - outcome(rule_verdicts(results[n]["val/clean"], kinds), sets["val/clean"][1])["coverage"]
                       for n in names)
            answered = wrong = 0
            for n in names:
                for key in laundered:
                    o = outcome(rule_verdicts(results[n][key], kinds), sets[key][1])
                    answered, wrong = answered + o["answered"], wrong + o["wrong"]
            accuracy = 1 - wrong / answered if answered else 0.0
            feasible = loss <= MAX_CLEAN_COVERAGE_LOSS
            rows.append((kinds, loss, accuracy, answered, feasible))
            if feasible and (best is None or accuracy > best[2] + 1e-12):
                best = rows[-1]
    single = [0, 0]
    for n in names:
        for key in laundered:
            o = outcome(rule_verdicts(results[n][key], ()), sets[key][1])
            single = [single[0] + o["answered"], single[1] + o["wrong"]]
    lines = [f"Single copy (no copies): pooled laundered answered accuracy {pct(1 - single[1] / single[0])} "
             f"({single[0]} answers).", "",
             "| copies | largest clean coverage loss | pooled laundered answered accuracy | answers | allowed |",
             "|---|---|---|---|---|"]
    for kinds, loss, accuracy, answered, feasible in sorted(rows, key=lambda r: (-r[4], -r[2], len(r[0]))):
        mark = " **(chosen)**" if best is not None and kinds == best[0] else ""
        lines.append(f"| {', '.join(kinds)}{mark} | {100 * loss:.1f} pts | {pct(accuracy)} | {answered} | "
                     f"{'yes' if feasible else 'no'} |")
    if best is None:
        raise ValueError("no subset of copies keeps the clean validation coverage loss within bounds")
    return best[0], lines


def test_tables(results: dict, sets: dict, names: list[str], kinds: tuple) -> tuple[list[str], dict]:
    """Per detector and set: single vs with copies; the criterion's figures."""
    header = ["detector", "set", "single: answered", "single: acc. answered", "copies: answered",
              "copies: acc. answered", "coverage cost", "wrong answers (single -> copies)", "copies judged / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    figures = {"cells": []}
    for name in names:
        for key, (_, labels) in sets.items():
            result = results[name][key]
            single, multi = outcome(rule_verdicts(result, ()), labels), outcome(rule_verdicts(result, kinds), labels)
            judged_copies = sum(len(c) for c in result["copies"]) / len(labels)
            figures["cells"].append({"detector": name, "set": key, "single": single, "copies": multi})
            extra = (f" (outside or uncertain {pct(single['refused'])} -> {pct(multi['refused'])})"
                     if key == "wild" else "")
            lines.append(f"| {name} | {key}{extra} | {pct(single['coverage'])} | {pct(single['accuracy'])} | "
                         f"{pct(multi['coverage'])} | {pct(multi['accuracy'])} | "
                         f"{100 * (single['coverage'] - multi['coverage']):.1f} pts | {single['wrong']} -> "
                         f"{multi['wrong']} | {judged_copies:.2f} |")
    return lines, figures


def headline_table(results: dict, sets: dict, names: list[str], kinds: tuple) -> list[str]:
    lines = ["| set | single: headline answered | single: acc. answered | copies: headline answered | "
             "copies: acc. answered |", "|---|---|---|---|---|"]
    for key, (_, labels) in sets.items():
        row = [key]
        for rule in ((), kinds):
            per = {n: rule_verdicts(results[n][key], rule) for n in names}
            heads = [headline({n: per[n][i] for n in names}).verdict for i in range(len(labels))]
            o = outcome(heads, labels)
            row += [pct(o["coverage"]), pct(o["accuracy"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def criterion(figures: dict, names: list[str]) -> tuple[bool, list[str]]:
    """C1-C4 of the module docstring, each with its figures."""
    cells = [c for c in figures["cells"] if c["detector"] in names]
    laundered = [c for c in cells if c["set"].startswith("test/") and not c["set"].endswith("/clean")]
    single_wrong = sum(c["single"]["wrong"] for c in laundered)
    multi_wrong = sum(c["copies"]["wrong"] for c in laundered)
    withdrawn = sum(c["single"]["answered"] - c["copies"]["answered"] for c in laundered)
    withdrawn_wrong = single_wrong - multi_wrong
    kept, kept_wrong = sum(c["copies"]["answered"] for c in laundered), multi_wrong
    p = fisher_exact([[withdrawn_wrong, withdrawn - withdrawn_wrong], [kept_wrong, kept - kept_wrong]],
                     alternative="greater").pvalue if withdrawn else 1.0
    fall = 1 - multi_wrong / single_wrong if single_wrong else 0.0
    c1 = fall >= 0.25 and p < 0.01
    needy = [c for c in laundered if c["single"]["accuracy"] is not None and c["single"]["accuracy"] < 0.99]
    rose = [c for c in needy
            if c["copies"]["accuracy"] is not None and c["copies"]["accuracy"] > c["single"]["accuracy"]]
    worse = [c for c in cells if c["copies"]["answered"] >= 50 and c["single"]["accuracy"] is not None
             and c["copies"]["accuracy"] < c["single"]["accuracy"] - 0.005]
    c2 = bool(needy) and len(rose) >= 0.8 * len(needy) and not worse
    clean = [c for c in cells if c["set"] == "test/clean"]
    c3_acc = [c for c in clean if c["single"]["accuracy"] is not None and c["copies"]["accuracy"] is not None
              and c["copies"]["accuracy"] < c["single"]["accuracy"] - 0.002]
    c3_cov = [c for c in clean if c["single"]["coverage"] - c["copies"]["coverage"] > 0.10]
    c3 = not c3_acc and not c3_cov
    wild = [c for c in figures["cells"] if c["set"] == "wild"]
    c4 = all(c["copies"]["refused"] >= c["single"]["refused"] for c in wild)
    lines = [
        f"- C1: pooled over {len(names)} answering detectors x 5 laundered test sets, wrong answers {single_wrong} -> "
        f"{multi_wrong} ({100 * fall:.0f}% fewer; needed >= 25%); the {withdrawn} answers withdrawn were wrong "
        f"{withdrawn_wrong} times ({pct(withdrawn_wrong / withdrawn if withdrawn else None)}), the {kept} kept "
        f"{kept_wrong} times ({pct(kept_wrong / kept if kept else None)}); one-sided Fisher exact p = {p:.2g} "
        f"(needed < 0.01): **{'holds' if c1 else 'fails'}**.",
        f"- C2: answered accuracy rose in {len(rose)} of the {len(needy)} laundered cells below 99% (needed >= 80%); "
        f"cells where it fell by more than 0.5 points: "
        f"{', '.join(c['detector'] + ' ' + c['set'] for c in worse) or 'none'}: **{'holds' if c2 else 'fails'}**.",
        f"- C3: clean test answered accuracy fell by more than 0.2 points for "
        f"{', '.join(c['detector'] for c in c3_acc) or 'no detector'}; coverage cost per answering detector "
        + ", ".join(f"{c['detector']} {100 * (c['single']['coverage'] - c['copies']['coverage']):.1f} pts"
                    for c in clean)
        + f" (at most 10 allowed): **{'holds' if c3 else 'fails'}**.",
        f"- C4: wild 'outside or uncertain' share never fell (by construction: the rule only withdraws answers): "
        f"**{'holds' if c4 else 'fails'}**.",
    ]
    return c1 and c2 and c3 and c4, lines


def conclusion_lines(figures: dict, names: list[str], helps: bool) -> list[str]:
    """What the verdict means: the weakest answering cell before and after, and whether the option is offered."""
    laundered = [c for c in figures["cells"] if c["detector"] in names and c["set"].startswith("test/")
                 and not c["set"].endswith("/clean") and c["single"]["accuracy"] is not None]
    worst = min(laundered, key=lambda c: c["single"]["accuracy"])
    lines = [f"The weakest answering cell, {worst['detector']} on {worst['set']}, goes from "
             f"{pct(worst['single']['accuracy'])} to {pct(worst['copies']['accuracy'])} answered accuracy "
             f"({worst['single']['wrong']} -> {worst['copies']['wrong']} wrong answers): most wrong answers survive "
             "the copies."]
    if helps:
        lines.append("So it is offered as an option, off by default: `bayesfake score --copies` and the Space's "
                     "\"also judge degraded copies\" checkbox.")
    else:
        lines.append("So it is not offered: `bayesfake score` has no `--copies` flag and the Space no checkbox. "
                     "`hub_models.copies` stays as the rule measured here (for experiments and this benchmark); the "
                     "released detectors' outputs are unchanged.")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Cost


def timing_rows(names: list[str], images: list, kinds: tuple, repeats: int = 3) -> list[str]:
    """Wall time of the real path (no shared features): the detector alone against ``verdicts_with_copies``, back to
    back, median of ``repeats`` (the machine is shared: single timings wander by a third)."""
    lines = ["| detector | T | alone (s) | with copies (s) | slower by (median ratio) | copies judged / image |",
             "|---|---|---|---|---|---|"]
    for name in names:
        model, processor = load_detector(HUB_MODELS_DIR / name)
        alone = detector_verdicts(model, processor)
        alone(images[:8])  # warm-up
        times = {"alone": [], "copies": []}
        for _ in range(repeats):
            start = time.perf_counter()
            alone(images)
            times["alone"].append(time.perf_counter() - start)
            start = time.perf_counter()
            judgement = verdicts_with_copies(model, processor, images, kinds)
            times["copies"].append(time.perf_counter() - start)
        t_alone, t_copies = np.median(times["alone"]), np.median(times["copies"])
        ratio = np.median(np.array(times["copies"]) / np.array(times["alone"]))
        lines.append(f"| {name} | {model.config.num_samples} | {t_alone:.2f} | {t_copies:.2f} | "
                     f"{ratio:.2f}x | {judgement.copies_judged / len(images):.2f} |")
        print(f"  timing {name}: {ratio:.2f}x", flush=True)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--timing-images", type=int, default=100)
    parser.add_argument("--wild", default=str(WILD))
    parser.add_argument("--wild-images", type=int, default=0, help="only the first N wild images (default: all)")
    parser.add_argument("--state", default=str(STATE), help="where verdicts are kept for a resumed run")
    parser.add_argument("--names", nargs="*", help="released detectors (default: every bundled one)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results_copies.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    state = Path(args.state)
    names = args.names or list(RELEASED)
    certified = answering(names)
    started = time.time()

    print("stage 1: choose the copies on validation", flush=True)
    val = validation_sets(args.val_images)
    val_results = run_all(state, "val", certified, val, lambda model: tuple(COPY_KINDS))
    kinds, choice_lines = choose(val_results, val, certified)
    print(f"  chosen: {kinds} (hub_models.copies.DEFAULT_COPIES = {DEFAULT_COPIES})", flush=True)

    print("stage 2: test and wild", flush=True)
    sets = test_sets(args.test_images, Path(args.wild), args.wild_images)
    results = run_all(state, "test-" + "-".join(kinds), names, sets, lambda model: kinds)
    detail, figures = test_tables(results, sets, names, kinds)
    helps, verdict_lines = criterion(figures, certified)
    head_lines = headline_table(results, sets, names, kinds)
    print("cost", flush=True)
    clean = sets["test/clean"][0]  # spread over the subset: CIFAKE test is stored one class after the other
    clean_images = clean[::max(1, len(clean) // args.timing_images)][:args.timing_images]
    cost_lines = timing_rows(names, clean_images, kinds)

    val_seconds = sum(r["seconds"] for per in val_results.values() for r in per.values())
    measured = val_seconds + sum(r["seconds"] for per in results.values() for r in per.values())
    example_rows = [line for line in choice_lines[16:] if line.startswith(f"| {', '.join(EXAMPLE_COPIES)} |")]
    omitted = len(choice_lines[16:]) - len(example_rows)
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_copies.py" + (
        " " + " ".join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    summary = {"kinds": list(kinds), "default_copies": list(DEFAULT_COPIES), "helps": helps, "figures": figures}
    (state / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join([
        "# Judging degraded copies too: does it help?",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, 1 thread, torch "
        f"{torch.__version__}; `{command}`: the verdicts took {measured:.0f} s (validation {val_seconds:.0f} s, test "
        f"and wild {measured - val_seconds:.0f} s; kept in runs/bench_copies/, so a rerun reuses them), this run "
        f"{time.time() - started:.0f} s. The machine was shared with other jobs.",
        "",
        "The rule (`hub_models.copies`): judge the image; where that gives an answer, also judge one degraded copy per "
        "kind, each made from the original image, with the same detector, T and seed; answer only when every copy "
        "gives the same answer, else \"uncertain: needs human review\". \"Outside\" and \"uncertain\" stand. The "
        "criterion for \"helps measurably\" (C1-C4) was written in `benchmarks/bench_copies.py`'s docstring before "
        "anything was measured; it is repeated with its figures below.",
        "",
        f"## Verdict: {'it helps by the criterion' if helps else 'it does not help by the criterion'}",
        "",
        *verdict_lines,
        "",
        *conclusion_lines(figures, certified, helps),
        "",
        f"## Stage 1: the copies, chosen on validation ({args.val_images} images of the releases' validation split, "
        f"clean and laundered; the {len(certified)} detectors that answer: {', '.join(certified)})",
        "",
        f"Rule: the highest pooled answered accuracy on the laundered validation sets, with no detector losing more "
        f"than {100 * MAX_CLEAN_COVERAGE_LOSS:.0f} points of clean validation coverage, at most {MAX_KINDS} kinds. "
        f"Chosen: **{', '.join(kinds)}** (`hub_models.copies.DEFAULT_COPIES` = {', '.join(DEFAULT_COPIES)}).",
        "",
        *choice_lines[:16], *example_rows,
        f"| ... {omitted} other subsets of at most {MAX_KINDS} kinds, none better and allowed | | | | |"
        if omitted else "",
        "",
        f"## Stage 2: test ({args.test_images} CIFAKE test images, clean and laundered) and wild (1,635), T = each "
        "release's own",
        "",
        "Coverage cost: points of the set no longer answered. Copies judged / image: the extra detector passes (only "
        "images whose original gets an answer are copied).",
        "",
        *detail,
        "",
        f"## The headline over all {len(names)} detectors (hub_models.headline), single vs with copies",
        "",
        *head_lines,
        "",
        f"## Cost: wall time on {len(clean_images)} clean test images, the real path (processor + model, no shared "
        "features), 1 thread",
        "",
        *cost_lines,
        "",
    ])
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
