"""What an uploaded file itself says about where it came from, read beside the detectors, and the page's words for it:
the headline (the page's one-sentence answer), the evidence panel and the batch table's evidence columns. No gradio
here.

The reading is the ``evidence`` package's ``read_evidence`` (content credentials, generator parameters, invisible
watermarks, IPTC labels, EXIF), on the uploaded bytes as they arrived. ``EvidenceReader.start(path)`` hands the file to
EVIDENCE_THREADS threads of their own and returns at once, so the read overlaps the image decoding (on the request
thread) and the detectors (on detectors.INFERENCE_THREAD, which it never uses: it does no torch work and must not
queue behind other requests' forwards); ``EvidenceReader.result`` then waits for it. A read costs 10-45 ms on images
up to 12 MP (benchmarks/results_evidence.md) and never raises on bad input; one that fails anyway, or takes longer than
EVIDENCE_TIMEOUT_S, still gives an answer of the same shape whose ``errors`` say why.

Strength comes from the package: a valid C2PA AI claim, generator parameters and a decoded Stable Diffusion watermark
are strong; IPTC labels and EXIF tags are weak. The headline reports strong evidence as the answer, and never turns a
missing credential into evidence that an image is real.
"""

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import evidence

if __package__:
    from .detectors import DetectorPool, Names, checked_num_samples, combined_headline, read_image
else:  # run as the Space's own folder (python app.py)
    from detectors import DetectorPool, Names, checked_num_samples, combined_headline, read_image

log = logging.getLogger("bayesfake.space")

# Two threads: reads of different requests (or of a batch's files) run side by side, and at most two cores' worth of
# numpy/zlib work competes with the detectors. Each read's memory is bounded by the package (the watermark check
# decodes at most a 512 Ki-pixel band).
EVIDENCE_THREADS = 2
EVIDENCE_POOL = ThreadPoolExecutor(max_workers=EVIDENCE_THREADS, thread_name_prefix="bayesfake-evidence")
# Reads are bounded to well under a second; this only guards a request against a read that hangs in native code.
EVIDENCE_TIMEOUT_S = 30.0
# PEM certificates trusted as C2PA signers (without them a valid credential is "valid", never "trusted", and a C2PA
# camera claim is not strong).
TRUST_ANCHORS_ENV = "BAYESFAKE_C2PA_TRUST_ANCHORS"

NO_EVIDENCE = "No provenance evidence in the file; this does not mean the image is real."
KIND_WORDS = {
    "c2pa": "Content credentials (C2PA)",
    "parameters": "Generator settings",
    "watermark": "Invisible watermark",
    "iptc": "IPTC source label",
    "exif": "EXIF tags",
}
SAYS_WORDS = {"ai-generated": "made by AI", "ai-edited": "edited with AI", "camera": "camera capture",
              "none": "no claim"}


def unread(message: str) -> dict:
    """An evidence answer (read_evidence's shape) for a read that did not happen or did not finish."""
    return {"findings": [], "errors": [message], "says": "none", "strong": False, "checked": {}, "format": None,
            "size": None,
            "summary": f"The file's own evidence could not be read ({message}), so there is no provenance evidence "
                       f"either way."}


@dataclass
class EvidenceReader:
    """Reads uploads with ``evidence.read_evidence`` on the evidence threads (optionally trusting C2PA signers)."""

    trust_anchors: str | None = None
    timeout_s: float = EVIDENCE_TIMEOUT_S

    @classmethod
    def from_env(cls) -> "EvidenceReader":
        """Trust anchors from the file named by $BAYESFAKE_C2PA_TRUST_ANCHORS, if set; a file that cannot be read is
        an error at start, not a silent downgrade."""
        path = os.environ.get(TRUST_ANCHORS_ENV, "").strip()
        if not path:
            return cls()
        try:
            return cls(trust_anchors=Path(path).read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"${TRUST_ANCHORS_ENV}: cannot read the C2PA trust anchors {path}: {err}") from err

    def read_now(self, path: str) -> dict:
        """``read_evidence(path)`` on this thread; never raises. Messages name the uploaded file, never the server's
        path to it."""
        try:
            found = evidence.read_evidence(path, trust_anchors=self.trust_anchors)
        except Exception as err:  # read_evidence does not raise on bad input: this would be a bug, said plainly
            log.exception("evidence read failed on %s", path)
            found = unread(f"the evidence reader failed: {type(err).__name__}: {err}")
        name = Path(path).name
        found["errors"] = [str(e).replace(path, name) for e in found["errors"]]
        found["summary"] = str(found["summary"]).replace(path, name)
        return found

    def start(self, path: str) -> Future:
        """Start reading ``path`` on the evidence threads; ``result`` gives the answer."""
        return EVIDENCE_POOL.submit(self.read_now, path)

    def result(self, pending: Future) -> dict:
        try:
            return pending.result(timeout=self.timeout_s)
        except FutureTimeout:
            return unread(f"it took longer than {self.timeout_s:g} s and was abandoned")

    def read(self, path: str) -> dict:
        return self.result(self.start(path))


