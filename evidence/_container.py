"""Bounded walkers over an image file's own structure: PNG chunks, JPEG segments, WebP RIFF chunks.

They never decode pixels. Each walker records what it finds (text chunks, EXIF and XMP blocks, IPTC-IIM records, the
presence of an embedded C2PA/JUMBF store, the pixel size) in a :class:`Container`, keeps at most a few MiB of text in
all, and turns every structural lie (a length that runs past the end of the file, a truncated segment, too many chunks)
into a plain-words message in ``Container.errors`` instead of an exception.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

# What is kept of one text value (PNG tEXt/zTXt/iTXt, a JPEG comment, XMP, EXIF text) for parsing: ComfyUI workflows run
# to a few hundred KB, so 1 MiB keeps real ones whole; a larger value is cut and marked truncated.
MAX_TEXT_BYTES = 1 << 20
# All text kept from one file, summed; past it further values are skipped (and counted in an error).
MAX_TOTAL_TEXT_BYTES = 4 << 20
# A single EXIF block larger than this is ignored (a JPEG APP1 can't exceed 64 KB; PNG eXIf and WebP EXIF can).
MAX_EXIF_BYTES = 1 << 20
# Chunk / segment count after which a walker stops (a real 12 MP PNG has a few thousand IDAT chunks).
MAX_BLOCKS = 200_000

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
XMP_NS = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_EXT_NS = b"http://ns.adobe.com/xmp/extension/\x00"
MIME = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "heif": "image/heif",
    "avif": "image/avif",
    "bmp": "image/bmp",
}


@dataclass
class Text:
    """One text value found in the file. ``where`` says where, in words a person can check with an EXIF/PNG tool."""

    where: str
    key: str
    value: str
    truncated: bool = False


@dataclass
class Container:
    fmt: str = "unknown"
    size: tuple[int, int] | None = None
    texts: list[Text] = field(default_factory=list)
    exif: list[tuple[str, bytes]] = field(default_factory=list)
    xmp: list[Text] = field(default_factory=list)
    iptc_iim: list[bytes] = field(default_factory=list)
    c2pa: bool = False
    c2pa_problem: str | None = None  # set when the JUMBF box is malformed: the C2PA reader is then not called
    interlaced: bool = False
    errors: list[str] = field(default_factory=list)
    _text_budget: int = MAX_TOTAL_TEXT_BYTES
    _skipped_texts: int = 0

    @property
    def mime(self) -> str | None:
        return MIME.get(self.fmt)

    def keep(self, raw: bytes, encoding: str) -> tuple[str, bool] | None:
        """Decode ``raw`` within the per-value and per-file budgets; None once the file's budget is spent."""
        if self._text_budget <= 0:
            self._skipped_texts += 1
            return None
        cap = min(MAX_TEXT_BYTES, self._text_budget)
        truncated = len(raw) > cap
        raw = raw[:cap]
        self._text_budget -= len(raw)
        return raw.decode(encoding, errors="replace"), truncated

    def add_text(self, where: str, key: str, raw: bytes, encoding: str = "latin-1", truncated: bool = False):
        kept = self.keep(raw, encoding)
        if kept is None:
            return None
        text = Text(where, key, kept[0].rstrip("\x00"), kept[1] or truncated)
        (self.xmp if key == "XML:com.adobe.xmp" else self.texts).append(text)
        return text

    def add_exif(self, where: str, raw: bytes) -> None:
        if len(raw) > MAX_EXIF_BYTES:
            self.errors.append(f"{where}: EXIF block of {len(raw):,} bytes ignored (over {MAX_EXIF_BYTES:,}).")
            return
        self.exif.append((where, bytes(raw)))

    def finish(self) -> None:
        if self._skipped_texts:
            self.errors.append(
                f"{self._skipped_texts} more text value(s) skipped: the file carries over "
                f"{MAX_TOTAL_TEXT_BYTES >> 20} MiB of text metadata."
            )


def sniff(head: bytes) -> str:
    """The file's format from its first bytes (never from a file name)."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "heif"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    return "unknown"


def open_source(data) -> tuple[object, object | None]:
    """``(buffer, closer)``: bytes stay as they are; a path is memory-mapped (read-only, paged in by the OS, never
    copied whole). An empty file maps to ``b""``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data) if not isinstance(data, bytes) else data, None
    path = os.fspath(data)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b"", None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, mm


def walk(buf) -> Container:
    c = Container(fmt=sniff(bytes(buf[:32])))
    try:
        if c.fmt == "png":
            _walk_png(buf, c)
        elif c.fmt == "jpeg":
            _walk_jpeg(buf, c)
        elif c.fmt == "webp":
            _walk_webp(buf, c)
        elif c.fmt != "unknown":
            _walk_other(buf, c)
    except Exception as exc:  # a walker bug must not cost the other readers their findings
        c.errors.append(f"{c.fmt.upper()} structure could not be walked: {type(exc).__name__}: {exc}")
    c.finish()
    return c


