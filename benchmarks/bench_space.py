"""Latency of the Space's /predict through gradio_client, beside the raw model compute, and the cold start.

    python benchmarks/bench_space.py [--models ID_OR_PATH,...] [--stand-ins] [--requests 50] [--write]

* cold start: from launching ``python space/app.py`` to its first /predict answer (imports, model loading, server
  start, first request);
* /predict: p50/p95 wall time of ``Client.predict(handle_file(image), T, api_name="/predict")`` with every loaded
  detector (upload + queue + decoding + all forwards + JSON);
* /predict over gradio's plain HTTP API (``POST /gradio_api/upload``, ``POST /gradio_api/call/predict``, then the
  result's server-sent events, with one keep-alive httpx client): the same server work without gradio_client, whose
  message loop sleeps 50 ms whenever it finds no message waiting;
* raw compute: p50/p95 of what the endpoint computes, called directly in a worker thread as the server does: for each
  detector, processor(image) and the model forward with the same T and seed.
Client and raw calls alternate in one loop, so both see the same background load. Target: client p50 <= 1.3x raw p50.

``--stand-ins`` serves untrained detectors with the release architectures (from train/configs/*.yaml) instead of the
released weights: the compute is the same, the answers are meaningless. Use it while the released detectors do not
exist yet.
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

import httpx  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from hub_models import BayesFakeConfig, BayesFakeDetector  # noqa: E402
from hub_models.export import export_detector  # noqa: E402
from hub_models.hub import DEFAULT_REPO_IDS, load_detector  # noqa: E402

DEFAULT_IMAGE = REPO_ROOT / "space" / "examples" / "cifake_fake_1.jpg"
RESULTS = REPO_ROOT / "benchmarks" / "results_space.md"
SEED = 0  # the Space's per-request seed (space/app.py SEED)
TARGET_RATIO = 1.3
compute_thread = ThreadPoolExecutor(max_workers=1)


def export_stand_ins(folder: Path) -> list[str]:
    """Untrained detectors with the architecture of each release config (same compute as the released weights)."""
    paths = []
    for config_file in sorted((REPO_ROOT / "train" / "configs").glob("*.yaml")):
        spec = yaml.safe_load(config_file.read_text())
        torch.manual_seed(0)
        model = BayesFakeDetector(BayesFakeConfig(**spec["model"])).eval()
        paths.append(str(export_detector(model, folder / f"{spec['name']}-untrained")))
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def start_space(model_ids: list[str], image: Path, num_samples: int, log_path: Path):
    """Launch ``python space/app.py`` and wait for its first /predict answer; returns (process, client, seconds)."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
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
    """What /predict computes, without the server: processor and forward of every detector."""
    for model, processor in detectors:
        pixel_values = processor(str(image), return_tensors="pt")["pixel_values"]
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


def measure(client, http, detectors, image: Path, num_samples: int, requests: int, warmup: int) -> dict:
    """p50/p95 (ms) of /predict through gradio_client and over HTTP, and of the raw compute."""

    def request():
        client.predict(handle_file(str(image)), num_samples, api_name="/predict")

    def http_request():
        http_predict(http, image, num_samples)

    def compute():
        # In a worker thread, as the server runs it (gradio's thread pool). On an oversubscribed machine the main
        # thread's OpenMP team can be several times slower for the same forward, which would flatter the Space.
        compute_thread.submit(raw_compute, detectors, image, num_samples).result()

    for _ in range(warmup):
        request()
        http_request()
        compute()
    client_ms, http_ms, raw_ms = [], [], []
    for _ in range(requests):  # interleaved, so all three see the same background load
        client_ms.append(timed(request))
        http_ms.append(timed(http_request))
        raw_ms.append(timed(compute))
    return {"client": p50_p95(client_ms), "http": p50_p95(http_ms), "raw": p50_p95(raw_ms)}


