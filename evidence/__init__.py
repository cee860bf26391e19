"""Evidence beyond pixels: what an image file itself says about where it came from.

``read_evidence(data)`` reads a file's raw bytes (or a path) and returns::

    {
        "findings": [{"kind", "says", "strong", "detail", "proves", "fields"}, ...],   # strongest first
        "summary": "one plain-words sentence",
        "errors": ["plain-words message", ...],      # bad input, truncated or lying structures; never raised
        "says": "ai-generated" | "ai-edited" | "camera" | "none",   # strongest(findings)
        "strong": bool,                              # some finding is strong evidence for ``says``
        "checked": {kind: "what was looked at"},     # so that "nothing found" can be told from "not looked"
        "format": "png" | "jpeg" | "webp" | ... | "unknown" | None,
        "size": [width, height] | None,
    }

``kind`` is one of ``c2pa`` (content credentials, :mod:`evidence.c2pa_reader`), ``iptc`` (IPTC digital source type
in XMP, :mod:`evidence.iptc`), ``parameters`` (generator settings, :mod:`evidence.parameters`), ``exif`` (camera and
software tags, :mod:`evidence.exif`), ``watermark`` (Stable Diffusion's invisible marks, :mod:`evidence.watermark`).
``says`` is one of ``ai-generated``, ``ai-edited``, ``camera``, ``none``. ``proves`` says in plain words what the
finding proves and what it does not.

Strength (``STRONG_KINDS``): a **valid** C2PA credential's AI claim, generator parameters and a decoded SD watermark
are strong; a C2PA camera claim is strong only from a trusted signer; IPTC labels and EXIF tags are weak (plain,
unsigned, easy to copy). A C2PA credential that fails validation says ``none`` and is never strong.

Absence is never evidence: metadata is stripped by most sites and tools, and a file with no findings gets the summary
"No provenance evidence found in the file. This does not mean the image is real." Nothing here ever says an image
*is* real.

No model code: this package imports only the standard library, numpy, Pillow and (lazily) ``c2pa``.
"""

from __future__ import annotations

import io
import os

from . import c2pa_reader, exif, iptc, parameters, watermark
from ._container import Container, open_source, walk

KINDS = ("c2pa", "iptc", "parameters", "exif", "watermark")
SAYS = ("ai-generated", "ai-edited", "camera", "none")  # strongest first
# Kinds whose findings can be strong evidence. Within them, ``finding["strong"]`` decides: a c2pa finding is strong
# only when its credential validated (and, for a camera claim, its signer is trusted).
STRONG_KINDS = frozenset({"c2pa", "parameters", "watermark"})

__all__ = ["read_evidence", "strongest", "is_strong", "STRONG_KINDS", "KINDS", "SAYS"]

PROVES = {
    ("c2pa", "ai"): (
        "Proves: this exact file is what the signer's software signed, and that software declared the content "
        "AI-made. Does not prove: who the signer is, unless the signer is trusted; and stripping the credential "
        "removes it without a trace, so images without one can still be AI-made."
    ),
    ("c2pa", "camera"): (
        "Proves: this exact file is what the signer's software signed as a camera capture. Does not prove: that the "
        "scene was real (a screen or print can be photographed), or who signed it unless the signer is trusted."
    ),
    ("c2pa", "none"): (
        "Proves nothing about the pixels: a credential that fails validation, cannot be read or makes no claim "
        "vouches for nothing; it may have been tampered with, copied from another file or forged."
    ),
    ("iptc", "ai"): (
        "Proves: whatever wrote this file labelled it as AI-made or AI-edited. Does not prove it: IPTC/XMP is plain, "
        "unsigned text that anyone can add, copy or strip; its absence proves nothing."
    ),
    ("iptc", "camera"): (
        "Proves little: an unsigned label that anyone can write or copy onto a generated image. It does not show the "
        "image is real."
    ),
    ("iptc", "none"): "Proves nothing about AI or a camera: the label names another kind of source.",
    ("parameters", "ai"): (
        "Proves: the file carries the settings an image generator writes next to its output (cameras and photo "
        "editors don't). Does not prove it beyond doubt: it is plain text that can be copied onto any image, and most "
        "sites strip it, so its absence proves nothing."
    ),
    ("exif", "ai"): (
        "Suggests: the software that wrote the file names itself an image generator. Weak: plain tags, easy to edit "
        "or strip."
    ),
    ("exif", "camera"): (
        "Shows only that some software wrote a camera's name into the file. EXIF is easily copied onto a generated "
        "image or forged, and usually stripped; it does not show the image is real."
    ),
    ("exif", "none"): "Proves nothing about the image's origin.",
    ("watermark", "ai"): (
        "Proves (very likely): the pixels carry the invisible mark that Stable Diffusion's reference code embeds; a "
        "chance match is very unlikely. Does not survive resizing, cropping or strong JPEG compression, and most "
        "generators embed none, so its absence proves nothing; anyone with the open-source encoder could add it."
    ),
}


def _proves(f: dict) -> str:
    says = "ai" if f["says"] in ("ai-generated", "ai-edited") else f["says"]
    return PROVES.get((f["kind"], says)) or PROVES.get((f["kind"], "none"), "Proves nothing about the image's origin.")