# --------------------------------------------------------------------------------------------------------------- PNG


def _inflate(buf, start: int, end: int, cap: int) -> tuple[bytes, bool]:
    """zlib-decompress ``buf[start:end]`` into at most ``cap`` bytes, feeding it 64 KiB at a time, so neither a zTXt
    bomb nor a huge compressed chunk costs more than ``cap`` (+64 KiB) of memory; ``(data, truncated)``."""
    d = zlib.decompressobj()
    out = bytearray()
    pos = start
    while pos < end and len(out) < cap and not d.eof:
        piece = bytes(buf[pos : min(end, pos + 65536)])
        pos += len(piece)
        out += d.decompress(piece, cap - len(out))
        if d.unconsumed_tail:
            return bytes(out), True
    return bytes(out), len(out) >= cap and not d.eof


def _walk_png(buf, c: Container) -> None:
    n = len(buf)
    pos = 8
    count = 0
    while pos < n:
        if pos + 8 > n:
            c.errors.append(f"PNG ends inside a chunk header at byte {pos:,} (truncated file).")
            return
        length, ctype = struct.unpack(">I4s", buf[pos : pos + 8])
        name = ctype.decode("latin-1")
        start = pos + 8
        end = start + length
        if end > n:
            c.errors.append(
                f"PNG chunk {name!r} at byte {pos:,} says it holds {length:,} bytes but only {n - start:,} remain "
                "(truncated or corrupt); what is there was read, the rest of the file was not."
            )
        end = min(end, n)
        data_len = end - start
        if ctype == b"IHDR" and data_len >= 13:
            w, h = struct.unpack(">II", buf[start : start + 8])
            c.size = (w, h)
            c.interlaced = buf[start + 12] != 0
        elif ctype in (b"tEXt", b"zTXt", b"iTXt"):
            _png_text(buf, start, end, name, c)
        elif ctype == b"eXIf":
            c.add_exif("PNG eXIf chunk", buf[start:end])
        elif ctype == b"caBX":
            c.c2pa = True
            if data_len >= 8:
                lbox, tbox = struct.unpack(">I4s", buf[start : start + 8])
                check_jumbf(c, "PNG caBX chunk", lbox, tbox, data_len)
            else:
                c.c2pa_problem = "PNG caBX chunk too short to hold a JUMBF box"
        elif ctype == b"IEND":
            return
        if end < start + length:
            return
        pos = end + 4  # CRC
        count += 1
        if count >= MAX_BLOCKS:
            c.errors.append(f"PNG has over {MAX_BLOCKS:,} chunks; stopped reading its structure there.")
            return


def _png_text(buf, start: int, end: int, name: str, c: Container) -> None:
    # Keyword (<= 79 bytes) then NUL. Only the head of the chunk is sliced until the keyword is known, so a 50 MB chunk
    # costs at most MAX_TEXT_BYTES (plus the compressed bytes a zTXt/iTXt needs to reach that many decompressed bytes).
    head = bytes(buf[start : min(end, start + 80)])
    nul = head.find(b"\x00")
    if nul <= 0:
        c.errors.append(f"PNG {name} chunk without a keyword ignored.")
        return
    key = head[:nul].decode("latin-1")
    where = f"PNG {name} chunk {key!r}"
    body = start + nul + 1
    length = end - body
    try:
        if name == "tEXt":
            text = c.add_text(where, key, buf[body : min(end, body + MAX_TEXT_BYTES + 1)], "latin-1")
        elif name == "zTXt":
            raw, cut = _inflate(buf, body + 1, end, MAX_TEXT_BYTES + 1)
            text = c.add_text(where, key, raw, "latin-1", cut)
        else:  # iTXt: flag, method, language NUL, translated keyword NUL, text (UTF-8)
            head2 = bytes(buf[body : min(end, body + 2 + 2048)])
            compressed = head2[:1] == b"\x01"
            lang_end = head2.find(b"\x00", 2)
            tk_end = head2.find(b"\x00", lang_end + 1) if lang_end >= 0 else -1
            if tk_end < 0:
                c.errors.append(f"{where}: malformed iTXt header ignored.")
                return
            text_start = body + tk_end + 1
            if compressed:
                raw, cut = _inflate(buf, text_start, end, MAX_TEXT_BYTES + 1)
            else:
                raw, cut = buf[text_start : min(end, text_start + MAX_TEXT_BYTES + 1)], False
            text = c.add_text(where, key, raw, "utf-8", cut)
    except zlib.error as exc:
        c.errors.append(f"{where}: compressed text could not be inflated ({exc}).")
        return
    if text is not None and text.truncated:
        c.errors.append(f"{where} is longer than {MAX_TEXT_BYTES:,} bytes ({length:,} stored); "
                        f"only the first {MAX_TEXT_BYTES:,} were kept.")
    if text is not None and key.startswith("Raw profile type ") and key[17:].lower() in ("exif", "app1"):
        _imagemagick_exif(text, c)


