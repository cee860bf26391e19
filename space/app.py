"""BayesFake Space: is this image AI-generated, how sure are the detectors, and what does the file itself say?

    python space/app.py [--models ID_OR_PATH,...]     # or BAYESFAKE_MODELS=...; default: models.txt next to app.py
                                                      # (a folder built by space/build.py), else the released ones
                        [--torch-threads N]           # or BAYESFAKE_TORCH_THREADS=N; default 1
                        [--show-paths]                # print where the code and hub_models come from, and exit

Every detector is loaded once at start through ``hub_models.hub.load_detector`` (``AutoModel.from_pretrained`` with
``trust_remote_code=True``); one that fails to load is reported on the page and in ``/models`` while the others work.
The server honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.

API (``gradio_client``; image files go through ``handle_file``):
    /predict        (image, num_samples=30, detectors=None) -> {"image": {...}, "headline": {verdict, answered,
                    abstained, outside, explanation}, "detectors": {name: result (in_domain and domain_score: None
                    without a domain gate)}, "evidence": {...}}
    /predict_batch  (images, num_samples=30, detectors=None) -> [one /predict answer, or {"file", "error", "evidence"},
                    ...]
    /evidence       (image) -> what the file itself says about its origin: {"findings": [{kind, says, strong, detail,
                    proves, fields}], "summary", "errors", "says", "strong", "checked", "format", "size"}
    /explain        (image, num_samples=30, detectors=None) -> {"image": {...}, "detectors": {name: saliency map and
                    top features; an autoencoder detector adds its reconstruction and per-pixel error map}}
    /models         () -> {"loaded": [{name, config}], "failed": [{name, error}], "torch_threads": N}
``detectors`` is None (all loaded ones), one name, "name1,name2", or a list of names. Answers are repeatable: every
request samples with the same seed. A refused request (no image, a file that was not uploaded, a bad T, an unknown
detector, an unreadable image) answers an error that says why. ``/evidence`` answers every uploaded file, a broken one
too: what could not be read is in its ``errors``. $BAYESFAKE_C2PA_TRUST_ANCHORS names a PEM file of C2PA signers to
trust.

This file is the page, the API and the command line; what they compute is in detectors.py (the detectors) and
provenance.py (the file's own evidence, and the page's words for it), the figures in charts.py. The page and the API
read the uploaded file as it arrived: the upload is a plain file input (an image input would re-encode it and drop its
metadata), with a preview beside it.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import gradio as gr
import gradio.utils
import pandas as pd
import torch
from gradio.data_classes import FileData
from gradio_client.utils import is_file_obj_with_meta, is_http_url_like

# hub_models comes from this file's own folder when run as a script (python space/app.py: sys.path[0] is space/, where
# space/hub_models is a symlink to the checkout's ../hub_models; python app.py in a Space folder written by
# space/build.py, which holds a copy), so a checkout never runs another checkout's package through an editable install.
# Imported as the package space (python -m space.app, tests), it is the hub_models next to space/ on sys.path.
# The evidence package comes from the same place, for the same reason (space/evidence links to ../evidence; a built
# Space folder holds a copy).
import evidence
import hub_models
from hub_models.headline import names_text
from hub_models.hub import DEFAULT_REPO_IDS

if __package__:  # imported as the package space (tests, benchmarks)
    from . import provenance
    from .charts import (batch_charts, domain_chart, explanation_chart, reconstruction_chart, short_label,
                         single_image_charts)
    from .detectors import DEFAULT_NUM_SAMPLES, MAX_NUM_SAMPLES, DetectorPool, Names, preview_source, read_image
else:  # run as a script from its own folder: python space/app.py, or app.py in a pushed Space
    import provenance
    from charts import (batch_charts, domain_chart, explanation_chart, reconstruction_chart, short_label,
                        single_image_charts)
    from detectors import DEFAULT_NUM_SAMPLES, MAX_NUM_SAMPLES, DetectorPool, Names, preview_source, read_image

SPACE_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPACE_DIR / "examples"
# The detectors a Space folder serves by default, one repo id or folder a line (space/build.py writes it; a checkout
# has none and serves the released detectors).
MODELS_FILE = SPACE_DIR / "models.txt"
MODELS_ENV = "BAYESFAKE_MODELS"
log = logging.getLogger("bayesfake.space")
# torch's intra-op threads when the Space runs as a program (--torch-threads, else this variable, else 1). One thread
# by default: the detectors are small (one image, 32-128 px), and a team of two or more spin-waits between parallel
# regions, so it stalls as soon as anything else wants the cores: the page's own decoding and charts, or another
# process (benchmarks/results_inference_thread.md measures each choice, idle and busy).
TORCH_THREADS_ENV = "BAYESFAKE_TORCH_THREADS"
DEFAULT_TORCH_THREADS = 1
MAX_FILE_SIZE = "25mb"
BATCH_CSV_DIR = Path(tempfile.gettempdir()) / "bayesfake-batch"
BATCH_CSV_MAX_AGE_S = 3600
# The queue runs this many requests at once (decoding and plotting overlap; model forwards take turns on
# detectors.INFERENCE_THREAD) and holds up to QUEUE_MAX_SIZE more before refusing new ones.
QUEUE_CONCURRENCY = 4
QUEUE_MAX_SIZE = 256
# Batch table and CSV; entropies in nats. Long text (error, warnings) after the numbers, so they stay in view; then
# what the file itself says: evidence (ai-generated, ai-edited, camera or none), whether that is strong, the summary.
# Then, added later and so last (CSV readers that index columns keep working): the detector's domain check (in_domain,
# domain_score; empty for a detector without one) and the file's combined answer over the detectors that ran
# (headline, and the detectors that answered, abstained, or were outside their domain, "; "-separated).
TABLE_COLUMNS = ["file", "detector", "verdict", "P(FAKE)", "std", "epistemic", "aleatoric", "total", "T", "error",
                 "warnings", "evidence", "evidence_strong", "evidence_summary", "in_domain", "domain_score",
                 "headline", "headline_answered", "headline_abstained", "headline_outside"]
# The page's table: one row per file and detector; the summary and the combined answer are one per file, so the status
# above the table lists them instead.
PAGE_TABLE_COLUMNS = ["file", "detector", "verdict", "P(FAKE)", "std", "epistemic", "aleatoric", "total", "T",
                      "in_domain", "error", "warnings", "evidence", "evidence_strong"]
PAGE_TABLE_WIDTHS = ["8%", "8%", "9%", "7%", "5%", "8%", "8%", "6%", "3%", "7%", "7%", "10%", "7%", "7%"]
# Headers as shown: "in domain" breaks between its words in its narrow column ("in_domain" broke mid-word).
PAGE_TABLE_HEADERS = [{"in_domain": "in domain"}.get(name, name) for name in PAGE_TABLE_COLUMNS]
# The headline's look: a box whose edge says what kind of answer it is (strong AI evidence, strong camera evidence,
# the detectors' guess, nothing analysed); its first paragraph is the answer (the file's own word in bold; the
# detectors' sentence with only its verdict in bold, since its reasons can be long).
PAGE_CSS = """
#headline { border: 1px solid var(--border-color-primary); border-left: 8px solid #8a8f98; border-radius: 8px;
            padding: 10px 16px; background: var(--background-fill-secondary); }