def strongest(findings) -> str:
    """The overall ``says`` of the findings: ai-generated > ai-edited > camera > none (``none`` for no findings)."""
    best = len(SAYS) - 1
    for f in findings or []:
        says = f.get("says") if isinstance(f, dict) else None
        if says in SAYS:
            best = min(best, SAYS.index(says))
    return SAYS[best]


def is_strong(finding: dict) -> bool:
    """Whether one finding is strong evidence for what it says (its kind can be strong and its reader said so)."""
    return bool(finding.get("kind") in STRONG_KINDS and finding.get("strong") and finding.get("says") != "none")


def _result(findings, errors, checked, c: Container | None) -> dict:
    findings = sorted(findings, key=lambda f: (not is_strong(f), SAYS.index(f["says"]), KINDS.index(f["kind"])))
    ordered = []
    for f in findings:
        ordered.append({"kind": f["kind"], "says": f["says"], "strong": is_strong(f), "detail": f["detail"],
                        "proves": _proves(f), "fields": f.get("fields", {})})
    says = strongest(ordered)
    return {
        "findings": ordered,
        "summary": _summary(ordered, says, c is None or c.fmt == "unknown"),
        "errors": errors,
        "says": says,
        "strong": any(f["strong"] and f["says"] == says for f in ordered),
        "checked": checked,
        "format": c.fmt if c else None,
        "size": list(c.size) if c and c.size else None,
    }


def _phrase(f: dict) -> str:
    fields = f.get("fields", {})
    if f["kind"] == "c2pa":
        signer = fields.get("signer")
        what = {"ai-generated": "the image was made by a generative AI model",
                "ai-edited": "the image was edited with generative AI",
                "camera": "the image was captured by a camera"}.get(f["says"], "")
        trust = "trusted" if fields.get("validation") == "trusted" else "valid"
        return f"a {trust} C2PA credential" + (f" signed by {signer!r}" if signer else "") + f" says {what}"
    if f["kind"] == "parameters":
        return f"the file carries {fields.get('generator', 'image generator')} generation settings"
    if f["kind"] == "watermark":
        marks = fields.get("marks") or [{}]
        return f"the pixels carry the {marks[0].get('mark', 'Stable Diffusion watermark')}"
    if f["kind"] == "iptc":
        return f"the file's IPTC digital source type is {fields.get('digital_source_type')!r}"
    if f["kind"] == "exif":
        if f["says"] == "camera":
            camera = " ".join(v for v in (fields.get("Make"), fields.get("Model")) if v)
            return f"its EXIF names a camera ({camera})"
        tools = fields.get("ai_software") or []
        return f"its software tag names an image generator ({tools[0] if tools else ''})"
    return f["detail"]


def _summary(findings: list[dict], says: str, fatal: bool = False) -> str:
    # Never claims an image is real: the best a file can offer for "camera" is a label, and absence is no evidence.
    failed = [f for f in findings if f["kind"] == "c2pa" and f["fields"].get("validation") in ("invalid", "unreadable")]
    note = "; a C2PA credential in the file failed validation or could not be read" if failed else ""
    if says in ("ai-generated", "ai-edited"):
        what = "AI generation" if says == "ai-generated" else "AI editing"
        top = [f for f in findings if f["says"] == says]
        strong = [f for f in top if f["strong"]]
        lead = strong[0] if strong else top[0]
        sentence = (f"Strong evidence of {what}: " if strong else f"Weak evidence of {what}: ") + _phrase(lead)
        others = [_phrase(f) for f in top if f is not lead][:2]
        if others:
            sentence += "; also " + "; ".join(others)
        if not strong:
            sentence += " (plain metadata: easy to add, copy or strip)"
        if any(f["says"] == "camera" for f in findings):
            sentence += "; the camera details it also carries are easy to copy and do not outweigh this"
        return sentence + note + "."
    if says == "camera":
        cam = [f for f in findings if f["says"] == "camera"]
        if any(f["strong"] for f in cam):
            lead = next(f for f in cam if f["strong"])
            return (f"Camera provenance: {_phrase(lead)}; this shows what the signer's software recorded, not that "
                    f"the scene is genuine{note}.")
        return (f"Weak camera evidence only: {_phrase(cam[0])}; camera metadata is easily copied or forged and does "
                f"not show the image is real{note}.")
    if not findings and fatal:
        return "Nothing could be read from this input (see errors), so there is no provenance evidence either way."
    if failed:
        return ("A C2PA credential is present but failed validation or could not be read, so it is not evidence "
                "either way; no other provenance evidence found. This does not mean the image is real.")
    if any(f["kind"] == "c2pa" and f["fields"].get("validation") == "not fetched" for f in findings):
        return ("The file points to a remote C2PA credential, which was not fetched; no provenance evidence found in "
                "the file itself. This does not mean the image is real.")
    return "No provenance evidence found in the file. This does not mean the image is real."


