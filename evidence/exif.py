"""EXIF (and the other plain "made with" tags): camera make/model, the software that wrote the file.

``says``: ``ai-generated`` when a software/creator-tool tag names a known image generator (``AI_SOFTWARE``), else
``camera`` when Make or Model is present, else ``none`` (EXIF present, but it names neither). Never strong: any tool
can write or copy these tags (a camera Make/Model copied onto a generated image is a well-known trick), and they are
stripped by most upload pipelines.

Text that generators put into EXIF fields (A1111's parameters in UserComment, ComfyUI's ``workflow:``/``prompt:`` in
Make/Model of a WebP) is handed to :mod:`evidence.parameters` instead of being read as a camera.
"""

from __future__ import annotations

import re

from ._container import Container, Text

# Generators and AI image services whose name in a Software / CreatorTool / PNG "Software" tag means "made by AI".
AI_SOFTWARE = re.compile(
    r"\b(adobe firefly|firefly|dall[\-\u00b7 ]?e|midjourney|stable ?diffusion|sdxl|novelai|imagen|"
    r"chatgpt|gpt-4o|gpt-image|openai|leonardo\.?ai|ideogram|flux(?:\.1)?|black forest labs|comfyui|"
    r"automatic1111|stable-diffusion-webui|invokeai|fooocus|draw things|dreamstudio|bing image creator|"
    r"image creator from designer|gemini|nano banana|google ai|meta ai|imagine with meta|playground ?ai|"
    r"krea|runway|nightcafe|civitai|tensor\.art|seaart|dreamina|kling|hailuo|recraft|grok)\b",
    re.I,
)

TAGS = {0x010F: "Make", 0x0110: "Model", 0x0131: "Software", 0x0132: "DateTime", 0x010E: "ImageDescription",
        0x013B: "Artist", 0x8298: "Copyright"}
EXIF_IFD = 0x8769
EXIF_TAGS = {0x9003: "DateTimeOriginal", 0xA434: "LensModel", 0xA431: "BodySerialNumber", 0x9286: "UserComment"}
XP_COMMENT = 0x9C9C
MAX_FIELD = 200


def _clean(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def user_comment(raw) -> str | None:
    """EXIF UserComment: an 8-byte charset prefix, then the text. A1111 writes ``UNICODE\\0`` + UTF-16-BE (piexif);
    other tools write UTF-16-LE under the same prefix, so the byte order is guessed from where the zero bytes are."""
    if isinstance(raw, str):
        return _clean(raw)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 8:
        return None
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix == b"UNICODE\x00":
        if len(body) >= 2 and body[0] == 0 and body[1] != 0:
            enc = "utf-16-be"
        elif len(body) >= 2 and body[1] == 0 and body[0] != 0:
            enc = "utf-16-le"
        else:
            enc = "utf-16-be"
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            enc = "utf-16"
        return _clean(body.decode(enc, errors="replace"))
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8, b"JIS\x00\x00\x00\x00\x00"):
        return _clean(body.decode("utf-8", errors="replace"))
    return _clean(bytes(raw).decode("utf-8", errors="replace"))


def parse(c: Container) -> tuple[dict[str, str], list[Text]]:
    """``(fields, texts)``: the first readable EXIF block's fields, and the generator texts found in EXIF."""
    from PIL import Image

    fields: dict[str, str] = {}
    texts: list[Text] = []
    for where, raw in c.exif:
        try:
            ex = Image.Exif()
            ex.load(raw if raw[:6] == b"Exif\x00\x00" else b"Exif\x00\x00" + raw)
            ifd0 = dict(ex.items())
            sub = dict(ex.get_ifd(EXIF_IFD).items()) if EXIF_IFD in ifd0 else {}
        except Exception as exc:  # Pillow raises many kinds on corrupt EXIF
            c.errors.append(f"{where}: EXIF could not be parsed ({type(exc).__name__}: {exc}).")
            continue
        for tag, name in TAGS.items():
            value = _clean(ifd0.get(tag))
            if value and name not in fields:
                fields[name] = value
        for tag, name in EXIF_TAGS.items():
            if tag == 0x9286:
                value = user_comment(sub.get(tag))
            else:
                value = _clean(sub.get(tag))
            if value and name not in fields:
                fields[name] = value
        xp = ifd0.get(XP_COMMENT)
        if isinstance(xp, (bytes, tuple)):
            try:
                value = _clean(bytes(xp).decode("utf-16-le", errors="replace"))
            except (TypeError, ValueError):
                value = None
            if value:
                fields.setdefault("XPComment", value)
    # Generator text hiding in EXIF fields goes to the parameters reader, not into the camera fields.
    for name in ("UserComment", "ImageDescription", "XPComment"):
        if name in fields:
            texts.append(Text(f"EXIF {name}", name, fields[name]))
    for name, key in (("Make", "workflow"), ("Model", "prompt")):
        value = fields.get(name, "")
        for prefix in ("workflow:", "prompt:"):
            if value.startswith(prefix):
                texts.append(Text(f"EXIF {name} (ComfyUI)", prefix[:-1], value[len(prefix) :]))
                fields.pop(name)
                break
    for name in list(fields):
        fields[name] = fields[name][:MAX_FIELD] + ("..." if len(fields[name]) > MAX_FIELD else "")
    return fields, texts


def finding(fields: dict[str, str], tools: list[tuple[str, str]]) -> dict | None:
    """One ``exif`` finding from the EXIF fields and the other software tags (``(where, value)``: XMP CreatorTool,
    PNG "Software" text), or None when there is nothing to report."""
    software = [("EXIF Software", fields["Software"])] if "Software" in fields else []
    software += tools
    ai = [(where, v) for where, v in software if AI_SOFTWARE.search(v)]
    shown = {k: v for k, v in fields.items() if k not in ("UserComment", "ImageDescription", "XPComment")}
    if ai:
        where, value = ai[0]
        return {
            "kind": "exif",
            "says": "ai-generated",
            "detail": f"{where} names an image generator: {value!r}.",
            "strong": False,
            "fields": {**shown, "ai_software": [f"{w}: {v}" for w, v in ai]},
        }
    if "Make" in fields or "Model" in fields:
        camera = " ".join(v for v in (fields.get("Make"), fields.get("Model")) if v)
        extra = ", ".join(f"{k}: {fields[k]}" for k in ("DateTimeOriginal", "LensModel", "Software") if k in fields)
        return {
            "kind": "exif",
            "says": "camera",
            "detail": f"EXIF names a camera: {camera}" + (f" ({extra})" if extra else "") + ".",
            "strong": False,
            "fields": shown,
        }
    if shown or software:
        listed = ", ".join(f"{k}: {v}" for k, v in shown.items()) or ", ".join(f"{w}: {v}" for w, v in software)
        return {
            "kind": "exif",
            "says": "none",
            "detail": f"Software/EXIF tags name no camera and no known generator ({listed[:300]}).",
            "strong": False,
            "fields": shown,
        }
    return None
