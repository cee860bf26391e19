"""How the Space should run its torch work: which thread, how many torch threads, on an idle and on a busy machine.

    python benchmarks/bench_inference_thread.py [--models ID_OR_PATH,...] [--num-samples 30] [--requests 30] [--write]

A request is what /predict computes for one image: decode it, then processor and forward of every detector (T
samples). Each way runs in a fresh process, because an OpenMP team lives as long as the thread that made it:
* request threads: loading on the main thread, then the requests taken in turn by 4 threads, as gradio's pool of
  request threads ran them before; each thread that enters torch gets its own OpenMP team;
* one thread: loading and every request on one dedicated thread (space/detectors.py INFERENCE_THREAD), with torch's default
  thread count or with one torch thread (the Space's default, space/app.py DEFAULT_TORCH_THREADS).
"Busy" runs the same while one pure-Python busy loop per core competes for the cores (another process, or the page's
own decoding and charts, on a real server).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_space import DEFAULT_IMAGES, model_ids_arg, p50_p95, raw_compute, timed  # noqa: E402

from hub_models.hub import DEFAULT_REPO_IDS, load_detector  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results_inference_thread.md"
REQUEST_THREADS = 4
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice on this machine
WAYS = {  # name -> (requests on one dedicated thread?, torch threads)
    f"request threads, {DEFAULT_THREADS} torch threads (before)": (False, DEFAULT_THREADS),
    f"one thread, {DEFAULT_THREADS} torch threads": (True, DEFAULT_THREADS),
    "one thread, 1 torch thread (the Space's default)": (True, 1),
}
BUSY_LOOP = "while True: pass"


def run_way(dedicated: bool, threads: int, model_ids: list[str], image: Path, num_samples: int, requests: int,
            warmup: int) -> list[float]:
    """Times (ms) of ``requests`` requests made the given way, in this process."""
    torch.set_num_threads(threads)
    if dedicated:
        inference = ThreadPoolExecutor(max_workers=1)
        detectors = inference.submit(lambda: [load_detector(m) for m in model_ids]).result()
        pool = [inference]
    else:
        detectors = [load_detector(m) for m in model_ids]
        pool = [ThreadPoolExecutor(max_workers=1) for _ in range(REQUEST_THREADS)]
    times = []
    for i in range(warmup + requests):
        thread = pool[i % len(pool)]
        ms = timed(lambda: thread.submit(raw_compute, detectors, image, num_samples).result())
        if i >= warmup:
            times.append(ms)
    return times


def measure(way: str, busy: bool, args, model_ids: list[str]) -> tuple[float, float]:
    """p50/p95 (ms) of one way in a fresh process, with or without busy loops on every core."""
    dedicated, threads = WAYS[way]
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(os.cpu_count() if busy else 0)]
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps([dedicated, threads]), "--models", ",".join(model_ids),
             "--image", str(args.image), "--num-samples", str(args.num_samples), "--requests", str(args.requests),
             "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return p50_p95(json.loads(child.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated ids/folders (default: {','.join(DEFAULT_REPO_IDS)})")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGES[0])
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2 * REQUEST_THREADS)
    parser.add_argument("--write", action="store_true", help=f"write the results to {RESULTS.relative_to(REPO_ROOT)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one way, in this process: [dedicated, threads]
    args = parser.parse_args(argv)
    model_ids = model_ids_arg(args.models)

    if args.child:
        dedicated, threads = json.loads(args.child)
        print(json.dumps(run_way(dedicated, threads, model_ids, args.image, args.num_samples, args.requests,
                                 args.warmup)))
        return
    stats = {(way, busy): measure(way, busy, args, model_ids) for busy in (False, True) for way in WAYS}
    rows = ["| machine | way | p50 / p95 per request | p50 / the Space's p50 |", "|---|---|---|---|"]
    for (way, busy), (p50, p95) in stats.items():
        space_p50 = stats[list(WAYS)[-1], busy][0]
        machine = f"busy ({os.cpu_count()} busy loops)" if busy else "idle"
        rows.append(f"| {machine} | {way} | {p50:.1f} / {p95:.1f} ms | {p50 / space_p50:.2f}x |")
    image = args.image.relative_to(REPO_ROOT) if args.image.is_relative_to(REPO_ROOT) else args.image
    setup = (f"{len(model_ids)} detector(s), image `{image}`, T={args.num_samples}; {args.requests} requests per way "
             f"after {args.warmup} warm-up; {REQUEST_THREADS} request threads; torch {torch.__version__}; "
             f"{platform.machine()}, {os.cpu_count()} CPU cores; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = "\n".join(rows)
    print(setup)
    print(table)
    if args.write:
        options = [f"--models {args.models}"] if args.models else []
        command = " ".join(["python benchmarks/bench_inference_thread.py", *options, f"--image {image}",
                            f"--num-samples {args.num_samples}", f"--requests {args.requests}"])
        RESULTS.write_text(f"# Where the Space runs its torch work (`benchmarks/bench_inference_thread.py`)\n\n"
                           f"`{command}`\n\n{setup}\n\n{table}\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