class _Source:
    """Streams over the input without copying it: a fresh BytesIO over the bytes, or a fresh handle on the path."""

    def __init__(self, data, buf):
        self.path = None if isinstance(data, (bytes, bytearray, memoryview)) else os.fspath(data)
        self.buf = buf
        self._open = []

    def stream(self):
        s = open(self.path, "rb") if self.path is not None else io.BytesIO(self.buf)
        self._open.append(s)
        return s

    def close(self):
        for s in self._open:
            s.close()


def read_evidence(data, *, trust_anchors: str | None = None, check_watermark: bool = True) -> dict:
    """Read what a file says about its own origin. ``data``: the file's bytes, or a path (``str`` / ``PathLike``).

    ``trust_anchors``: PEM certificates to trust as C2PA signers (without them no signer is "trusted", and a valid
    credential is still reported valid). ``check_watermark=False`` skips the pixel decode (metadata only).
    Never raises on bad input: problems go to ``errors`` in plain words.
    """
    errors: list[str] = []
    checked: dict[str, str] = {}
    if not isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike)):
        return _result([], [f"expected bytes or a path, got {type(data).__name__}"], checked, None)
    try:
        buf, closer = open_source(data)
    except (OSError, ValueError) as exc:
        return _result([], [f"could not read the file: {exc}"], checked, None)
    src = _Source(data, buf)
    try:
        if len(buf) == 0:
            return _result([], ["empty file (0 bytes): there is nothing to read"], checked, None)
        c = walk(buf)
        errors += c.errors
        if c.fmt == "unknown":
            head = bytes(buf[:8]).hex(" ")
            errors.append(f"not a recognised image format (first bytes: {head}); no metadata could be read")
            return _result([], errors, checked, c)
        findings = _read_all(c, src, errors, checked, trust_anchors, check_watermark)
        return _result(findings, errors, checked, c)
    finally:
        src.close()
        if closer is not None:
            closer.close()


def _guard(kind: str, errors: list[str], fn, *args):
    """Run one reader; its failure must not cost the others their findings (the watermark's OSError, undecodable
    pixels, is passed on to be worded by the caller)."""
    try:
        return fn(*args)
    except Exception as exc:
        if kind == "watermark" and isinstance(exc, OSError):
            raise
        errors.append(f"{kind} reader failed: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def _read_all(c: Container, src: _Source, errors, checked, trust_anchors, check_watermark) -> list[dict]:
    findings: list[dict] = []

    # C2PA: only when the container holds a C2PA/JUMBF store (the reader costs a few ms even on files without one).
    if c.c2pa and c.c2pa_problem:
        errors.append(f"C2PA credential unreadable: {c.c2pa_problem}.")
        findings.append(c2pa_reader.malformed(c.c2pa_problem))
        checked["c2pa"] = "embedded C2PA store malformed: not passed to the C2PA reader"
    elif c.c2pa and c.mime:
        out = _guard("c2pa", errors, c2pa_reader.read, src.stream(), c.mime, trust_anchors)
        finding, error = out if out else (None, None)
        if error:
            errors.append(error)
        if finding:
            findings.append(finding)
        checked["c2pa"] = "embedded C2PA store read and validated" if finding else "JUMBF data present, no manifest"
    else:
        checked["c2pa"] = "no embedded C2PA store" if c.mime else "format not supported"
        url = _guard("iptc", errors, iptc.provenance, c.xmp)
        if url:
            findings.append(c2pa_reader.remote_pointer(url))

    # EXIF, and the generator text hiding in EXIF fields.
    out = _guard("exif", errors, exif.parse, c)
    fields, exif_texts = out if out else ({}, [])

    # IPTC digital source type (XMP; else a bare newscode URI in other text).
    f = _guard("iptc", errors, iptc.finding, c.xmp, c.texts + exif_texts)
    if f:
        findings.append(f)
    checked["iptc"] = f"{len(c.xmp)} XMP packet(s) searched" if c.xmp else "no XMP packet; other text searched"

    tools = (_guard("iptc", errors, iptc.creator_tools, c.xmp) or []) + [
        (t.where, t.value[:200]) for t in c.texts if t.key == "Software"]
    f = _guard("exif", errors, exif.finding, fields, tools)
    if f:
        findings.append(f)
    checked["exif"] = f"{len(c.exif)} EXIF block(s) read" if c.exif else "no EXIF"

    # Generator parameters.
    described = _guard("iptc", errors, iptc.descriptions, c) or []
    found = _guard("parameters", errors, parameters.read, c.texts + exif_texts, described) or []
    findings += found
    checked["parameters"] = f"{len(c.texts) + len(exif_texts) + len(described)} text value(s) searched"

    # Invisible watermark (decodes pixels, bounded).
    if check_watermark:
        try:
            out = _guard("watermark", errors, watermark.read, src.stream, c.fmt, c.size, c.interlaced)
        except OSError as exc:  # undecodable pixels (truncated, corrupt): said plainly, not as a reader failure
            errors.append(f"watermark: {exc}")
            out = None
        if out:
            f, checked["watermark"] = out
            if f:
                findings.append(f)
        else:
            checked["watermark"] = "not checked: the pixels could not be decoded"
    else:
        checked["watermark"] = "not checked (check_watermark=False)"
    return findings
