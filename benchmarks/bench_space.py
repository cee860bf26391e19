"""Latency of the Space's /predict through gradio_client, beside the raw model compute, and the cold start.

    python benchmarks/bench_space.py [--models ID_OR_PATH,...] [--stand-ins] [--image A.jpg B.png] [--num-samples 30 100]
                                     [--torch-threads N] [--requests 50] [--write]

* cold start: from launching ``python space/app.py`` to its first /predict answer (imports, model loading, server
  start, first request);
* /predict: p50/p95 wall time of ``Client.predict(handle_file(image), T, api_name="/predict")`` with every loaded
  detector (upload + queue + decoding + all forwards + JSON);
* /predict through gradio_client built with ``ssl_verify=httpx.create_ssl_context()`` (the README's client): the
  same verifying TLS context httpx builds by default, built once. gradio_client opens a new httpx client for every
  request (the upload, the queue join, the result stream), and by default each one loads the CA bundle again (about
  20 ms apiece on this machine); given a ready context, every one reuses it;
* /predict over gradio's plain HTTP API (``POST /gradio_api/upload``, ``POST /gradio_api/call/predict``, then the
  result's server-sent events, with one keep-alive httpx client): the same server work without gradio_client, whose
  message loop also sleeps 50 ms whenever it finds no message waiting;
* raw compute: p50/p95 of what the endpoint computes, called directly on one dedicated thread with the Space's torch
  thread count, as the server does (see space/detectors.py INFERENCE_THREAD): the image decoded once, then for each detector
  processor(image) and the model forward with the same T and seed.
All paths alternate in one loop, so they see the same background load. Target: gradio_client p50 <= 1.3x raw p50.

gradio_client's answer comes in 50 ms steps counted from its queue join, so the ratio for one image depends on where
the compute ends between two steps. The default images are a 32 px CIFAKE image and the two larger bundled photos,
whose decoding makes the compute end at different points; every (image, T) is its own row.

``--stand-ins`` serves untrained detectors with the release architectures (from train/configs/*.yaml) instead of the
released weights: the compute is the same, the answers are meaningless. Use it while the released detectors do not
exist yet.

``--evidence-cost`` measures instead what reading the file's own evidence (space/provenance.py:
``evidence.read_evidence`` on the evidence threads, overlapping the decoding and the detectors) adds to a /predict
request: the endpoint's work
with evidence (``provenance.analyse_file``) against the same work without it (``pool.analyse(read_image(path))``, the
endpoint before evidence), interleaved, in this process with the Space's inference thread and torch thread count, on
photo-like files of 1 and 12 MP (JPEG and PNG; plain, with camera EXIF + XMP + A1111 parameters, or with a C2PA
credential the reader validates) and a 32 px CIFAKE image. Upload and HTTP costs are the same with and without, so they
are left out. Target: at most 50 ms added (p50) per image of up to 12 MP. ``--write`` replaces its section of the
results file, and the latency run keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # bench_evidence's test files (--evidence-cost)

import httpx  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from hub_models import BayesFakeConfig, BayesFakeDetector  # noqa: E402
from hub_models.export import export_detector  # noqa: E402
from hub_models.hub import DEFAULT_REPO_IDS, load_detector  # noqa: E402
from hub_models.image_processing_bayesfake import load_image, to_rgb  # noqa: E402
from space import provenance  # noqa: E402
from space.app import DEFAULT_TORCH_THREADS, TORCH_THREADS_ENV  # noqa: E402
from space.detectors import SEED, DetectorPool, read_image  # noqa: E402 - SEED: the Space's per-request seed

EXAMPLES = REPO_ROOT / "space" / "examples"
DEFAULT_IMAGES = [EXAMPLES / "cifake_fake_1.jpg", EXAMPLES / "synthetic_landscape_640x480.jpg",
                  EXAMPLES / "synthetic_still_life_1024x768_rgba.png"]
RESULTS = REPO_ROOT / "benchmarks" / "results_space.md"
TARGET_RATIO = 1.3
EVIDENCE_HEADING = "## Evidence read in the request"
EVIDENCE_TARGET_MS = 50.0
compute_thread = ThreadPoolExecutor(max_workers=1)  # the only thread of this process that calls torch


def export_stand_ins(folder: Path) -> list[str]:
    """Untrained detectors with the architecture of each release config (same compute as the released weights)."""
    paths = []
    for config_file in sorted((REPO_ROOT / "train" / "configs").glob("*.yaml")):
        spec = yaml.safe_load(config_file.read_text())
        torch.manual_seed(0)
        model = BayesFakeDetector(BayesFakeConfig(**spec["model"])).eval()
        paths.append(str(export_detector(model, folder / f"{spec['name']}-untrained")))
    return paths


def model_ids_arg(text: str | None) -> list[str]:
    """The --models value (comma-separated ids or folders), else the released detectors."""
    return [m.strip() for m in (text or ",".join(DEFAULT_REPO_IDS)).split(",") if m.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def start_space(model_ids: list[str], image: Path, num_samples: int, torch_threads: int, log_path: Path):
    """Launch ``python space/app.py`` and wait for its first /predict answer; returns (process, client, seconds)."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               **{TORCH_THREADS_ENV: str(torch_threads)})
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "space/app.py", "--models", ",".join(model_ids)], cwd=REPO_ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = start + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the Space exited:\n{log_path.read_text()}")
        try:
            client = Client(f"http://127.0.0.1:{port}", verbose=False)
            client.predict(handle_file(str(image)), num_samples, api_name="/predict")
            return process, client, time.perf_counter() - start
        except Exception:  # noqa: BLE001 - not up yet
            if time.perf_counter() > deadline:
                process.terminate()
                raise RuntimeError(f"no answer within 600 s:\n{log_path.read_text()}") from None
            time.sleep(0.2)