def results_table(by_t: dict[int, dict], floor: tuple[float, float], cold_start_s: float) -> str:
    rows = ["| T | /predict via gradio_client p50 / p95 | /predict over HTTP p50 / p95 | raw compute p50 / p95 | "
            f"client / raw p50 (target <= {TARGET_RATIO}x) | HTTP / raw p50 |", "|---|---|---|---|---|---|"]
    for t, stats in by_t.items():
        (c50, c95), (h50, h95), (r50, r95) = stats["client"], stats["http"], stats["raw"]
        verdict = "met" if c50 / r50 <= TARGET_RATIO else "not met"
        rows.append(f"| {t} | {c50:.1f} / {c95:.1f} ms | {h50:.1f} / {h95:.1f} ms | {r50:.1f} / {r95:.1f} ms | "
                    f"{c50 / r50:.2f}x ({verdict}) | {h50 / r50:.2f}x |")
    return "\n".join(rows + [
        "",
        f"- gradio_client floor (`/models`: no upload, no model compute): p50 {floor[0]:.1f} ms, p95 {floor[1]:.1f} ms",
        f"- cold start (`python space/app.py` launched -> first /predict answer): {cold_start_s:.1f} s",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated ids/folders (default: {','.join(DEFAULT_REPO_IDS)})")
    parser.add_argument("--stand-ins", action="store_true",
                        help="serve untrained detectors with the release architectures (train/configs)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[30], help="T values to measure")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--write", action="store_true", help=f"write the results to {RESULTS.relative_to(REPO_ROOT)}")
    parser.add_argument("--note", action="append", default=[], help="a line of context for the results file")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench_space_"))
    if args.stand_ins:
        model_ids = export_stand_ins(workdir)
    else:
        model_ids = [m.strip() for m in (args.models or ",".join(DEFAULT_REPO_IDS)).split(",") if m.strip()]
    detectors = [load_detector(model_id) for model_id in model_ids]  # fails loudly: a benchmark needs every model

    process, client, cold_start_s = start_space(model_ids, args.image, args.num_samples[0], workdir / "space.log")
    try:
        loaded = [m["name"] for m in client.predict(api_name="/models")["loaded"]]
        assert loaded == model_ids, f"the Space loaded {loaded}, expected {model_ids}"
        floor = p50_p95([timed(lambda: client.predict(api_name="/models")) for _ in range(args.requests)])
        with httpx.Client(base_url=client.src, timeout=120) as http:
            t = args.num_samples[0]  # both paths must do the same work: the same answer, to the digit
            by_client = client.predict(handle_file(str(args.image)), t, api_name="/predict")
            assert by_client == http_predict(http, args.image, t), "the two paths answered /predict differently"
            by_t = {t: measure(client, http, detectors, args.image, t, args.requests, args.warmup)
                    for t in args.num_samples}
    finally:
        process.terminate()
        process.wait(timeout=30)

    names = ", ".join(f"`{Path(m).name if os.path.isdir(m) else m}`" for m in model_ids)
    image = args.image.relative_to(REPO_ROOT) if args.image.is_relative_to(REPO_ROOT) else args.image
    setup = (f"{len(model_ids)} detector(s): {names}"
             f"{' (untrained stand-ins with the release architectures)' if args.stand_ins else ''}; image `{image}`; "
             f"{args.requests} requests per T after {args.warmup} warm-up; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; {platform.machine()}, {os.cpu_count()} CPU cores; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    table = results_table(by_t, floor, cold_start_s)
    print(setup)
    print(table)
    if args.write:
        notes = "".join(f"\n- {note}" for note in args.note)
        options = [f"--models {args.models}"] if args.models else []
        options += ["--stand-ins"] if args.stand_ins else []
        options += [f"--image {image}", f"--num-samples {' '.join(map(str, args.num_samples))}",
                    f"--requests {args.requests}", f"--warmup {args.warmup}"]
        command = " ".join(["python benchmarks/bench_space.py", *options])
        RESULTS.write_text(f"# Space latency (`benchmarks/bench_space.py`)\n\n`{command}`\n\n{setup}\n\n{table}\n"
                           + (f"\nNotes:\n{notes}\n" if notes else ""))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