def _imagemagick_exif(text: Text, c: Container) -> None:
    """ImageMagick writes EXIF into PNG as hex text: "\\nexif\\n   <length>\\n<hex...>"."""
    m = re.match(r"\s*\w+\s+(\d+)\s+([0-9a-fA-F\s]+)", text.value)
    if m:
        try:
            raw = bytes.fromhex("".join(m.group(2).split()))
        except ValueError:
            return
        c.add_exif(text.where, raw)


# -------------------------------------------------------------------------------------------------------------- JPEG

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _walk_jpeg(buf, c: Container) -> None:
    n = len(buf)
    pos = 2
    count = 0
    xmp_ext: dict[bytes, dict[int, bytes]] = {}
    jumbf: dict[bytes, list] = {}
    while pos < n:
        if buf[pos] != 0xFF:
            c.errors.append(f"JPEG: expected a marker at byte {pos:,}, found 0x{buf[pos]:02x}; stopped reading there.")
            break
        if pos + 1 >= n:
            break
        marker = buf[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            break
        if pos + 4 > n:
            c.errors.append(f"JPEG ends inside a segment header at byte {pos:,} (truncated file).")
            break
        seglen = struct.unpack(">H", buf[pos + 2 : pos + 4])[0]
        end = pos + 2 + seglen
        if seglen < 2 or end > n:
            c.errors.append(
                f"JPEG segment 0x{marker:02X} at byte {pos:,} says it holds {seglen:,} bytes but only "
                f"{max(n - pos - 2, 0):,} remain (truncated or corrupt)."
            )
            end = n
        payload = buf[pos + 4 : end]
        if marker == 0xE1:
            if payload[:6] == b"Exif\x00\x00":
                c.add_exif("JPEG APP1 EXIF", payload[6:])
            elif payload[: len(XMP_NS)] == XMP_NS:
                c.add_text("JPEG APP1 XMP", "XML:com.adobe.xmp", payload[len(XMP_NS) :], "utf-8")
            elif payload[: len(XMP_EXT_NS)] == XMP_EXT_NS and len(payload) >= len(XMP_EXT_NS) + 40:
                body = payload[len(XMP_EXT_NS) :]
                guid, offset = bytes(body[:32]), struct.unpack(">I", body[36:40])[0]
                parts = xmp_ext.setdefault(guid, {})
                if sum(len(p) for p in parts.values()) < MAX_TEXT_BYTES:
                    parts[offset] = bytes(body[40:])
        elif marker == 0xEB:
            # APP11 carries JUMBF: "JP", instance (2), sequence (4), then the box header (LBox, TBox; repeated in every
            # segment of the box) and the next piece of the box.
            if payload[:2] == b"JP" and len(payload) >= 16:
                c.c2pa = True
                en = bytes(payload[2:4])
                if en not in jumbf:
                    jumbf[en] = [struct.unpack(">I", payload[8:12])[0], bytes(payload[12:16]), 8]
                jumbf[en][2] += len(payload) - 16
        elif marker == 0xED and payload[:14] == b"Photoshop 3.0\x00":
            c.iptc_iim.append(bytes(payload[14 : 14 + MAX_TEXT_BYTES]))
        elif marker == 0xFE:
            c.add_text("JPEG comment (COM)", "comment", payload, "utf-8")
        elif marker in _SOF and len(payload) >= 5:
            h, w = struct.unpack(">HH", payload[1:5])
            c.size = (w, h)
            c.interlaced = marker in (0xC2, 0xC6, 0xCA, 0xCE)  # progressive
        elif marker == 0xDA:
            break  # entropy-coded data follows: no metadata is looked for after the first scan
        pos = end
        count += 1
        if count >= MAX_BLOCKS:
            c.errors.append(f"JPEG has over {MAX_BLOCKS:,} segments; stopped reading its structure there.")
            break
    for guid, parts in xmp_ext.items():
        raw = b"".join(parts[k] for k in sorted(parts))
        c.add_text("JPEG APP1 extended XMP", "XML:com.adobe.xmp", raw, "utf-8")
    for lbox, tbox, have in jumbf.values():
        check_jumbf(c, "JPEG APP11", lbox, tbox, have)


def check_jumbf(c: Container, where: str, lbox: int, tbox: bytes, have: int) -> None:
    """A JUMBF superbox must be a ``jumb`` box whose declared length (LBox) fits in the bytes the file carries."""
    if tbox != b"jumb":
        problem = f"{where}: JUMBF data does not start with a 'jumb' box (found {tbox!r})"
    elif lbox in (0, 1):  # 0: "to the end"; 1: a 64-bit length follows (c2pa manifests never need one)
        return
    elif lbox < 8:
        problem = f"{where}: JUMBF box declares an impossible length of {lbox} bytes"
    elif lbox > have:
        problem = (f"{where}: JUMBF box says it holds {lbox:,} bytes but the file carries only {have:,} "
                   "(truncated, or a box that lies about its length)")
    else:
        return
    if c.c2pa_problem is None:
        c.c2pa_problem = problem


# -------------------------------------------------------------------------------------------------------------- WebP


def _walk_webp(buf, c: Container) -> None:
    n = len(buf)
    declared = 8 + struct.unpack("<I", buf[4:8])[0]
    riff_end = min(n, declared)
    if riff_end < declared:
        c.errors.append(f"WebP RIFF header says the file holds {declared:,} bytes but it has {n:,} (truncated).")
    pos = 12
    count = 0
    while pos + 8 <= riff_end:
        fourcc = bytes(buf[pos : pos + 4])
        length = struct.unpack("<I", buf[pos + 4 : pos + 8])[0]
        start, end = pos + 8, pos + 8 + length
        if end > riff_end:
            c.errors.append(
                f"WebP chunk {fourcc.decode('latin-1')!r} at byte {pos:,} says it holds {length:,} bytes but only "
                f"{riff_end - start:,} remain (truncated or corrupt)."
            )
            end = riff_end
        if fourcc == b"VP8X" and end - start >= 10:
            w = 1 + int.from_bytes(buf[start + 4 : start + 7], "little")
            h = 1 + int.from_bytes(buf[start + 7 : start + 10], "little")
            c.size = (w, h)
        elif fourcc == b"VP8 " and end - start >= 10 and c.size is None:
            w, h = struct.unpack("<HH", buf[start + 6 : start + 10])
            c.size = (w & 0x3FFF, h & 0x3FFF)
        elif fourcc == b"VP8L" and end - start >= 5 and c.size is None:
            bits = int.from_bytes(buf[start + 1 : start + 5], "little")
            c.size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif fourcc == b"EXIF":
            raw = buf[start:end]
            c.add_exif("WebP EXIF chunk", raw[6:] if raw[:6] == b"Exif\x00\x00" else raw)
        elif fourcc == b"XMP ":
            c.add_text("WebP XMP chunk", "XML:com.adobe.xmp", buf[start:end], "utf-8")
        elif fourcc == b"C2PA":
            c.c2pa = True
            if end - start >= 8:
                lbox, tbox = struct.unpack(">I4s", buf[start : start + 8])
                check_jumbf(c, "WebP C2PA chunk", lbox, tbox, end - start)
            else:
                c.c2pa_problem = "WebP C2PA chunk too short to hold a JUMBF box"
        pos = end + (length & 1)
        count += 1
        if count >= MAX_BLOCKS:
            c.errors.append(f"WebP has over {MAX_BLOCKS:,} chunks; stopped reading its structure there.")
            return


# ------------------------------------------------------------------------------------------------------------- other

_XMP_START = re.compile(rb"<x:xmpmeta|<\?xpacket begin")


def _walk_other(buf, c: Container) -> None:
    """GIF, TIFF, HEIF, AVIF, BMP: no walker of their own. Look for an XMP packet in the first 64 MiB, EXIF via Pillow
    for TIFF (its IFD0 is the EXIF), a C2PA store by its JUMBF labels, and the pixel size of GIF and BMP."""
    limit = min(len(buf), 64 << 20)
    m = _XMP_START.search(buf, 0, limit)
    if m:
        stop = buf.find(b"</x:xmpmeta>", m.start(), limit)
        stop = stop + 12 if stop >= 0 else min(limit, m.start() + MAX_TEXT_BYTES)
        c.add_text(f"{c.fmt.upper()} XMP packet", "XML:com.adobe.xmp", buf[m.start() : stop], "utf-8")
    if c.fmt != "bmp" and buf.find(b"c2pa", 0, limit) >= 0 and buf.find(b"jumb", 0, limit) >= 0:
        c.c2pa = True
    if c.fmt == "tiff":
        c.add_exif("TIFF IFD0", buf[: min(limit, MAX_EXIF_BYTES)])
    elif c.fmt == "gif" and len(buf) >= 10:
        c.size = struct.unpack("<HH", buf[6:10])
    elif c.fmt == "bmp" and len(buf) >= 26:
        w, h = struct.unpack("<ii", buf[18:26])
        c.size = (abs(w), abs(h))
