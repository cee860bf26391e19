"""Throughput of ``bayesfake score`` with 1 and 2 processes, and the at-scale check: a kill -9 mid-run, the resume,
no row lost or duplicated, flat memory.

    python benchmarks/bench_score.py [--images 2000] [--processes 1 2] [--detectors a,b,c]
        [--scale-images 10000] [--kill-after-parts 3] [--chunk-size 1024] [--output benchmarks/results_score.md]

Throughput: CIFAKE test images (the parquet file, streamed), every CIFAKE detector at its own T, evidence read, one
run per process count, launched as users launch it (``python -m bayesfake score`` for one process, ``accelerate launch
--multi_gpu --num_processes N -m bayesfake score`` for N, CPU-only here, gloo). images/s is the images scored over the
slowest process's scoring loop (after the detectors are loaded); wall is the whole command (start-up, model loading,
merge).

At-scale check (``--scale-images``, 0 skips it): ``bayesfake score`` on the first N CIFAKE train images (the datasets
folder, the ``datasets.load_dataset`` streaming path) with the same detectors; the process is killed with SIGKILL once
``--kill-after-parts`` part files exist, then the same command is rerun to the end. It checks the merged file has
exactly the N keys, each once, that a fresh run on the first 200 images gives the same values, and samples the
resident memory (RSS) of each run every 0.5 s. Within a chunk the RSS swings by a batch's activations, so growth is
the trend: the peak over the last quarter of the resumed run minus the peak over its first quarter (both after its
first part is written, when the detectors are loaded and warm).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_sampling import cpu_name  # noqa: E402  (a sibling script: run as python benchmarks/bench_score.py)

CIFAKE = ROOT.parent / "shared" / "data" / "cifake"
TEST_PARQUET = CIFAKE / "data" / "test-00000-of-00001.parquet"
from hub_models.hub import DEFAULT_REPO_IDS  # noqa: E402

CIFAKE_DETECTORS = ",".join(DEFAULT_REPO_IDS)  # every released detector (all trained on CIFAKE only)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int, source: Path, out: Path, detectors: str, extra: list[str]) -> list[str]:
    args = ["score", str(source), "--out", str(out), "--detectors", detectors, "--quiet", *extra]
    if processes == 1:
        return [sys.executable, "-m", "bayesfake", *args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "bayesfake", *args]


def summaries(stderr: str) -> list[dict]:
    """Each process's JSON summary (two processes may write theirs on one line of the shared stderr)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := stderr.find('{"scored"', at)) >= 0:
        summary, end = decoder.raw_decode(stderr, at)
        found.append(summary)
        at = end
    return found


def throughput(processes: int, images: int, detectors: str, chunk: int, work: Path) -> dict:
    out = work / f"throughput-{processes}.parquet"
    cmd = command(processes, TEST_PARQUET, out, detectors, ["--limit", str(images), "--chunk-size", str(chunk)])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    ranks = summaries(done.stderr)
    scored = sum(r["scored"] for r in ranks)
    loop = max(r["seconds"] for r in ranks)
    rows = pq.ParquetFile(out).metadata.num_rows
    return {"processes": processes, "images": scored, "rows": rows, "loop_s": loop, "wall_s": wall,
            "images_per_s": scored / loop,
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}


def watch(proc: subprocess.Popen, parts: Path, kill_after: int | None) -> dict:
    """Sample the process's RSS every 0.5 s until it ends (or kill it once ``kill_after`` parts exist)."""
    ps = psutil.Process(proc.pid)
    samples, at_first_part, killed, first_index = [], None, False, None
    existing = len(list(parts.glob("*.parquet"))) if parts.is_dir() else 0  # a resumed run starts with some
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            break
        samples.append(rss)
        count = (len(list(parts.glob("*.parquet"))) if parts.is_dir() else 0) - existing
        if count >= 1 and at_first_part is None:
            at_first_part, first_index = rss, len(samples) - 1
        if kill_after is not None and count >= kill_after:
            proc.send_signal(signal.SIGKILL)
            killed = True
            proc.wait()
            break
        time.sleep(0.5)
    stderr = proc.stderr.read() if proc.stderr else ""
    # Within a chunk the RSS swings by the activations of a batch; growth is the trend: the peak over the last
    # quarter of the run (after the first part) minus the peak over its first quarter.
    after = samples[first_index:] if first_index is not None else samples
    quarter = max(1, len(after) // 4)
    quarters = [max(after[i * quarter:(i + 1) * quarter] or [0]) for i in range(4)] if len(after) >= 4 else []
    return {"peak": max(samples) if samples else 0, "at_first_part": at_first_part or (samples[-1] if samples else 0),
            "early_peak": max(after[:quarter]) if after else 0, "late_peak": max(after[-quarter:]) if after else 0,
            "quarter_peaks": quarters, "low_after_first_part": min(after) if after else 0,
            "killed": killed, "returncode": proc.returncode, "stderr": stderr, "samples": len(samples)}


def scale_check(images: int, detectors: str, chunk: int, kill_after: int, work: Path) -> dict:
    from bayesfake.score import parts_dir

    out = work / "scale.parquet"
    extra = ["--split", "train", "--limit", str(images), "--chunk-size", str(chunk)]
    cmd = command(1, CIFAKE, out, detectors, extra)
    start = time.perf_counter()
    first = watch(subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV),
                  parts_dir(out), kill_after)
    first_s = time.perf_counter() - start
    parts_left = len(list(parts_dir(out).glob("*.parquet")))
    rows_before = sum(pq.ParquetFile(p).metadata.num_rows for p in parts_dir(out).glob("*.parquet"))
    start = time.perf_counter()
    second = watch(subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV),
                   parts_dir(out), None)
    second_s = time.perf_counter() - start
    if second["returncode"] != 0:
        raise SystemExit(f"resumed run failed:\n{second['stderr'][-3000:]}")
    resumed = summaries(second["stderr"])[0]
    keys = pq.read_table(out, columns=["key"]).column(0).to_pylist()
    expected = {f"train/{i}" for i in range(images)}
    # A fresh run on the first 200 images: the resumed file holds the same answers.
    fresh = work / "fresh.parquet"
    subprocess.run(command(1, CIFAKE, fresh, detectors, ["--split", "train", "--limit", "200"]), check=True,
                   capture_output=True, env=ENV)
    a = {r["key"]: r for r in pq.read_table(out).to_pylist() if r["key"] in {f"train/{i}" for i in range(200)}}
    b = {r["key"]: r for r in pq.read_table(fresh).to_pylist()}
    worst = 0.0
    same_text = True
    for key, row in b.items():
        for name, value in row.items():
            if isinstance(value, float):
                worst = max(worst, abs(value - a[key][name]))
            elif name != "index":
                same_text &= value == a[key][name]
    return {"images": images, "killed": first["killed"], "killed_after_s": first_s, "parts_at_kill": parts_left,
            "rows_at_kill": rows_before, "resume_scored": resumed["scored"], "resume_skipped": resumed["skipped"],
            "resume_s": second_s, "rows": len(keys), "unique_keys": len(set(keys)),
            "missing": len(expected - set(keys)),
            "extra": len(set(keys) - expected), "rss_first_part_mb": first["at_first_part"] / 2**20,
            "rss_peak_first_mb": first["peak"] / 2**20, "rss_resume_first_part_mb": second["at_first_part"] / 2**20,
            "rss_peak_resume_mb": second["peak"] / 2**20,
            "quarter_peaks_resume_mb": [q / 2**20 for q in second["quarter_peaks"]],
            "low_resume_mb": second["low_after_first_part"] / 2**20,
            "early_peak_resume_mb": second["early_peak"] / 2**20, "late_peak_resume_mb": second["late_peak"] / 2**20,
            "growth_resume_mb": (second["late_peak"] - second["early_peak"]) / 2**20,
            "growth_first_mb": (first["late_peak"] - first["early_peak"]) / 2**20,
            "fresh_max_abs_diff": worst, "fresh_text_equal": same_text,
            "command": " ".join(["python"] + cmd[1:])}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="CIFAKE test images per throughput run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--detectors", default=CIFAKE_DETECTORS)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--scale-images", type=int, default=10000, help="images of the kill/resume check (0: skip)")
    parser.add_argument("--kill-after-parts", type=int, default=3)
    parser.add_argument("--output", help="also write the results, with command, machine and date, to this file")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()  # other jobs on the cores slow every figure: say how busy the machine was
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    lines = []
    try:
        rows = []
        for p in args.processes:
            r = throughput(p, args.images, args.detectors, args.chunk_size, work)
            rows.append(r)
            print(f"{p} process(es): {r['images_per_s']:.1f} images/s", file=sys.stderr)
        base = rows[0]["images_per_s"]
        lines += ["| processes | images | rows written | scoring loop (s) | images/s | vs 1 process | wall incl. "
                  "start-up (s) | command |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r['processes']} | {r['images']} | {r['rows']} | {r['loop_s']:.1f} | "
                         f"{r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f} | {r['wall_s']:.1f} | "
                         f"`{r['command']}` |")
        if args.scale_images:
            s = scale_check(args.scale_images, args.detectors, args.chunk_size, args.kill_after_parts, work)
            print(json.dumps(s), file=sys.stderr)
            ok = s["rows"] == s["unique_keys"] == s["images"] and not s["missing"] and not s["extra"]
            lines += ["", f"At-scale check: `{s['command']}`", "",
                      "| what | value |", "|---|---|",
                      f"| images | {s['images']:,} |",
                      f"| killed with SIGKILL after | {s['killed_after_s']:.0f} s, {s['parts_at_kill']} parts "
                      f"({s['rows_at_kill']:,} rows) on disk |",
                      f"| resumed run | skipped {s['resume_skipped']:,}, scored {s['resume_scored']:,} in "
                      f"{s['resume_s']:.0f} s (incl. start-up and merge) |",
                      f"| merged rows / unique keys / missing / extra | {s['rows']:,} / {s['unique_keys']:,} / "
                      f"{s['missing']} / {s['extra']} ({'no row lost or duplicated' if ok else 'MISMATCH'}) |",
                      f"| first 200 rows vs a fresh run | max abs difference {s['fresh_max_abs_diff']:.2g}, text "
                      f"columns {'equal' if s['fresh_text_equal'] else 'DIFFERENT'} |",
                      f"| RSS, killed run: at its first part, peak | {s['rss_first_part_mb']:.0f} MB, "
                      f"{s['rss_peak_first_mb']:.0f} MB |",
                      f"| RSS, resumed run: at its first part, peak | {s['rss_resume_first_part_mb']:.0f} MB, "
                      f"{s['rss_peak_resume_mb']:.0f} MB |",
                      "| RSS of the resumed run after its first part, peak of each quarter of the run | "
                      + ", ".join(f"{q:.0f}" for q in s["quarter_peaks_resume_mb"])
                      + f" MB (lowest sample {s['low_resume_mb']:.0f} MB) |",
                      f"| RSS growth over the resumed run (peak of its last quarter - peak of its first quarter) | "
                      f"{s['late_peak_resume_mb']:.0f} - {s['early_peak_resume_mb']:.0f} = "
                      f"{s['growth_resume_mb']:.0f} MB (target < 100 MB: "
                      f"{'met' if s['growth_resume_mb'] < 100 else 'MISSED'}) |"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.output:
        cmd = "python benchmarks/bench_score.py " + " ".join(argv if argv is not None else sys.argv[1:])
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        header = (f"# bayesfake score: throughput and the at-scale check\n\nCommand: `{cmd.strip()}`\n\n"
                  f"Machine: {cores} CPU cores ({cpu_name()}), Python {platform.python_version()}; date "
                  f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. Detectors: "
                  f"{args.detectors} (each at its own T), evidence read, chunks of {args.chunk_size} images. "
                  f"Load average when it started: {' / '.join(f'{x:.1f}' for x in load_at_start)} (above 1, other "
                  "jobs were running and every figure is slower).\n\n")
        Path(args.output).write_text(header + text + "\n")
    return text


if __name__ == "__main__":
    main()
