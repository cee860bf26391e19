"""Know when not to answer: the released detectors' domain gate, certified abstention and laundering results, the
headline over all CIFAKE detectors on off-domain images, and what the gate costs.

    python benchmarks/bench_domain.py [--wild ../shared/data/wild] [--cifake-images 2000] [--batch 64]
        [--repeats 7] [--output benchmarks/results_domain.md]

1. Per released detector, from its ``eval_report.json`` (written by ``bash scripts/release.sh NAME``, T = the
   detector's own): test accuracy; the share answered on CIFAKE test and the accuracy among the answered (the
   guarantee: >= 99% at alpha = 0.01); domain-score AUROC of wild (train + test) against CIFAKE test; the share of
   wild images that get "outside" or "uncertain"; answered share and accuracy under each laundering.
2. The headline (``hub_models.headline``) over all selected CIFAKE detectors, each run as users run it (processor on
   the file, ``domain_pixel_values`` passed): on every wild image (target: abstains on >= 95%) and on the first
   ``--cifake-images`` CIFAKE test images (how often it answers, and how often it is right).
3. The gate's cost: ``model(x, num_samples=T)`` with the gate against the same model with the gate detached, back to
   back at batch ``--batch``, median of ``--repeats``; the extra pass named (target: <= 5% where the detector's own
   features carry the gate; one small backbone pass otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub_models import BayesFakeImageProcessor  # noqa: E402
from hub_models.headline import ANSWERS, headline  # noqa: E402
from hub_models.hub import HUB_MODELS_DIR, OPT_IN, RELEASED  # noqa: E402
from train.data import raw_splits  # noqa: E402

WILD = ROOT.parent / "shared" / "data" / "wild"
CIFAKE = ROOT.parent / "shared" / "data" / "cifake"
LAUNDERINGS = ("jpeg75", "jpeg50", "downup0.5", "crop75", "blur1")


def pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def detector_rows(names: list[str]) -> list[str]:
    header = ["detector", "version", "test acc.", "answered (test)", "acc. answered (test)", "domain AUROC wild",
              "wild: outside", "wild: uncertain", "wild: outside or uncertain"]
    header += [f"{kind}: answered / acc. answered" for kind in LAUNDERINGS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        report = json.loads((HUB_MODELS_DIR / name / "eval_report.json").read_text())
        config = json.loads((HUB_MODELS_DIR / name / "config.json").read_text())
        stress, metrics = report.get("stress") or {}, report["metrics"]
        wild = stress.get("wild", {})
        refused = (wild.get("ood/outside_share") or 0) + (wild.get("sc/review_share") or 0) if wild else None
        auroc = wild.get("ood/auroc")
        row = [name, config.get("release_version"), pct(metrics.get("cls/acc")), pct(metrics.get("sc/coverage")),
               pct(metrics.get("sc/answered_acc")), "n/a" if auroc is None else f"{auroc:.4f}",
               pct(wild.get("ood/outside_share")), pct(wild.get("sc/review_share")), pct(refused)]
        for kind in LAUNDERINGS:
            m = stress.get(f"laundered/{kind}", {})
            row.append(f"{pct(m.get('sc/coverage'))} / {pct(m.get('sc/answered_acc'))}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


def load(name: str):
    from transformers import AutoModel

    folder = HUB_MODELS_DIR / name
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    return model, BayesFakeImageProcessor.from_config(model.config)


def shard_digest(folder: Path, shard: str) -> str | None:
    """sha1 of a release's weight shard: detectors whose backbone (or gate extractor) shard is byte-identical compute
    the same features, so the benchmark computes them once."""
    import hashlib

    path = folder / shard
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None


@torch.no_grad()
def verdicts_of(name: str, model, processor, sources: list, batch: int, shared: dict) -> list[str]:
    """Each image's verdict, as ``model(**processor(files))`` gives it. Frozen backbone features (the Lite0 heads) and
    gate extractor features (the detectors shipping the same frozen Lite0) are computed once per image and reused
    through ``forward_features`` / ``domain_features``: the same numbers (tested), a fraction of the time."""
    folder = HUB_MODELS_DIR / name
    own = model.config.domain_gate == "features" and model.config.backbone != "bayesfake_cnn"
    key = (shard_digest(folder, "model-backbone.safetensors") if own
           else shard_digest(folder, "model-domain-extractor.safetensors"))
    words = []
    for start in range(0, len(sources), batch):
        inputs = processor(sources[start:start + batch])
        cache_key = (key, id(sources), start)
        if own:
            if cache_key not in shared:
                shared[cache_key] = model.backbone(inputs["pixel_values"])
            out = model.forward_features(shared[cache_key])
        elif "domain_pixel_values" in inputs and key is not None:
            if cache_key not in shared:
                shared[cache_key] = model.domain_gate.features(inputs["domain_pixel_values"])
            out = model(inputs["pixel_values"], domain_features=shared[cache_key])
        else:
            out = model(**inputs)
        words += model.verdicts(out)
    return words


def headline_rows(names: list[str], sets: dict[str, tuple[list, np.ndarray]], batch: int) -> tuple[list[str], dict]:
    per_detector, shared = {}, {}
    for name in names:
        model, processor = load(name)
        per_detector[name] = {key: verdicts_of(name, model, processor, sources, batch, shared)
                              for key, (sources, _) in sets.items()}
        print(f"  {name}: done", flush=True)
    lines = ["| image set | images | headline answered | headline accuracy among answered | headline uncertain | "
             "headline outside (no detector in domain) |", "|---|---|---|---|---|---|"]
    summary = {}
    for key, (sources, labels) in sets.items():
        heads = [headline({name: per_detector[name][key][i] for name in names}) for i in range(len(sources))]
        answered = np.array([h.verdict in ANSWERS for h in heads])
        predicted = np.array([1 if h.verdict == ANSWERS[0] else 0 for h in heads])
        correct = (predicted == labels) & answered
        outside = np.array([not h.answered and not h.abstained for h in heads])
        summary[key] = {"answered": float(answered.mean()), "abstained": float(1 - answered.mean()),
                        "accuracy_answered": float(correct.sum() / answered.sum()) if answered.any() else None}
        lines.append(f"| {key} | {len(sources)} | {pct(answered.mean())} | "
                     f"{pct(summary[key]['accuracy_answered'])} | {pct((~answered & ~outside).mean())} | "
                     f"{pct(outside.mean())} |")
    return lines, summary


def gate_cost_rows(names: list[str], batch: int, repeats: int) -> list[str]:
    lines = ["| detector | gate reads | predictive T | with gate (ms / batch) | without (ms / batch) | ratio |",
             "|---|---|---|---|---|---|"]
    generator = torch.Generator().manual_seed(0)
    for name in names:
        model, processor = load(name)
        cfg = model.config
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
        extra = {}
        if processor.domain_size is not None:
            extra["domain_pixel_values"] = torch.randn(batch, 3, processor.domain_size, processor.domain_size,
                                                       generator=generator)
        gate = model.domain_gate

        def with_gate():
            model.domain_gate = gate
            model(x, **extra)

        def without_gate():
            model.domain_gate = None
            model(x)

        with torch.no_grad():
            with_gate(), without_gate()  # warm-up
            times = {"with": [], "without": []}
            for _ in range(repeats):
                for key, fn in (("with", with_gate), ("without", without_gate)):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
        model.domain_gate = gate
        w, wo = statistics.median(times["with"]), statistics.median(times["without"])
        ratios = [a / b for a, b in zip(times["with"], times["without"])]
        reads = ("its own backbone features (Mahalanobis only)" if cfg.domain_gate == "features" else
                 f"a frozen {cfg.domain_gate} at {cfg.domain_image_size} px (one extra backbone pass)")
        lines.append(f"| {name} | {reads} | {cfg.num_samples} | {1000 * w:.1f} | {1000 * wo:.1f} | "
                     f"{statistics.median(ratios):.3f}x |")
        print(f"  {name}: {statistics.median(ratios):.3f}x", flush=True)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wild", default=str(WILD))
    parser.add_argument("--cifake-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--names", nargs="*", help="released detectors (default: every one run by default, i.e. not "
                        "opt-in)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results_domain.md"))
    args = parser.parse_args(argv)
    names = args.names or [name for name in RELEASED if name not in OPT_IN]
    # Opt-in detectors trained on CIFAKE alone answer to the same targets: their rows come from their reports (cheap);
    # they stay out of the headline and the gate cost, which measure what runs by default.
    opt_in_rows = [name for name in OPT_IN if name not in names
                   and json.loads((HUB_MODELS_DIR / name / "config.json").read_text()).get("training_data") == ["cifake"]]
    started = time.time()

    print("headline: running every detector on the image sets", flush=True)
    wild = [item for split in raw_splits(args.wild).values() for item in split]
    cifake = raw_splits(str(CIFAKE))["test"][:args.cifake_images]
    sets = {"wild (real photos + 12 generators, full size)": ([s for s, _ in wild], np.array([l for _, l in wild])),
            f"CIFAKE test (first {len(cifake)})": ([s for s, _ in cifake], np.array([l for _, l in cifake]))}
    head_lines, _ = headline_rows(names, sets, args.batch)
    print("gate cost", flush=True)
    cost_lines = gate_cost_rows(names, args.batch, args.repeats)

    command = "python benchmarks/bench_domain.py" + (" " + " ".join(argv or sys.argv[1:]) if (argv or sys.argv[1:])
                                                     else "")
    text = "\n".join([
        "# Know when not to answer: domain gate, certified abstention, laundering",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; `{command}` ({time.time() - started:.0f} s).",
        "",
        "## Per detector (from each release's eval_report.json, written by `bash scripts/release.sh NAME`)",
        "",
        "Answered: the share given a verdict (in domain and certain enough); the reject rule is certified so that with "
        "probability >= 90% at most 1% of answered in-domain images are wrong. Laundered sets: 2,000 CIFAKE test "
        "images each.",
        "",
        *detector_rows(names),
        "",
        *([f"Opt-in, trained on CIFAKE alone (run only when named; not in the headline or gate-cost sections below):",
           "", *detector_rows(opt_in_rows), ""] if opt_in_rows else []),
        "## The headline over all selected detectors (hub_models.headline)",
        "",
        *head_lines,
        "",
        f"## What the gate costs (batch {args.batch}, median of {args.repeats}, with and without the gate back to back)",
        "",
        *cost_lines,
        "",
    ])
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
