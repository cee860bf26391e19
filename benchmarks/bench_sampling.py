"""Cost of T-sample Monte Carlo inference, per head kind, against one deterministic pass and a naive loop of T passes;
the released detectors' sampling cost, the MC-Dropout CNN's throughput (int8 as released, and float), and adaptive sampling of
the all-layer variational CNN.

    python benchmarks/bench_sampling.py [--batch 256] [--samples 30] [--repeats 11] [--naive-repeats 3]
        [--kinds 0 1 ...] [--released NAME ...] [--batches 64 256] [--int8] [--adaptive-images N]
        [--output benchmarks/results_sampling.md]

For each head kind on the from-scratch CNN at its default (released) size, with 32x32 inputs, it times in eval mode under
``torch.no_grad``, after a warm-up, with as many threads as there are available cores:

* ``det``: one deterministic pass, ``model(x, num_samples=1, stochastic=False)``;
* ``pred``: the T-sample predictive, ``model(x, num_samples=T)`` (what users call);
* ``naive``: a Python loop of T full passes, ``model(x, num_samples=1)`` each.

``det`` and ``pred`` are timed back to back in each repeat, so that load from other processes hits both alike; the table
gives median times, the median of the per-repeat ratios pred / det, and naive / det as a ratio of medians (the naive loop
is T times slower, so it is timed fewer times). Target: pred / det <= 1.2 for head-only stochastic
models (the backbone runs once per image; only the head is sampled).

``--released NAME ...``: those detectors as shipped, det. and predictive back to back at each of ``--batches`` (target
<= 1.1 for head-only models). ``--int8``: the released MC-Dropout CNN's T-sample images/s at ``--batch`` with its
backbone in int8 as released (2.1.0: ``config.int8_backbone``) and with the same release's float weights, timed back to
back, with the gate's features given and with the gate's own Lite0 pass, and how far int8 moves P(FAKE) and the
verdicts on the CIFAKE test images. ``--adaptive-images N``: the released
all-layer VI CNN on the first N CIFAKE test images (0: skip) in batches of ``--batch``: one deterministic pass, the
fixed T-sample predictive and ``adaptive=True``, each over all N images, timed back to back per batch; cost is total
time over the deterministic pass's, agreement is of verdicts with the fixed T; plus the previous grouped-convolution
implementation of the fixed T-sample predictive, for comparison with today's loop of T passes.
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
import torch.nn.functional as F

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
RELEASED_TARGET = 1.1  # head-only released detectors, T=30 predictive / one deterministic pass
CNN_TARGET = 3000  # images/s of the released MC-Dropout CNN at T=30 on 2 cores
HEAD_ONLY_MC = ["cifake-mcdropout-cnn", "cifake-mobilenetv2-ft", "effnetlite0-mcd-mlp", "effnetlite0-mcd-deep",
                "effnetlite0-vi-linear", "cifake-ae-mobilenetv2",
                # opt-in releases (hub_models.hub.OPT_IN): the two full-size multi-view detectors
                "wild-effnetlite0-multiview", "wild-effnetlite2-multiview"]
CIFAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifake"


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


def bench_pairs(model, batch: int, samples: int, repeats: int, budget_s: float) -> dict:
    """det. and T-sample predictive of a released detector, back to back, on random inputs of its size."""
    size, views = model.config.image_size, model.config.num_views
    shape = (batch, 3, size, size) if views == 1 else (batch, views, 3, size, size)  # a multi-view detector's input
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    det = lambda: model(x, num_samples=1, stochastic=False)  # noqa: E731
    pred = lambda: model(x, num_samples=samples)  # noqa: E731
    dets, preds = [], []
    with torch.inference_mode():
        det(), pred()
        start = time.perf_counter()
        for _ in range(repeats):
            dets.append(timed(det))
            preds.append(timed(pred))
            if len(dets) >= 3 and time.perf_counter() - start > budget_s:
                break
    return {"det": statistics.median(dets), "pred": statistics.median(preds),
            "ratio": statistics.median([p / d for p, d in zip(preds, dets)]), "pairs": len(dets),
            "images_per_s": batch / statistics.median(preds)}


def released_table(names: list[str], batches: list[int], samples: int, repeats: int, budget_s: float) -> str:
    from hub_models.hub import load_detector

    lines = [f"| released detector | head | batch | det. pass (ms) | T={samples} predictive (ms) | predictive / det. | "
             f"T={samples} images/s | pairs | target <= {RELEASED_TARGET} |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for name in names:
        model, _ = load_detector(name)
        for batch in batches:
            r = bench_pairs(model.eval(), batch, samples, repeats, budget_s)
            head_only = model.config.stochastic and not model.backbone_stochastic
            target = ("met" if r["ratio"] <= RELEASED_TARGET else "MISSED") if head_only else "n/a"
            lines.append(f"| `{name}` | {model.config.head} | {batch} | {1000 * r['det']:.1f} | "
                         f"{1000 * r['pred']:.1f} | {r['ratio']:.2f} | {r['images_per_s']:.0f} | {r['pairs']} | "
                         f"{target} |")
            print(f"{name} batch {batch}: pred/det {r['ratio']:.2f}", file=sys.stderr)
    return "\n".join(lines)


def cifake_inputs(processor, split: str, count: int, seed: int | None = None) -> dict:
    """The processor's outputs (``pixel_values``, and ``domain_pixel_values`` for a gate with its own extractor) for
    ``count`` CIFAKE images of ``split`` (shuffled with ``seed``, else the first ones)."""
    import datasets

    ds = datasets.load_dataset(str(CIFAKE), split=split)
    ds = ds.shuffle(seed=seed) if seed is not None else ds
    ds = ds.select(range(min(count, len(ds))))
    return processor([row["image"] for row in ds], return_tensors="pt")


def int8_table(batch: int, samples: int, repeats: int, test_images: int) -> str:
    """The released MC-Dropout CNN (int8 backbone from 2.1.0, config.int8_backbone) against the same release's float
    weights (``dequantize()``), T-sample images/s at ``batch``: the predictive with the gate's features given
    (``domain_features``: the T-sample inference the target is about), and the whole call with the gate's own
    EfficientNet-Lite0 pass at 128 px (``domain_pixel_values``: what one upload costs)."""
    from hub_models.hub import load_detector

    name = "cifake-mcdropout-cnn"
    model, processor = load_detector(name)
    model.eval()
    if not model.is_quantized:
        raise SystemExit(f"{name} {model.config.release_version} is not an int8 release (config.int8_backbone)")
    int8, observers = model.backbone.__dict__["_int8"], model.backbone.int8_observers
    test = cifake_inputs(processor, "test", test_images)
    pixels, domain = test["pixel_values"], test["domain_pixel_values"]

    def use(kind: str) -> None:  # switch without rebuilding: dequantize() drops both, put them back for int8
        model.dequantize()
        if kind == "int8":
            model.backbone.int8_observers = observers
            model.backbone.__dict__["_int8"] = int8
            model.config.int8_backbone = True

    with torch.inference_mode():
        features = torch.cat([model.domain_gate.features(domain[i:i + 256]) for i in range(0, len(domain), 256)])
        outputs = {}
        for kind in ("int8", "float"):
            use(kind)
            outputs[kind] = [model(pixels[i:i + batch], num_samples=samples, domain_features=features[i:i + batch])
                             for i in range(0, len(pixels), batch)]
        x, f, d = pixels[:batch], features[:batch], domain[:batch]
        calls = {"predictive": lambda: model(x, num_samples=samples, domain_features=f),
                 "with gate pass": lambda: model(x, num_samples=samples, domain_pixel_values=d)}
        times = {(kind, call): [] for kind in ("int8", "float") for call in calls}
        for kind in ("int8", "float"):  # warm-up
            use(kind)
            for fn in calls.values():
                fn()
        for _ in range(repeats):
            for call, fn in calls.items():
                for kind in ("int8", "float"):  # back to back, so that load from other processes hits both alike
                    use(kind)
                    times[kind, call].append(timed(fn))
    use("int8")
    released, flt = outputs["int8"], outputs["float"]
    diff = max((q.probs[:, 1] - r.probs[:, 1]).abs().max().item() for q, r in zip(released, flt))
    mean_diff = torch.cat([(q.probs[:, 1] - r.probs[:, 1]).abs() for q, r in zip(released, flt)]).mean().item()
    agree = sum(sum(a == b for a, b in zip(model.verdicts(q), model.verdicts(r))) for q, r in zip(released, flt))
    version = model.config.release_version
    lines = [f"| `{name}` {version} backbone | call | T={samples}, batch {batch} (ms) | images/s | vs float (median "
             f"of pairs) | target >= {CNN_TARGET} images/s |", "|---|---|---:|---:|---:|:---:|"]
    for call in calls:
        for kind in ("int8", "float"):
            t = statistics.median(times[kind, call])
            rel = statistics.median([i / fl for i, fl in zip(times["int8", call], times["float", call])])
            label = "int8 (released: `config.int8_backbone`; goldens)" if kind == "int8" else \
                "float (the same weights, `dequantize()`)"
            target = ("met" if batch / t >= CNN_TARGET else "MISSED") if call == "predictive" else "n/a"
            what = ("T-sample predictive, gate features given (`domain_features`)" if call == "predictive"
                    else "the whole call: + the gate's Lite0 pass at 128 px (`domain_pixel_values`)")
            lines.append(f"| {label} | {what} | {1000 * t:.1f} | {batch / t:.0f} | "
                         f"{rel if kind == 'int8' else 1.0:.2f} | {target} |")
    lines += ["", f"int8 (released) against float weights on {len(pixels):,} CIFAKE test images (T={samples}, same "
              f"seed): max |P(FAKE) change| {diff:.3f}, mean {mean_diff:.4f}; verdicts equal on "
              f"{agree / len(pixels):.2%} ({len(pixels) - agree} differ)."]
    return "\n".join(lines)


def grouped_logits(model, x: torch.Tensor, t: int) -> torch.Tensor:
    """The previous all-layer VI implementation: one grouped convolution per layer over the T weight samples (same
    draws, same order), eval BatchNorm as its own op; for comparison with today's loop of T passes."""
    from hub_models.modeling_bayesfake import apply_layer

    b = x.shape[0]
    h = x.unsqueeze(1).expand(b, t, *x.shape[1:]).reshape(b * t, *x.shape[1:])
    for i, (conv, norm) in enumerate(zip(model.backbone.convs, model.backbone.norms)):
        h = F.relu(norm(apply_layer(conv, h, t, True)))
        if i in (1, 3):
            h = F.max_pool2d(h, 2)
    return model.head(h.mean(dim=(2, 3)), t, True).reshape(b, t, -1).transpose(0, 1)