#headline.tone-ai { border-left-color: #c0392b; }
#headline.tone-camera { border-left-color: #2470c2; }
#headline.tone-error { border-left-color: #d68910; }
#headline p:first-child { font-size: 1.2em; margin-bottom: 6px; }
#headline.tone-ai p:first-child, #headline.tone-camera p:first-child { font-weight: 600; }
#headline p:nth-child(3) { font-size: 0.95em; }
#image-preview img { width: 100%; height: 100%; object-fit: contain; }
#evidence-panel, #verdict { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 4px 14px; }
#evidence-panel ol { padding-left: 1.4em; }
#evidence-panel li { margin-bottom: 8px; }
"""


def uploaded_path(upload) -> str:
    """The server-side path of an uploaded file (a gradio FileData dict). Plain strings are refused, and so is any path
    outside gradio's upload folder: the client names a file it sent, never one that lives on the server."""
    if upload is None:
        raise ValueError("no image given")
    if isinstance(upload, FileData):
        upload = upload.model_dump()
    if isinstance(upload, dict) and isinstance(upload.get("path"), str):
        return check_uploaded(upload["path"])
    raise ValueError("send the image as an uploaded file (gradio_client.handle_file(path)), not as a plain string")


def check_uploaded(path: str) -> str:
    """``path`` if it lies in gradio's upload folder (where /gradio_api/upload and the page put files), else
    ``ValueError``."""
    folder = os.path.realpath(gradio.utils.get_upload_folder())
    if os.path.commonpath([folder, os.path.realpath(path)]) != folder:
        raise ValueError(f"file was not uploaded to this server: {path} (upload it first: gradio_client.handle_file, "
                         f"or POST /gradio_api/upload)")
    return path