# ----------------------------------------------------------------------------------------------------------------------
# The endpoints' work: detectors and evidence on one file, or on many


def analyse_file(pool: DetectorPool, reader: EvidenceReader, path: str, num_samples, names: Names = None) -> dict:
    """The ``/predict`` answer for one uploaded file: the detectors' answer with ``"evidence"`` added. The evidence read
    runs while the image is decoded and the detectors run; a request refused for its arguments reads nothing."""
    pool.select(names)
    checked_num_samples(num_samples)
    pending = reader.start(path)
    answer = pool.analyse(read_image(path), num_samples, names)
    answer["evidence"] = reader.result(pending)
    return answer


def analyse_files(pool: DetectorPool, reader: EvidenceReader, paths: list[str], num_samples,
                  names: Names = None) -> list[dict]:
    """The ``/predict_batch`` answers: one per file, each with ``"evidence"`` (an unreadable image too: its metadata
    may still say where it came from). Each file's read starts while the file before it is analysed, so it overlaps
    the detectors; a batch never has more than two reads queued, so the evidence threads stay free for other
    requests' files."""
    pool.check_batch(paths, num_samples, names)
    answers, pending = [], reader.start(paths[0])
    for i, path in enumerate(paths):
        following = reader.start(paths[i + 1]) if i + 1 < len(paths) else None
        [answer] = pool.analyse_files([path], num_samples, names)
        answer["evidence"] = reader.result(pending)
        answers.append(answer)
        pending = following
    return answers


# ----------------------------------------------------------------------------------------------------------------------
# Words for the page


def strongest_finding(found: dict) -> dict | None:
    """The strong finding the headline leads with (findings come strongest first): one that says what the whole file
    says, else any strong AI claim (a strong "ai-edited" beside a weak "ai-generated" label), else any strong one."""
    strong = [f for f in found.get("findings") or [] if f.get("strong") and f.get("says") != "none"]
    for wanted in ((found.get("says"),), ("ai-generated", "ai-edited")):
        lead = next((f for f in strong if f["says"] in wanted), None)
        if lead is not None:
            return lead
    return strong[0] if strong else None


def reason(finding: dict) -> str:
    """Why a strong finding is strong, in a few words: the credential and its signer, the generator, the mark."""
    fields = finding.get("fields") or {}
    if finding["kind"] == "c2pa":
        trust = "trusted" if fields.get("validation") == "trusted" else "valid"
        signer = fields.get("signer")
        return f"{trust} C2PA credential" + (f" from {signer!r}" if signer else "")
    if finding["kind"] == "parameters":
        return f"it carries {fields.get('generator') or 'image generator'} generation settings"
    if finding["kind"] == "watermark":
        marks = fields.get("marks") or [{}]
        return f"its pixels carry the {marks[0].get('mark') or 'Stable Diffusion invisible watermark'}"
    return finding["detail"]


def detectors_phrase(answer: dict) -> tuple[str, str]:
    """What the detectors say together, and a caveat: (the combined headline's one sentence, e.g. "Likely real: both
    detectors that answered agree (a and b); c was unsure.", and "" or the note that the image is far from the
    training data of detectors that judged it anyway). The sentence comes from ``hub_models.headline`` (the rule:
    detectors outside their domain do not count; any disagreement between those that answered is "uncertain")."""
    results = answer["detectors"]
    if not results:
        return "No detector ran.", ""
    combined = answer.get("headline") or combined_headline(results)
    # The size / mode / crop warnings matter for the detectors that judged the image; one whose gate refused it has
    # already said that it cannot judge it.
    judged = [r for name, r in results.items() if name not in combined["outside"]]
    far = sum(bool(r["warnings"]) for r in judged)
    whose = "the detectors'" if far == len(judged) else f"{far} of the {len(judged)} detectors'"
    them = "them" if far > 1 else "it"
    caveat = f"This image is far from {whose} training data, so trust {them} less." if far else ""
    return combined["explanation"], caveat