def raw_compute(detectors, image: Path, num_samples: int) -> None:
    """What /predict computes, without the server: the image decoded once, processor and forward of every detector."""
    rgb = to_rgb(load_image(str(image)))
    for model, processor in detectors:
        pixel_values = processor(rgb, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            model(pixel_values, num_samples=num_samples, seed=SEED)


def http_predict(http: httpx.Client, image: Path, num_samples: int) -> dict:
    """One /predict through gradio's HTTP API: upload, call, read the result event."""
    with open(image, "rb") as f:
        [path] = http.post("/gradio_api/upload", files={"files": (image.name, f)}).raise_for_status().json()
    file_data = {"path": path, "orig_name": image.name, "meta": {"_type": "gradio.FileData"}}
    event_id = http.post("/gradio_api/call/predict", json={"data": [file_data, num_samples, None]}).raise_for_status(
        ).json()["event_id"]
    event = None
    with http.stream("GET", f"/gradio_api/call/predict/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                data = json.loads(line.removeprefix("data:"))
                if event == "error":
                    raise RuntimeError(f"/predict failed: {data}")
                return data[0]
    raise RuntimeError("/predict: the event stream ended without a result")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def p50_p95(samples_ms: list[float]) -> tuple[float, float]:
    return percentile(samples_ms, 50), percentile(samples_ms, 95)


PATHS = {  # name in the table -> key of the request path; "raw" is the reference every ratio divides by
    "gradio_client, TLS context reused": "tuned_client",
    "gradio_client, default `Client(url)`": "client",
    "plain HTTP (httpx)": "http",
    "raw compute": "raw",
}


def measure(clients: dict, http, detectors, image: Path, num_samples: int, requests: int, warmup: int) -> dict:
    """p50/p95 (ms) of /predict along every path of PATHS, the raw compute included."""

    def through(client):
        return lambda: client.predict(handle_file(str(image)), num_samples, api_name="/predict")

    def compute():
        compute_thread.submit(raw_compute, detectors, image, num_samples).result()

    calls = {key: through(client) for key, client in clients.items()}
    calls["http"] = lambda: http_predict(http, image, num_samples)
    calls["raw"] = compute
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples = {key: [] for key in calls}
    for _ in range(requests):  # interleaved, so every path sees the same background load
        for key, call in calls.items():
            samples[key].append(timed(call))
    return {key: p50_p95(ms) for key, ms in samples.items()}


def results_table(rows_by_key: dict[tuple[str, int], dict], floors: dict[str, tuple[float, float]],
                  cold_start_s: float) -> str:
    """One row per (image, T): p50 / p95 of every path, and each gradio_client path's p50 over the raw p50."""
    clients = [(name, key) for name, key in PATHS.items() if key in ("tuned_client", "client")]
    header = ["image", "T", *(f"{name} p50 / p95" for name in PATHS),
              *(f"{name} / raw (target <= {TARGET_RATIO}x)" for name, _ in clients)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (image, t), stats in rows_by_key.items():
        raw50 = stats["raw"][0]
        cells = [f"`{image}`", str(t), *(f"{stats[key][0]:.1f} / {stats[key][1]:.1f} ms" for key in PATHS.values())]
        for _, key in clients:
            ratio = stats[key][0] / raw50
            cells.append(f"{ratio:.2f}x ({'met' if ratio <= TARGET_RATIO else 'not met'})")
        rows.append("| " + " | ".join(cells) + " |")
    floor_lines = [f"- `/models` (no upload, no model compute) through {name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms"
                   for name, (p50, p95) in floors.items()]
    cold_start = f"- cold start (`python space/app.py` launched -> first /predict answer): {cold_start_s:.1f} s"
    return "\n".join(rows + ["", *floor_lines, cold_start])


# ----------------------------------------------------------------------------------------------------------------------
# --evidence-cost


def evidence_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, what it carries): the 32 px example, and photo-like 1 MP and 12 MP files made with the evidence
    benchmark's recipes (benchmarks/bench_evidence.py)."""
    from bench_evidence import SIZES, c2pa_signer, encode, photo

    sign = c2pa_signer()
    files = [(EXAMPLES / "cifake_fake_1.jpg", "none (CIFAKE example)")]
    for mp, variants in ((1, (("PNG", "metadata"),)),
                         (12, (("JPEG", "plain"), ("JPEG", "metadata"), ("JPEG", "C2PA"), ("PNG", "metadata"),
                               ("PNG", "C2PA")))):
        width, height = SIZES[mp]
        image = photo(width, height, seed=mp)
        for fmt, variant in variants:
            data = encode(image, fmt, metadata=variant == "metadata")
            if variant == "C2PA":
                data = sign(data, f"image/{fmt.lower()}")
            path = folder / f"{width}x{height}_{variant}.{fmt.lower()}"
            path.write_bytes(data)
            files.append((path, {"plain": "nothing", "metadata": "camera EXIF, XMP, A1111 parameters",
                                 "C2PA": "C2PA credential (validated)"}[variant]))
    return files


def measure_evidence(pool: DetectorPool, files, num_samples: int, requests: int, warmup: int) -> list[dict]:
    """Per file: p50/p95 of the /predict work without and with the evidence read, and of the read alone."""
    reader = provenance.EvidenceReader()
    rows = []
    for path, carries in files:
        calls = {
            "without": lambda p=str(path): pool.analyse(read_image(p), num_samples),
            "with": lambda p=str(path): provenance.analyse_file(pool, reader, p, num_samples),
            "alone": lambda p=str(path): reader.read_now(p),
        }
        found = calls["with"]()["evidence"]
        for _ in range(warmup):
            for call in calls.values():
                call()
        samples = {key: [] for key in calls}
        for _ in range(requests):  # interleaved: the same background load for each
            for key, call in calls.items():
                samples[key].append(timed(call))
        with Image.open(path) as image:
            size = image.size
        rows.append({"file": path.name, "size": size, "bytes": path.stat().st_size, "carries": carries,
                     "says": f"{found['says']}{' (strong)' if found['strong'] else ''}",
                     **{key: p50_p95(ms) for key, ms in samples.items()},
                     "added": [w - wo for w, wo in zip(samples["with"], samples["without"])]})
    return rows


def evidence_table(rows: list[dict]) -> str:
    header = ["file", "MP", "bytes", "carries", "evidence says", "/predict work without evidence p50 / p95",
              "with evidence p50 / p95", "added p50 (with - without)", "added, paired p50 / p95",
              "evidence read alone p50 / p95", f"target <= {EVIDENCE_TARGET_MS:.0f} ms added"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        added = r["with"][0] - r["without"][0]
        paired = p50_p95(r["added"])
        lines.append("| " + " | ".join([
            f"`{r['file']}`", f"{r['size'][0] * r['size'][1] / 1e6:.2g}", f"{r['bytes']:,}", r["carries"], r["says"],
            f"{r['without'][0]:.1f} / {r['without'][1]:.1f} ms", f"{r['with'][0]:.1f} / {r['with'][1]:.1f} ms",
            f"{added:+.1f} ms", f"{paired[0]:+.1f} / {paired[1]:+.1f} ms",
            f"{r['alone'][0]:.1f} / {r['alone'][1]:.1f} ms",
            "met" if added <= EVIDENCE_TARGET_MS else "not met"]) + " |")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def split_results(text: str) -> tuple[str, str]:
    """The results file as (latency part, evidence section or "")."""
    head, sep, tail = text.partition(EVIDENCE_HEADING)
    return head.rstrip() + "\n", (sep + tail).rstrip() + "\n" if sep else ""


def evidence_main(args, model_ids: list[str], workdir: Path) -> None:
    from space.detectors import on_inference_thread

    pool = DetectorPool.load(model_ids)
    assert not pool.failed, f"detectors failed to load: {pool.failed}"
    files = evidence_files(workdir)
    load_before = load_average()
    rows = measure_evidence(pool, files, args.num_samples[0], args.requests, args.warmup)
    names = ", ".join(f"`{Path(m).name if os.path.isdir(m) else m}`" for m in model_ids)
    stand_ins = " (untrained stand-ins with the release architectures)" if args.stand_ins else ""
    setup = (f"{len(model_ids)} detector(s): {names}{stand_ins}; T = {args.num_samples[0]}; {args.requests} requests "
             f"per file after {args.warmup} warm-up, interleaved; {provenance.EVIDENCE_THREADS} evidence threads, "
             f"torch {torch.__version__} with {on_inference_thread(torch.get_num_threads)} torch thread(s) on the "
             f"inference thread; {platform.machine()}, {os.cpu_count()} CPU cores; load average {load_before} "
             f"before, {load_average()} after (1 / 5 / 15 min); {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = evidence_table(rows)
    print(setup)
    print(table)
    if args.write:
        options = [f"--models {args.models}"] if args.models else []
        options += ["--stand-ins"] if args.stand_ins else []
        options += [f"--num-samples {args.num_samples[0]}", f"--requests {args.requests}", f"--warmup {args.warmup}"]
        command = " ".join(["python benchmarks/bench_space.py --evidence-cost", *options])
        notes = "".join(f"\n- {note}" for note in args.note)
        section = (f"{EVIDENCE_HEADING} (`{command}`)\n\n"
                   "What reading the uploaded file's own evidence adds to a /predict request: the endpoint's work "
                   "with the read (started on the evidence threads, overlapping the decoding and the detectors) "
                   "against the same work without it, in one process with the Space's inference thread. "
                   "\"added, paired\" is the median over the rounds of (with - without), measured back to back.\n\n"
                   f"{setup}\n\n{table}\n" + (f"\nNotes:\n{notes}\n" if notes else ""))
        latency = split_results(RESULTS.read_text())[0] if RESULTS.exists() else ""
        RESULTS.write_text(latency + "\n" + section)
        print(f"wrote {RESULTS}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated ids/folders (default: {','.join(DEFAULT_REPO_IDS)})")
    parser.add_argument("--stand-ins", action="store_true",
                        help="serve untrained detectors with the release architectures (train/configs)")
    parser.add_argument("--image", type=Path, nargs="+", default=DEFAULT_IMAGES, help="images to send (one row each)")
    parser.add_argument("--num-samples", type=int, nargs="+", default=[30], help="T values to measure")
    parser.add_argument("--torch-threads", type=int, default=DEFAULT_TORCH_THREADS,
                        help="torch's intra-op threads, in the Space and for the raw compute (default: the Space's)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--write", action="store_true", help=f"write the results to {RESULTS.relative_to(REPO_ROOT)}")
    parser.add_argument("--note", action="append", default=[], help="a line of context for the results file")
    parser.add_argument("--evidence-cost", action="store_true",
                        help="measure what the evidence read adds to /predict instead (see above)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench_space_"))
    torch.set_num_threads(args.torch_threads)  # as the Space sets it, before any torch work
    if args.stand_ins:
        model_ids = compute_thread.submit(export_stand_ins, workdir).result()
    else:
        model_ids = model_ids_arg(args.models)
    # Loaded on the thread that runs the raw compute, and no torch call elsewhere in this process: one OpenMP team, as
    # in the Space (space/detectors.py INFERENCE_THREAD). Fails loudly: a benchmark needs every model.
    if args.evidence_cost:
        evidence_main(args, model_ids, workdir)
        return
    detectors = compute_thread.submit(lambda: [load_detector(model_id) for model_id in model_ids]).result()

    process, client, cold_start_s = start_space(model_ids, args.image[0], args.num_samples[0], args.torch_threads,
                                                workdir / "space.log")
    try:
        loaded = [m["name"] for m in client.predict(api_name="/models")["loaded"]]
        assert loaded == model_ids, f"the Space loaded {loaded}, expected {model_ids}"
        clients = {"tuned_client": Client(client.src, verbose=False, ssl_verify=httpx.create_ssl_context()),
                   "client": client}
        floors = {name: p50_p95([timed(lambda c=clients[key]: c.predict(api_name="/models"))
                                 for _ in range(args.requests)])
                  for name, key in PATHS.items() if key in clients}
        with httpx.Client(base_url=client.src, timeout=120) as http:
            rows_by_key = {}
            for image in args.image:
                t = args.num_samples[0]  # every path must do the same work: the same answer, to the digit
                answers = [c.predict(handle_file(str(image)), t, api_name="/predict") for c in clients.values()]
                answers.append(http_predict(http, image, t))
                assert all(a == answers[0] for a in answers), f"the paths answered /predict on {image} differently"
                for t in args.num_samples:
                    rows_by_key[image.name, t] = measure(clients, http, detectors, image, t, args.requests, args.warmup)
    finally:
        process.terminate()
        process.wait(timeout=30)

    names = ", ".join(f"`{Path(m).name if os.path.isdir(m) else m}`" for m in model_ids)
    images = [str(i.relative_to(REPO_ROOT) if i.is_relative_to(REPO_ROOT) else i) for i in args.image]
    stand_ins = " (untrained stand-ins with the release architectures)" if args.stand_ins else ""
    setup = (f"{len(model_ids)} detector(s): {names}{stand_ins}; images {', '.join(f'`{i}`' for i in images)}; "
             f"{args.requests} requests per image and T after {args.warmup} warm-up; torch {torch.__version__}, "
             f"{args.torch_threads} torch thread(s) in the Space and the raw compute; {platform.machine()}, "
             f"{os.cpu_count()} CPU cores; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = results_table(rows_by_key, floors, cold_start_s)
    print(setup)
    print(table)
    if args.write:
        notes = "".join(f"\n- {note}" for note in args.note)
        options = [f"--models {args.models}"] if args.models else []
        options += ["--stand-ins"] if args.stand_ins else []
        options += [f"--torch-threads {args.torch_threads}"] if args.torch_threads != DEFAULT_TORCH_THREADS else []
        options += [f"--image {' '.join(images)}", f"--num-samples {' '.join(map(str, args.num_samples))}",
                    f"--requests {args.requests}", f"--warmup {args.warmup}"]
        command = " ".join(["python benchmarks/bench_space.py", *options])
        evidence_section = split_results(RESULTS.read_text())[1] if RESULTS.exists() else ""
        RESULTS.write_text(f"# Space latency (`benchmarks/bench_space.py`)\n\n`{command}`\n\n{setup}\n\n{table}\n"
                           + (f"\nNotes:\n{notes}\n" if notes else "") + (f"\n{evidence_section}" if evidence_section
                                                                             else ""))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