class SpaceBlocks(gr.Blocks):
    """``gr.Blocks`` whose API answers a refused request with the reason.

    Gradio checks a call's inputs before the endpoint runs: it wants a value for every parameter, and each file (a
    FileData dict) must be one uploaded to this server. It answers a failed check with ``{"error": null}`` (a message
    is shown only for ``gr.Error``, or for every exception with ``launch(show_error=True)``, internal ones included).
    Here missing trailing inputs take the parameter's default, so ``{"data": []}`` reaches the endpoint, which says
    "no image given"; a file that was not uploaded is refused by name before gradio would open it; anything else
    gradio refuses while reading the inputs comes back as a ``gr.Error`` with its message."""

    async def preprocess_data(self, block_fn, inputs, *args, **kwargs):
        inputs = list(inputs or [])
        inputs += [getattr(block, "value", None) for block in block_fn.inputs[len(inputs):]]
        try:
            for path in sent_file_paths(inputs):
                check_uploaded(path)
            return await super().preprocess_data(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:  # the client's input was refused: say why
            raise gr.Error(str(err), print_exception=False) from err

    def launch(self, *args, **kwargs):
        """``gr.Blocks.launch`` with the page's CSS unless the caller gives its own (gradio 6 takes it here)."""
        kwargs.setdefault("css", PAGE_CSS)
        return super().launch(*args, **kwargs)


def sent_file_paths(value) -> list[str]:
    """The local paths of the FileData dicts anywhere in a request's inputs (URLs are gradio's to fetch and check)."""
    if is_file_obj_with_meta(value):
        return [] if not isinstance(value["path"], str) or is_http_url_like(value["path"]) else [value["path"]]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in sent_file_paths(item)]
    return []


def model_ids_from(arg: str | None) -> list[str]:
    """Comma-separated ids/paths (the --models flag, else BAYESFAKE_MODELS), else the ids in models.txt next to this
    file (a built Space folder), else the released detectors."""
    text = arg if arg is not None else os.environ.get(MODELS_ENV, "")
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids and MODELS_FILE.is_file():
        lines = (line.split("#", 1)[0].strip() for line in MODELS_FILE.read_text().splitlines())
        ids = [line for line in lines if line]
    return ids or list(DEFAULT_REPO_IDS)


def import_paths() -> dict[str, str]:
    """Where this app's code and its hub_models package were imported from (--show-paths; logged at start)."""
    return {"app": str(Path(__file__).resolve()),
            "detectors": str(Path(sys.modules[DetectorPool.__module__].__file__).resolve()),
            "hub_models": str(Path(hub_models.__file__).resolve().parent),
            "evidence": str(Path(evidence.__file__).resolve().parent)}


# ----------------------------------------------------------------------------------------------------------------------
# Page text and tables


NATS = "nats: 0 is sure, 0.69 is a coin toss"  # what the unit means, said once per detector


def domain_text(r: dict) -> str:
    """The detector's domain check in plain words: in or out, with its score against its limit, or that it has none."""
    if r.get("in_domain") is None:
        return ("none: this detector has no domain check, so it answers every image, even ones unlike anything it "
                "was trained on")
    where = (f"score {r['domain_score']:.3g}, limit {r['domain_threshold']:.3g}; higher means less like its training "
             "data")
    if r["in_domain"]:
        return f"the image is like its training data ({where})"
    return f"**the image is outside what it was trained on** ({where}), so it gives no verdict"


def detector_markdown(r: dict) -> str:
    """One detector's details: the verdict, its domain check, P(FAKE) with its spread, the uncertainty in plain words
    first (the jargon in brackets), and what it was trained on."""
    p_fake = r["probs"]["FAKE"]
    if r.get("stochastic", True):
        spread = (f"P(FAKE) = **{p_fake:.3f} ± {r['std']['FAKE']:.3f}** over T = {r['num_samples']} samples (± is "
                  "the spread of its Monte Carlo samples)")
        split = (f"epistemic {r['mutual_information']:.3f} (the detector's own doubt: how much its samples disagree, "
                 f"the mutual information) + aleatoric {r['expected_entropy']:.3f} (ambiguity in the image itself)")
    else:
        spread = f"P(FAKE) = **{p_fake:.3f}**, no sampling spread (deterministic)"
        split = "all of it ambiguity in the image itself (aleatoric): one deterministic pass has no sampling doubt"
    if r["reject_entropy"] is None:
        reject = ""
    elif r.get("reject_score") == "verdict_entropy":
        reject = (f"; it says uncertain when P(FAKE) is too near its threshold: nearness {r['verdict_entropy']:.3f} "
                  f"(the verdict entropy: {math.log(2):.3f} at the threshold, 0 far from it), uncertain above "
                  f"{r['reject_entropy']:.2f}")
    else:
        reject = f"; it says uncertain above {r['reject_entropy']:.2f}"
    lines = [f"### {short_label(r['detector'])}: {r['verdict']}",
             f"- *Domain check:* {domain_text(r)}.",
             f"- {spread}; it calls an image AI-generated from P(FAKE) {r['threshold']:.2f} up.",
             f"- *Uncertainty* ({NATS}): total {r['predictive_entropy']:.3f} = {split}{reject}.",
             f"- *Trained on:* {r['training_domain'] or 'not stated'} ({r['image_size']}x{r['image_size']} RGB)."]
    text = "\n".join(lines)
    if r["warnings"]:
        text += "\n\n> ⚠️ **Far from this detector's training data** (trust the verdict less): " + "; ".join(
            r["warnings"]) + "."
    return text