def adaptive_table(images: int, batch: int, samples: int, repeats: int) -> str:
    from hub_models.hub import load_detector
    from hub_models.modeling_bayesfake import sampling_rng

    name = "cifake-vi-bcnn"
    model, processor = load_detector(name)
    model.eval()
    test = cifake_inputs(processor, "test", images)["pixel_values"]
    totals = {"det": 0.0, "fixed": 0.0, "adaptive": 0.0}
    verdicts = {"fixed": [], "adaptive": []}
    used = []
    with torch.inference_mode():
        model(test[:batch], num_samples=samples), model(test[:batch], num_samples=samples, adaptive=True)
        for start in range(0, len(test), batch):
            x = test[start:start + batch]
            totals["det"] += timed(lambda: model(x, num_samples=1, stochastic=False))
            t0 = time.perf_counter()
            fixed = model(x, num_samples=samples)
            totals["fixed"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            adaptive = model(x, num_samples=samples, adaptive=True)
            totals["adaptive"] += time.perf_counter() - t0
            verdicts["fixed"] += model.verdicts(fixed)
            verdicts["adaptive"] += model.verdicts(adaptive)
            used.append(adaptive.num_samples_used)
        used = torch.cat(used).float()
        # Grouped convolutions (previous implementation) against today's loop, same draws, batch 64 and 256.
        loops = []
        for b in (64, 256):
            x = test[:b]
            seed = model.config.sampling_seed

            def grouped():
                with sampling_rng(seed, None, x.device):
                    return grouped_logits(model, x, samples)

            def loop():
                return model(x, num_samples=samples, seed=seed)

            def det():
                model(x, num_samples=1, stochastic=False)

            temperature = model.config.calibration_temperature
            same = (torch.softmax(grouped() / temperature, -1) - loop().sample_probs).abs().max().item()
            g, lp, d = [], [], []
            for _ in range(max(3, repeats // 3)):
                d.append(timed(det))
                g.append(timed(grouped))
                lp.append(timed(loop))
            loops.append((b, statistics.median(d), statistics.median(g), statistics.median(lp),
                          statistics.median([a / c for a, c in zip(g, d)]),
                          statistics.median([a / c for a, c in zip(lp, d)]),
                          same))
    agree = sum(a == b for a, b in zip(verdicts["fixed"], verdicts["adaptive"])) / len(test)
    lines = [f"| `{name}` on {len(test):,} CIFAKE test images, batch {batch} | total (s) | cost / det. pass | "
             f"mean samples | verdicts equal to fixed T={samples} | target |", "|---|---:|---:|---:|---:|:---:|",
             f"| det. pass | {totals['det']:.1f} | 1.00 | 1 | | |",
             f"| fixed T={samples} | {totals['fixed']:.1f} | {totals['fixed'] / totals['det']:.1f} | {samples} | "
             "100% | |",
             f"| adaptive (`adaptive=True`, up to T={samples}) | {totals['adaptive']:.1f} | "
             f"{totals['adaptive'] / totals['det']:.1f} | {used.mean():.2f} (median {used.median():.0f}, "
             f"{(used == samples).float().mean():.1%} at T) | {agree:.2%} | cost <= 8, agreement >= 99.5%: "
             f"{'met' if totals['adaptive'] / totals['det'] <= 8 and agree >= 0.995 else 'MISSED'} |",
             "", f"Fixed T={samples} on random inputs of the released VI CNN: the previous grouped convolutions "
             "against today's loop of T plain passes (same draws; max |difference| of the sample probabilities shown).", "",
             "| batch | det. pass (ms) | grouped (ms) | loop (ms) | grouped / det. | loop / det. | loop / grouped | "
             "max abs diff |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, d, g, lp, gr, lr, same in loops:
        lines.append(f"| {b} | {1000 * d:.1f} | {1000 * g:.1f} | {1000 * lp:.1f} | {gr:.1f} | {lr:.1f} | "
                     f"{lp / g:.2f} | {same:.1g} |")
    print(f"adaptive: cost {totals['adaptive'] / totals['det']:.1f}x det, agreement {agree:.4f}", file=sys.stderr)
    return "\n".join(lines)


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
    parser.add_argument("--kinds", nargs="*", type=int, help="indices into the kind list (default: all; none: skip)")
    parser.add_argument("--released", nargs="*", default=[], metavar="NAME",
                        help="also time these released detectors (hub_models/NAME, trained weights, their own size); "
                             "'head-only' stands for every head-only MC detector")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256], help="batch sizes of the released rows")
    parser.add_argument("--int8", action="store_true", help="MC-Dropout CNN images/s, int8 (released) vs float")
    parser.add_argument("--int8-test-images", type=int, default=2048, help="CIFAKE test images int8 is compared on")
    parser.add_argument("--adaptive-images", type=int, default=0,
                        help="VI adaptive sampling on the first N CIFAKE test images (0: skip)")
    parser.add_argument("--output", help="also write the results, with command, machine and date, to this Markdown file")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    kinds = KINDS if args.kinds is None else [KINDS[i] for i in args.kinds]
    sections = []
    rows = []
    for label, overrides in kinds:
        result = bench_kind(overrides, args.batch, args.samples, args.repeats, min(args.naive_repeats, args.repeats),
                            args.budget_s)
        rows.append((label, result))
        print(f"{label}: pred/det {result['pred_ratio']:.2f}, naive/det {result['naive_ratio']:.2f}", file=sys.stderr)
    if rows:
        sections.append((f"## Head kinds on the from-scratch CNN (widths {rows[0][1]['widths']}, random weights), "
                         f"batch {args.batch}", table(rows, args.samples)))
    names = [n for name in args.released for n in (HEAD_ONLY_MC if name == "head-only" else [name])]
    if names:
        sections.append((f"## Released detectors: T={args.samples} predictive against one deterministic pass",
                         released_table(names, args.batches, args.samples, args.repeats, args.budget_s)))
    if args.int8:
        sections.append((f"## Released MC-Dropout CNN throughput at T={args.samples}",
                         int8_table(args.batch, args.samples, args.repeats, args.int8_test_images)))
    if args.adaptive_images:
        sections.append(("## Adaptive sampling of the all-layer variational CNN",
                         adaptive_table(args.adaptive_images, args.batch, args.samples, args.repeats)))
    text = "\n\n".join(f"{title}\n\n{body}" for title, body in sections)
    print(text)
    if args.output:
        command = "python benchmarks/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = f"""# Monte Carlo sampling cost

Command: `{command.strip()}`

Machine: {cores} CPU cores ({cpu_name()}), {torch.get_num_threads()} torch threads, torch {torch.__version__},
Python {platform.python_version()}; date {datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}.

Setup: eval mode, `torch.no_grad()` / `torch.inference_mode()`, one warm-up; det. and predictive timed back to back up
to {args.repeats} times (`pairs`; fewer after {args.budget_s:.0f} s), times are medians, predictive / det. is the median of
the per-pair ratios (so that load from other processes hits both alike); the naive loop is timed
{min(args.naive_repeats, args.repeats)} times (median). `det.` is `model(x, num_samples=1, stochastic=False)`; the
predictive is `model(x, num_samples={args.samples})`; naive is {args.samples} x `model(x, num_samples=1)`. Targets:
predictive / det. <= {TARGET} for head-only stochastic kinds, <= {RELEASED_TARGET} for the released head-only MC
detectors at batch 64 and 256; >= {CNN_TARGET} images/s for the released MC-Dropout CNN at T=30; adaptive VI cost <= 8x
one pass with >= 99.5% of verdicts equal to fixed T=30.

"""
        Path(args.output).write_text(header + text + "\n")
    return text


if __name__ == "__main__":
    main()