def bold_verdict(sentence: str) -> str:
    """The detectors' sentence as the headline's first line: its verdict ("Likely real:") in bold, the reasons in
    plain weight, so that the answer stands out of a long sentence."""
    verdict, sep, rest = sentence.partition(": ")
    return f"**{verdict}:** {rest}" if sep else sentence


def headline(found: dict | None, answer: dict | None = None, error: str | None = None) -> tuple[str, str]:
    """The page's answer, first thing on the result side: (markdown, tone). Its first paragraph is the answer, the
    next ones what else is known. Tone ``ai`` or ``camera`` when the file carries strong evidence of that, ``error``
    when nothing could be analysed, else ``none``.

    Strong evidence in the file is the answer, and the detectors come second. Without it the detectors' guess comes
    first, then what the file does (not) carry, worded so that a missing credential never reads as "real"."""
    found = found or unread("not read")
    lead = strongest_finding(found)
    phrase, caveat = detectors_phrase(answer) if answer is not None else (None, "")
    if lead is not None:
        more = sum(bool(f["strong"]) for f in found["findings"]) - 1
        more = f"{more} more strong finding{'s' if more > 1 else ''} below" if more else ""
        if lead["says"] == "camera":
            first = (f"The file carries a {reason(lead)} saying a camera captured it: what the signer's camera or "
                     f"software declared, not proof that the scene is genuine{f' ({more})' if more else ''}.")
            tone = "camera"
        else:
            what = "made by an AI generator" if lead["says"] == "ai-generated" else "edited with generative AI"
            first = f"The file itself says it was {what} ({reason(lead)}{f'; {more}' if more else ''})."
            tone = "ai"
        second = (f"Pixel detectors, a separate and weaker signal. {phrase}" if phrase is not None
                  else f"The pixel detectors could not analyse the image: {error}")
        # the file's other findings disagree with the lead (a weak label says otherwise): say so, in the reader's words
        paragraphs = [first, second, caveat] + ([found["summary"]] if found["says"] != lead["says"] else [])
    else:
        nothing = found["says"] == "none" and not found["findings"] and found.get("checked")
        file_says = NO_EVIDENCE if nothing else found["summary"]
        if phrase is not None:
            paragraphs = [bold_verdict(phrase), file_says,
                          "The detectors' verdicts are a screening guess from the pixels, not proof. " + caveat]
            tone = "none"
        else:
            paragraphs, tone = [f"Could not analyse this image: {error}", file_says], "error"
    return "\n\n".join(p.strip() for p in paragraphs if p.strip()), tone


def panel(found: dict | None) -> str:
    """The evidence panel: the summary, then each finding (strong ones first) in plain words, what it proves and what
    it does not, problems met while reading, and what was looked at."""
    if not found:
        return ""
    lines = ["#### What the file itself says", "", found["summary"], ""]
    for i, f in enumerate(found["findings"], 1):
        strength = "**Strong evidence**" if f["strong"] else "Weak hint" if f["says"] != "none" else "Not evidence"
        lines += [f"{i}. {strength} · {KIND_WORDS.get(f['kind'], f['kind'])} · says: "
                  f"**{SAYS_WORDS.get(f['says'], f['says'])}**  ",
                  f"   {f['detail']}  ",
                  f"   *{f['proves']}*", ""]
    if not found["findings"] and found.get("checked"):
        lines += ["Nothing in the file says where it came from. Most sites and apps strip metadata, and most "
                  "generators embed no watermark, so this is no evidence either way.", ""]
    if found["errors"]:
        lines += ["> ⚠️ **While reading the file:** " + " ".join(e if e.endswith(".") else e + "."
                                                                for e in found["errors"]), ""]
    if found.get("checked"):
        checked = "; ".join(f"{KIND_WORDS.get(k, k)}: {v}" for k, v in found["checked"].items())
        lines += [f"<details><summary>What was looked at</summary>\n\n{checked}.\n\n</details>"]
    return "\n".join(lines).rstrip() + "\n"


def batch_columns(found: dict | None) -> dict:
    """The batch table's evidence columns for one file."""
    if not found:
        return {"evidence": "", "evidence_strong": "", "evidence_summary": ""}
    return {"evidence": found["says"], "evidence_strong": bool(found["strong"]), "evidence_summary": found["summary"]}