def verdict_markdown(answer: dict) -> str:
    image = answer["image"]
    parts = ["#### What each pixel detector says",
             f"**{image['name']}**: {image['width']}x{image['height']} px, {image['mode']}"
             f"{', ' + image['format'] if image['format'] else ''}"]
    parts += [detector_markdown(r) for r in answer["detectors"].values()]
    return "\n\n".join(parts)


def scope_markdown(pool: DetectorPool) -> str:
    """What the loaded detectors were trained on and what they cannot judge, from their configs, said up front."""
    if not pool.detectors:
        return ""
    by_domain: dict[str, list[str]] = {}
    for d in pool.detectors.values():
        by_domain.setdefault(d.config.training_domain or "data that is not stated", []).append(short_label(d.name))
    n = len(pool.detectors)
    learned = " ".join(
        f"{'All ' + str(n) + ' detectors' if len(names) == n > 1 else 'The detector' if n == 1 else names_text(names)}"
        f" learned from {domain}." for domain, names in by_domain.items())
    cifake = any("cifake" in [x.lower() for x in d.config.training_data] or "cifake" in d.config.training_domain.lower()
                 for d in pool.detectors.values())
    unlike = ("real photos at full size, or pictures from other generators" if cifake else
              "pictures unlike their training data")
    ungated = [short_label(d.name) for d in pool.detectors.values() if d.model.domain_gate is None]
    one = len(ungated) == 1
    if len(ungated) == n:
        gate = ("no detector here has a domain check yet, so " + ("it still answers" if n == 1 else "they still answer")
                + " such images: trust " + ("it" if n == 1 else "them") + " only on images like the training data")
    else:
        gate = "a detector with a domain check says \"outside what it was trained on\" and gives no verdict"
        if ungated:
            gate += (f"; {names_text(ungated)} ha{'s' if one else 've'} no domain check and still answer"
                     f"{'s' if one else ''} them, so trust {'it' if one else 'them'} only on images like the training "
                     "data")
    return f"**What the detectors know.** {learned} {'It' if n == 1 else 'They'} cannot judge {unlike}: {gate}."


def load_failures_markdown(failed: dict[str, str]) -> str:
    if not failed:
        return ""
    lines = [f"- `{name}`: {error}" for name, error in failed.items()]
    return f"**⚠️ {len(failed)} detector(s) failed to load and are not available:**\n" + "\n".join(lines)


def detectors_markdown(pool: DetectorPool) -> str:
    rows = ["| detector | head | backbone | training domain | domain check | input | default T | threshold | "
            "reject above | metrics |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for d in pool.detectors.values():
        c = d.config
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in c.metrics.items() if isinstance(v, (int, float))) or "-"
        reject = "-" if c.reject_entropy is None else f"{c.reject_entropy:.2f} nats" + (
            " (verdict entropy)" if c.reject_score == "verdict_entropy" else "")
        gate = ("none (answers every image)" if d.model.domain_gate is None or c.domain_threshold is None else
                f"{'own features' if c.domain_gate == 'features' else c.domain_gate}, limit {c.domain_threshold:.3g}")
        rows.append(f"| `{d.name}` | {c.head} | {c.backbone} | {c.training_domain or '-'} | {gate} | {c.image_size}x"
                    f"{c.image_size} RGB | {c.num_samples} | {c.threshold:.3f} | {reject} | {metrics} |")
    text = "\n".join(rows) if pool.detectors else "No detector is loaded."
    return text + ("\n\n" + load_failures_markdown(pool.failed) if pool.failed else "")


