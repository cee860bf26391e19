"""IPTC digital source type in XMP (``Iptc4xmpExt:DigitalSourceType``, also ``plus:DigitalSourceType``), plus the
XMP/IPTC fields other readers use: descriptions (Midjourney's Job ID), CreatorTool, and a remote C2PA pointer.

``says``: ``ai-generated`` for ``.../digitalsourcetype/trainedAlgorithmicMedia``, ``ai-edited`` for
``compositeWithTrainedAlgorithmicMedia``, ``camera`` for ``digitalCapture`` / ``computationalCapture`` /
``negativeFilm`` / ``positiveFilm`` / ``print`` (a capture of a physical scene or object), ``none`` for any other
value (named in ``detail``). Never strong: it is unsigned text that any editor can write, copy or strip (the same
value inside a *valid C2PA* credential is the strong form; see :mod:`evidence.c2pa_reader`).
"""

from __future__ import annotations

import re

from ._container import Container, Text

NEWSCODES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
SOURCE_SAYS = {
    "trainedalgorithmicmedia": "ai-generated",
    "compositewithtrainedalgorithmicmedia": "ai-edited",
    "digitalcapture": "camera",
    "computationalcapture": "camera",
    "negativefilm": "camera",
    "positivefilm": "camera",
    "print": "camera",
}
SOURCE_WORDS = {
    "ai-generated": "made by a generative AI model (trained algorithmic media)",
    "ai-edited": "a composite that includes generative-AI elements",
    "camera": "a capture of a real scene or object",
}

# Attribute form  DigitalSourceType="URI", element form  <...DigitalSourceType>URI</...>, or rdf:resource="URI".
_RE_DST = re.compile(
    r"DigitalSourceType\s*(?:=\s*[\"']|>\s*|[^>]{0,200}?rdf:resource\s*=\s*[\"'])\s*([^\"'<>\s]+)", re.I
)
# The IPTC newscode URI on its own, in any other text the file carries (PNG text chunks, EXIF descriptions).
_RE_NEWSCODE = re.compile(r"cv\.iptc\.org/newscodes/digitalsourcetype/(\w+)", re.I)
_RE_CREATOR_TOOL = re.compile(r"xmp:CreatorTool\s*(?:=\s*[\"']([^\"']*)[\"']|>\s*([^<]*)<)", re.I)
_RE_PROVENANCE = re.compile(r"dcterms:provenance\s*(?:=\s*[\"']([^\"']*)[\"']|>\s*([^<]*)<)", re.I)
_RE_DESCRIPTION = re.compile(r"<dc:description>(.*?)</dc:description>", re.I | re.S)
_RE_LI = re.compile(r"<rdf:li[^>]*>(.*?)</rdf:li>", re.S)


def _unescape(s: str) -> str:
    return (s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'")
            .replace("&#xA;", "\n").replace("&#10;", "\n").replace("&amp;", "&"))


def source_type_says(value: str) -> tuple[str, str]:
    """``(says, short name)`` for a digital source type URI or bare code."""
    code = value.rstrip("/").rsplit("/", 1)[-1]
    return SOURCE_SAYS.get(code.lower(), "none"), code


def finding(xmp: list[Text], texts: list[Text] = ()) -> dict | None:
    """The ``iptc`` finding from the XMP packets' DigitalSourceType, else from a bare newscode URI in other text."""
    hits = []
    for text in xmp:
        for m in _RE_DST.finditer(text.value):
            says, code = source_type_says(_unescape(m.group(1)))
            hits.append((says, code, text.where))
    if not hits:
        for text in texts:
            for m in _RE_NEWSCODE.finditer(text.value):
                says, code = source_type_says(m.group(1))
                hits.append((says, code, text.where))
    if not hits:
        return None
    order = ("ai-generated", "ai-edited", "camera", "none")
    says, code, where = min(hits, key=lambda h: order.index(h[0]))
    words = SOURCE_WORDS.get(says, "a source type that says nothing about AI or a camera")
    others = sorted({h[1] for h in hits} - {code})
    detail = f"{where}: IPTC DigitalSourceType {code!r}: {words}."
    if others:
        detail += f" Other values present: {', '.join(others)}."
    return {
        "kind": "iptc",
        "says": says,
        "detail": detail,
        "strong": False,
        "fields": {"digital_source_type": code, "where": where, "all": sorted({h[1] for h in hits})},
    }


def creator_tools(xmp: list[Text]) -> list[tuple[str, str]]:
    out = []
    for text in xmp:
        for m in _RE_CREATOR_TOOL.finditer(text.value):
            value = _unescape((m.group(1) or m.group(2) or "").strip())
            if value:
                out.append((f"{text.where} CreatorTool", value[:200]))
    return out


def provenance(xmp: list[Text]) -> str | None:
    for text in xmp:
        m = _RE_PROVENANCE.search(text.value)
        if m:
            value = _unescape((m.group(1) or m.group(2) or "").strip())
            if value:
                return value[:500]
    return None


def descriptions(c: Container) -> list[Text]:
    """XMP dc:description values and IPTC-IIM captions (2:120) / headlines, as texts."""
    out = []
    for text in c.xmp:
        for m in _RE_DESCRIPTION.finditer(text.value):
            items = _RE_LI.findall(m.group(1)) or [m.group(1)]
            for item in items:
                out.append(Text(f"{text.where} dc:description", "Description", _unescape(item.strip())))
    for block in c.iptc_iim:
        for record, dataset, value in _iim_records(block):
            if record == 2 and dataset in (120, 105, 5):
                out.append(Text("JPEG APP13 IPTC caption", "Description", value.decode("utf-8", "replace")))
    return out


def _iim_records(block: bytes):
    """IPTC-IIM datasets inside Photoshop image resource 0x0404 blocks (``8BIM``), bounded by the block."""
    pos, n = 0, len(block)
    while pos + 12 <= n:
        if block[pos : pos + 4] != b"8BIM":
            return
        rid = int.from_bytes(block[pos + 4 : pos + 6], "big")
        name_len = block[pos + 6]
        p = pos + 6 + ((1 + name_len + 1) & ~1)  # Pascal-string name, padded to an even length
        if p + 4 > n:
            return
        size = int.from_bytes(block[p : p + 4], "big")
        data = block[p + 4 : min(n, p + 4 + size)]
        if rid == 0x0404:
            q = 0
            while q + 5 <= len(data) and data[q] == 0x1C:
                rec, ds, ln = data[q + 1], data[q + 2], int.from_bytes(data[q + 3 : q + 5], "big")
                if ln & 0x8000:
                    return  # extended length: not used for captions; stop rather than guess
                yield rec, ds, data[q + 5 : q + 5 + ln]
                q += 5 + ln
        pos = p + 4 + size + (size & 1)
