"""Cost of T-sample Monte Carlo inference, per head kind, against one deterministic pass and a naive loop of T passes.

    python benchmarks/bench_sampling.py [--batch 256] [--samples 30] [--repeats 11] [--naive-repeats 3]
        [--kinds 0 1 ...] [--output benchmarks/results_sampling.md]

For each head kind on the from-scratch CNN at its default (released) size, with 32x32 inputs, it times in eval mode under
``torch.no_grad``, after a warm-up, with as many threads as there are available cores:

* ``det``: one deterministic pass, ``model(x, num_samples=1, stochastic=False)``;
* ``pred``: the T-sample predictive, ``model(x, num_samples=T)`` (what users call);
* ``naive``: a Python loop of T full passes, ``model(x, num_samples=1)`` each.

``det`` and ``pred`` are timed back to back in each repeat, so that load from other processes hits both alike; the table
gives median times, the median of the per-repeat ratios pred / det, and naive / det as a ratio of medians (the naive loop
is T times slower, so it is timed fewer times). Target: pred / det <= 1.2 for head-only stochastic
models (the backbone runs once per image; only the head is sampled).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub_models.configuration_bayesfake import BayesFakeConfig  # noqa: E402
from hub_models.modeling_bayesfake import BayesFakeDetector  # noqa: E402

# (label, config overrides)
KINDS = [
    ("deterministic", dict(head="deterministic")),
    ("mc_dropout", dict(head="mc_dropout")),
    ("variational head, reparameterization", dict(head="variational", variational_scope="head",
                                                  variational_layer="reparameterization")),
    ("variational head, flipout", dict(head="variational", variational_scope="head", variational_layer="flipout")),
    ("variational all layers, reparameterization", dict(head="variational", variational_scope="all",
                                                        variational_layer="reparameterization")),
    ("variational all layers, flipout", dict(head="variational", variational_scope="all", variational_layer="flipout")),
]
TARGET = 1.2


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_kind(overrides: dict, batch: int, samples: int, repeats: int, naive_repeats: int, budget_s: float) -> dict:
    torch.manual_seed(0)
    model = BayesFakeDetector(BayesFakeConfig(**overrides)).eval()  # default widths, 32x32 inputs
    return bench_model(model, batch, samples, repeats, naive_repeats, budget_s)


def bench_model(model, batch: int, samples: int, repeats: int, naive_repeats: int, budget_s: float) -> dict:
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def det():
        model(x, num_samples=1, stochastic=False)

    def pred():
        model(x, num_samples=samples)

    def naive():
        for _ in range(samples):
            model(x, num_samples=1)

    times = {"det": [], "pred": [], "naive": []}
    with torch.no_grad():
        for fn in (det, pred, naive):  # warm-up: allocator, oneDNN primitive caches
            fn()
        start = time.perf_counter()
        for i in range(repeats):
            # det and pred back to back, so that each pair sees the same load; the (slow) naive loop less often.
            times["det"].append(timed(det))
            times["pred"].append(timed(pred))
            if i < naive_repeats:
                times["naive"].append(timed(naive))
            if i + 1 >= naive_repeats and time.perf_counter() - start > budget_s:
                break  # all-layer models cost T passes per predictive: stop at naive_repeats pairs
    med = {name: statistics.median(values) for name, values in times.items()}
    pair_ratios = [p / d for p, d in zip(times["pred"], times["det"])]
    return {
        **med,
        "pred_ratio": statistics.median(pair_ratios),
        "naive_ratio": med["naive"] / med["det"],
        "speedup": med["naive"] / med["pred"],
        "images_per_s": batch / med["pred"],
        "head_only": not model.backbone_stochastic,
        "widths": model.config.cnn_widths,
        "pairs": len(pair_ratios),
    }


def table(rows: list[tuple[str, dict]], samples: int) -> str:
    lines = [
        f"| head | det. pass (ms) | T={samples} predictive (ms) | predictive / det. | naive {samples} passes (ms) | "
        f"naive / det. | naive / predictive | T={samples} images/s | pairs | target <= {TARGET} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for label, r in rows:
        target = ("met" if r["pred_ratio"] <= TARGET else "MISSED") if r["head_only"] else "n/a"
        lines.append(
            f"| {label} | {1000 * r['det']:.1f} | {1000 * r['pred']:.1f} | {r['pred_ratio']:.2f} | "
            f"{1000 * r['naive']:.1f} | {r['naive_ratio']:.2f} | {r['speedup']:.2f} | {r['images_per_s']:.0f} | "
            f"{r['pairs']} | {target} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=11, help="timed det./predictive pairs per kind (median taken)")
    parser.add_argument("--naive-repeats", type=int, default=3, help="timed naive loops per kind (median taken)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="stop adding det./predictive pairs to a kind after this many seconds (at least --naive-repeats)")
    parser.add_argument("--kinds", nargs="*", type=int, help="indices into the kind list (default: all)")
    parser.add_argument("--released", nargs="*", default=[], metavar="NAME",
                        help="also time these released detectors (hub_models/NAME, trained weights, their own size)")
    parser.add_argument("--output", help="also write the results, with command, machine and date, to this Markdown file")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    kinds = [KINDS[i] for i in args.kinds] if args.kinds else KINDS
    rows = []
    for label, overrides in kinds:
        result = bench_kind(overrides, args.batch, args.samples, args.repeats, min(args.naive_repeats, args.repeats),
                            args.budget_s)
        rows.append((label, result))
        print(f"{label}: pred/det {result['pred_ratio']:.2f}, naive/det {result['naive_ratio']:.2f}", file=sys.stderr)
    for name in args.released:
        from hub_models.hub import load_detector

        model, _ = load_detector(name)
        result = bench_model(model.eval(), args.batch, args.samples, args.repeats,
                             min(args.naive_repeats, args.repeats), args.budget_s)
        rows.append((f"released `{name}` (widths {model.config.cnn_widths}, hidden {model.config.head_hidden})",
                     result))
        print(f"{name}: pred/det {result['pred_ratio']:.2f}, naive/det {result['naive_ratio']:.2f}", file=sys.stderr)
    widths = rows[0][1]["widths"]
    text = table(rows, args.samples)
    print(text)
    if args.output:
        command = "python benchmarks/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = f"""# Monte Carlo sampling cost

Command: `{command.strip()}`

Machine: {cores} CPU cores ({cpu_name()}), {torch.get_num_threads()} torch threads, torch {torch.__version__},
Python {platform.python_version()}; date {datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}.

Setup: from-scratch CNN, widths {widths}, linear head (rows "released": that detector as shipped); batch {args.batch} of 32x32 images; T={args.samples};
eval mode, `torch.no_grad()`, one warm-up; det. and predictive timed back to back up to {args.repeats} times (`pairs`;
fewer after {args.budget_s:.0f} s), times are medians, predictive / det. is the median of the per-pair ratios; the naive
loop is timed {min(args.naive_repeats, args.repeats)} times (median). `det.` is
`model(x, num_samples=1, stochastic=False)`; the predictive is `model(x, num_samples={args.samples})`; naive is
{args.samples} x `model(x, num_samples=1)`. Target: predictive / det. <= {TARGET} for head-only stochastic models.

"""
        Path(args.output).write_text(header + text + "\n")
    return text


if __name__ == "__main__":
    main()