def batch_table(answers: list[dict]) -> pd.DataFrame:
    """One row per file and detector (one row for a file that could not be read), with the file's evidence columns."""
    rows = []
    for a in answers:
        found = provenance.batch_columns(a.get("evidence"))
        if "error" in a:
            rows.append({"file": a["file"], "error": a["error"], **found})
            continue
        combined = a["headline"]
        answer = {"headline": combined["verdict"], **{f"headline_{key}": "; ".join(combined[key])
                                                      for key in ("answered", "abstained", "outside")}}
        for r in a["detectors"].values():
            score = r.get("domain_score")
            rows.append({"file": a["image"]["name"], "detector": r["detector"], "verdict": r["verdict"],
                         "P(FAKE)": round(r["probs"]["FAKE"], 4), "std": round(r["std"]["FAKE"], 4),
                         "epistemic": round(r["mutual_information"], 4), "aleatoric": round(r["expected_entropy"], 4),
                         "total": round(r["predictive_entropy"], 4), "T": r["num_samples"],
                         "warnings": "; ".join(r["warnings"]), "error": "", **found,
                         "in_domain": r.get("in_domain"), "domain_score": None if score is None else round(score, 4),
                         **answer})
    # object dtype first: pandas deprecates filling a float column (an unreadable file's empty P(FAKE), domain_score)
    # with text, and will raise on it
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).astype(object).fillna("")


def page_table(table: pd.DataFrame) -> pd.DataFrame:
    """The batch table as the page shows it: its columns, with readable headers, and each detector by its short name
    (the CSV keeps the full repo ids or paths)."""
    shown = table[PAGE_TABLE_COLUMNS].copy()
    shown["detector"] = [short_label(name) if name else name for name in shown["detector"]]
    shown.columns = PAGE_TABLE_HEADERS
    return shown


def write_batch_csv(table: pd.DataFrame) -> str:
    """The batch table as a CSV file to download. Gradio serves its own copy, so ours only has to outlive the response:
    files of earlier batches older than BATCH_CSV_MAX_AGE_S are removed here rather than piling up."""
    BATCH_CSV_DIR.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - BATCH_CSV_MAX_AGE_S
    for old in BATCH_CSV_DIR.glob("*.csv"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except FileNotFoundError:  # another request removed it first
            pass
    with tempfile.NamedTemporaryFile("w", suffix=".csv", prefix="bayesfake_batch_", dir=BATCH_CSV_DIR,
                                     delete=False) as csv_file:
        table.to_csv(csv_file, index=False)
    return csv_file.name


# ----------------------------------------------------------------------------------------------------------------------
# The app

INTRO = """# BayesFake: is this image AI-generated, and how sure are the detectors?
The answer comes first, in one sentence. The file itself is read as uploaded: content credentials (C2PA), generator
settings, invisible watermarks and camera tags can say where it came from, and the strong ones are harder evidence than
any detector. Then the pixel detectors judge the picture. Each one answers only when it is sure enough; otherwise it
says *uncertain* (ask a human), and for an image unlike what it was trained on it says *outside* and gives no verdict.
The answer counts only the detectors that could judge the image, and is *uncertain* when they disagree. A verdict is a
screening aid, never proof; a file without provenance evidence is not thereby real (most sites strip metadata)."""


API_HELP = """Call the Space from Python with `gradio_client` (`pip install gradio_client`):

```python
import httpx
from gradio_client import Client, handle_file

# ssl_verify: one verifying TLS context for all of the client's requests (about 40 ms less per call than the default)
client = Client("http://127.0.0.1:7860", ssl_verify=httpx.create_ssl_context())   # or the Space id
answer = client.predict(handle_file("photo.jpg"), 30, api_name="/predict")
print(answer["headline"]["verdict"], answer["headline"]["explanation"])   # the one answer over the detectors
for name, r in answer["detectors"].items():
    print(name, r["verdict"], r["probs"]["FAKE"], r["std"]["FAKE"], r["mutual_information"], r["warnings"],
          r["in_domain"], r["domain_score"])   # in_domain / domain_score: None for a detector without a domain gate
rows = client.predict([handle_file("a.png"), handle_file("b.jpg")], 30, api_name="/predict_batch")
why = client.predict(handle_file("photo.jpg"), 30, api_name="/explain")  # saliency map + top features per detector
print(answer["evidence"]["summary"])   # what the file itself says (also in each /predict_batch answer)
found = client.predict(handle_file("photo.jpg"), api_name="/evidence")  # the same, without the detectors
for f in found["findings"]:            # strongest first
    print(f["kind"], f["says"], f["strong"], f["detail"], f["proves"])
print(client.predict(api_name="/models"))
```
Each answer is repeatable (fixed seed per request). An unreadable image raises an error that says why; `/evidence`
answers any uploaded file, and says in `errors` what it could not read.
`headline` combines the detectors that ran: those outside their domain do not count; it is "likely ..." only when
every detector that answered agrees, "uncertain: needs human review" when they disagree or all abstained, and
"outside what this detector was trained on: no verdict" when none could judge the image (`answered`, `abstained`,
`outside` name them).
`detectors=` (third argument: one name, "a,b" or a list of names) restricts the run to some of the loaded detectors."""


EMPTY_HEADLINE = "Upload an image or pick an example."
EMPTY_EVIDENCE = ("#### What the file itself says\nRead from the file as uploaded: content credentials (C2PA), "
                  "generator settings, invisible watermarks, IPTC labels and EXIF tags.")
EMPTY_VERDICT = ("#### What each pixel detector says\nEach detector's verdict, its domain check, P(FAKE) with its "
                 "spread over T samples, and its uncertainty.")
RECONSTRUCTION_CAPTION = (
    "**What an autoencoder detector rebuilds.** This kind of detector squeezes the image into a short description "
    "(its features) and draws the image again from that description alone; it learned to do this on its training "
    "images. Left: the image as the detector sees it (shrunk to its small input size). Middle: what it draws back. "
    "Right: where the two differ (bright = drawn back badly; the same colour scale for every image). Its error "
    "score compares the two in the detector's first feature layers and says how unusual that difference is next to "
    "the differences on its training images (higher = more unusual). The verdict "
    "comes from the description, not from this picture; a large error mostly says the image is unlike what the "
    "detector was trained on, which is also why it may answer \"outside what this detector was trained on\".")


def build_demo(model_ids: list[str], reader: provenance.EvidenceReader | None = None) -> gr.Blocks:
    """Load the detectors once and build the page and the API on them (the queue is configured too). ``reader``
    reads the files' own evidence (default: trust anchors from $BAYESFAKE_C2PA_TRUST_ANCHORS, if set)."""
    reader = reader or provenance.EvidenceReader.from_env()
    pool = DetectorPool.load(model_ids)
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def predict(image: FileData, num_samples: int = DEFAULT_NUM_SAMPLES, detectors: Names = None) -> dict:
        """One image -> "headline": the one answer over the detectors that ran (verdict, answered, abstained,
        outside, explanation); per detector: probs, std, predictive_entropy, mutual_information (epistemic),
        expected_entropy (aleatoric), verdict, threshold, num_samples, sample_p_fake, warnings, in_domain and
        domain_score (None without a domain gate); and "evidence": what the file itself says about its origin (as
        /evidence answers)."""
        try:
            return provenance.analyse_file(pool, reader, uploaded_path(image), num_samples, detectors)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def predict_batch(images: list[FileData], num_samples: int = DEFAULT_NUM_SAMPLES,
                      detectors: Names = None) -> list[dict]:
        """Several images -> one /predict answer per image, or {"file", "error", "evidence"} for an image that cannot
        be read."""
        try:
            return provenance.analyse_files(pool, reader, [uploaded_path(image) for image in images or []],
                                            num_samples, detectors)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def explain(image: FileData, num_samples: int = DEFAULT_NUM_SAMPLES, detectors: Names = None) -> dict:
        """One image -> per detector: the saliency map (input gradients of P(FAKE), [0, 1], at the detector's input
        size) and the top features by |feature x gradient| with the gradient's sign (> 0 pushes towards FAKE); an
        autoencoder detector adds "reconstruction": the image as it sees it, what it rebuilds, the per-pixel error map
        (all in [0, 1]) and reconstruction_error."""
        try:
            return pool.explain(read_image(uploaded_path(image)), num_samples, detectors)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def read_file_evidence(image: FileData) -> dict:
        """One file -> what it says about its own origin: findings (strongest first: kind, says, strong, detail,
        proves, fields), summary, errors, says (ai-generated, ai-edited, camera or none), strong, checked, format,
        size. A broken or empty file is answered too, with what could not be read in errors."""
        try:
            path = uploaded_path(image)
            if not os.path.isfile(path):
                raise ValueError(f"{Path(path).name}: no such file")
            return reader.read(path)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def models() -> dict:
        """The loaded detectors with their configs, and the ones that failed to load (with the reason)."""
        return pool.describe()

    def show_preview(upload):
        # The file input shows a name; people want to see the picture.
        try:
            return None if upload is None else preview_source(uploaded_path(upload))
        except ValueError:
            return None

    def no_reconstruction():
        return gr.Plot(None, visible=False), gr.Markdown(visible=False)

    def analyse_page(upload, names, num_samples):
        # Runs with preprocess=False so the raw upload reaches read_image and the evidence reader as it arrived.
        if upload is None:
            return (gr.Markdown(EMPTY_HEADLINE, elem_classes=["tone-none"]), EMPTY_EVIDENCE, EMPTY_VERDICT,
                    gr.Plot(None, visible=False), None, None, None, None, *no_reconstruction(), None)
        try:
            path = uploaded_path(upload)
        except ValueError as err:
            gr.Warning(str(err))
            return (gr.Markdown(f"Could not analyse this image: {err}", elem_classes=["tone-error"]), EMPTY_EVIDENCE,
                    f"**Could not analyse this image:** {err}", gr.Plot(None, visible=False), None, None, None, None,
                    *no_reconstruction(), None)
        pending = reader.start(path)  # read while the image is decoded and the detectors run
        answer = charts = why = error = domain = rebuilt = None
        try:
            image = read_image(path)
            answer, explained = pool.analyse_and_explain(image, num_samples, names)
            charts = single_image_charts(list(answer["detectors"].values()))
            domain = domain_chart(list(answer["detectors"].values()))
            why = explanation_chart(image, list(explained["detectors"].values()))
            rebuilt = reconstruction_chart(list(explained["detectors"].values()))
        except ValueError as err:
            gr.Warning(str(err))
            error = str(err)
        found = reader.result(pending)
        text, tone = provenance.headline(found, answer, error)
        headline = gr.Markdown(text, elem_classes=[f"tone-{tone}"])
        if answer is None:
            return (headline, provenance.panel(found), f"**Could not analyse this image:** {error}",
                    gr.Plot(None, visible=False), None, None, None, None, *no_reconstruction(),
                    {"error": error, "evidence": found})
        answer["evidence"] = found
        # the domain chart only where a selected detector has a domain gate, the reconstruction only for autoencoders
        return (headline, provenance.panel(found), verdict_markdown(answer),
                gr.Plot(domain, visible=domain is not None), *charts, why,
                gr.Plot(rebuilt, visible=rebuilt is not None), gr.Markdown(visible=rebuilt is not None), answer)

    def analyse_batch_page(paths, names, num_samples):
        try:
            answers = provenance.analyse_files(pool, reader, paths or [], num_samples, names)
        except ValueError as err:
            gr.Warning(str(err))
            return f"**Could not run the batch:** {err}", None, None, None, None
        table = batch_table(answers)
        failed = sum("error" in a for a in answers)
        strong = sum(a["evidence"]["strong"] for a in answers)
        status = f"{len(answers) - failed} of {len(answers)} images analysed" + (
            f"; {failed} could not be read (see the error column)" if failed else "") + (
            f"; {strong} carr{'ies' if strong == 1 else 'y'} strong provenance evidence in the file itself" if strong
            else "; no file carries strong provenance evidence (which does not mean the images are real)")
        status += ".\n\n**Each file's answer, then what the file itself says:**\n" + "\n".join(
            f"- `{a['image']['name'] if 'image' in a else a['file']}`: "
            f"{a['headline']['explanation'] + ' ' if 'headline' in a else ''}{a['evidence']['summary']}"
            for a in answers)
        charts = batch_charts(answers, names) if failed < len(answers) else (None, None)
        return status, page_table(table), write_batch_csv(table), *charts

    # delete_cache: every hour, drop uploads and result files older than a day (a Space runs for weeks).
    with SpaceBlocks(title="BayesFake: AI-generated image detection with uncertainty",
                     delete_cache=(3600, 86400)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(scope_markdown(pool), elem_id="scope")
        gr.Markdown(load_failures_markdown(pool.failed), elem_id="load-errors", visible=bool(pool.failed))
        with gr.Row():
            chosen = gr.CheckboxGroup(pool.names, value=pool.names, label="Detectors to run", elem_id="detectors")
            num_samples = gr.Slider(1, MAX_NUM_SAMPLES, value=DEFAULT_NUM_SAMPLES, step=1,
                                    label="T: Monte Carlo samples per detector", elem_id="num-samples")
        with gr.Tab("One image"):
            with gr.Row():
                with gr.Column(scale=2):
                    # A file input: the app gets the uploaded bytes as they are, metadata included (an image input
                    # re-encodes the picture and drops EXIF and the rest before the app sees it).
                    image = gr.File(file_count="single", file_types=["image"], label="Image file", height=120,
                                    elem_id="image-input")
                    preview = gr.Image(label="Preview", interactive=False, height=320, elem_id="image-preview",
                                       buttons=[])
                    run = gr.Button("Analyse", variant="primary", elem_id="run")
                    gr.Examples([[path, path] for path in examples], inputs=[preview, image],
                                label="Examples: CIFAKE test images (in domain) and larger synthetic pictures (out of "
                                "domain)", examples_per_page=8)
                with gr.Column(scale=3):
                    headline = gr.Markdown(EMPTY_HEADLINE, elem_id="headline", elem_classes=["tone-none"])
                    evidence_panel = gr.Markdown(EMPTY_EVIDENCE, elem_id="evidence-panel")
                    # The answer first; each detector's numbers and charts folded below it, for whoever wants them.
                    # The charts' labels are hidden (show_label=False): each figure has its own title, and gradio's
                    # label box would cover it.
                    with gr.Accordion("Each detector in detail: numbers, uncertainty, charts", open=False,
                                      elem_id="details"):
                        verdict = gr.Markdown(EMPTY_VERDICT, elem_id="verdict")
                        domain_plot = gr.Plot(label="Domain check per detector", show_label=False,
                                              elem_id="domain-plot", visible=False)
                        p_fake_plot = gr.Plot(label="P(FAKE) per detector", show_label=False, elem_id="p-fake-plot")
                        uncertainty_plot = gr.Plot(label="Uncertainty per detector", show_label=False,
                                                   elem_id="uncertainty-plot")
                        samples_plot = gr.Plot(label="Sampled P(FAKE)", show_label=False, elem_id="samples-plot")
                        explanation_plot = gr.Plot(label="Why: saliency map and the features that weigh most",
                                                   show_label=False, elem_id="explanation-plot")
                        reconstruction_plot = gr.Plot(label="What an autoencoder detector rebuilds", show_label=False,
                                                      elem_id="reconstruction-plot", visible=False)
                        reconstruction_caption = gr.Markdown(RECONSTRUCTION_CAPTION, elem_id="reconstruction-caption",
                                                             visible=False)
                    with gr.Accordion("Raw answer (what /predict returns)", open=False):
                        raw = gr.JSON(elem_id="raw-answer")
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", file_types=["image"], label="Images", elem_id="batch-input")
            run_batch = gr.Button("Analyse all", variant="primary", elem_id="run-batch")
            batch_status = gr.Markdown(elem_id="batch-status")
            table = gr.Dataframe(headers=PAGE_TABLE_HEADERS, column_widths=PAGE_TABLE_WIDTHS, interactive=False,
                                 wrap=True,
                                 label="Results (entropies in nats; evidence: what each file itself says)",
                                 elem_id="batch-table")
            csv = gr.File(label="Download the table (CSV)", elem_id="batch-csv")
            batch_p_fake_plot = gr.Plot(label="P(FAKE) per image", show_label=False, elem_id="batch-p-fake-plot")
            batch_epistemic_plot = gr.Plot(label="Epistemic uncertainty per image", show_label=False,
                                           elem_id="batch-epistemic-plot")
        with gr.Tab("Detectors"):
            gr.Markdown(detectors_markdown(pool), elem_id="detector-table")
        with gr.Tab("API"):
            gr.Markdown(API_HELP)

        image.change(show_preview, image, preview, preprocess=False, show_progress="hidden", api_visibility="private",
                     trigger_mode="always_last")
        gr.on([image.change, run.click], analyse_page, [image, chosen, num_samples],
              [headline, evidence_panel, verdict, domain_plot, p_fake_plot, uncertainty_plot, samples_plot,
               explanation_plot, reconstruction_plot, reconstruction_caption, raw],
              preprocess=False, api_visibility="private", trigger_mode="always_last")
        run_batch.click(analyse_batch_page, [files, chosen, num_samples],
                        [batch_status, table, csv, batch_p_fake_plot, batch_epistemic_plot], api_visibility="private")
        gr.api(predict, api_name="predict")
        gr.api(predict_batch, api_name="predict_batch")
        gr.api(explain, api_name="explain")
        gr.api(read_file_evidence, api_name="evidence")
        gr.api(models, api_name="models")
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


@cache
def default_demo() -> gr.Blocks:
    return build_demo(model_ids_from(None))


def __getattr__(name: str):
    # `demo` is built on first access (PEP 562), so importing this module for build_demo does not load the default
    # detectors, and `python app.py --models ...` loads only the ones asked for.
    if name == "demo":
        return default_demo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated repo ids or folders (default: ${MODELS_ENV}, else "
                                         f"{MODELS_FILE.name} next to app.py, else {','.join(DEFAULT_REPO_IDS)})")
    parser.add_argument("--torch-threads", type=positive_int,
                        default=os.environ.get(TORCH_THREADS_ENV, str(DEFAULT_TORCH_THREADS)),  # argparse types it
                        help=f"torch's intra-op threads (default: ${TORCH_THREADS_ENV}, else {DEFAULT_TORCH_THREADS})")
    parser.add_argument("--show-paths", action="store_true",
                        help="print where the app's code and its hub_models package are imported from (JSON), and exit")
    args = parser.parse_args(argv)
    if args.show_paths:
        print(json.dumps(import_paths(), indent=2))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("code: %s", import_paths())
    torch.set_num_threads(args.torch_threads)  # process-wide; before any model is loaded
    demo = build_demo(model_ids_from(args.models))
    # Server name and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (gradio reads them itself).
    demo.launch(max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES_DIR)])


if __name__ == "__main__":
    main()
