"""Everyday degradations of an image: the re-encodings and resizes an image goes through on its way around the web.

One PIL implementation shared by training (``train.laundering``: the named launderings a detector is measured under and
its random laundering augmentation) and by inference (``hub_models.copies``: the degraded copies a detector can also
be asked to judge). Every function takes a PIL image, works in 8-bit RGB with the same resampling filter (bicubic) as
the detectors' own image processor, and returns an RGB image of the size it was given.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFilter


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at ``quality`` (PIL's default 4:2:0 chroma subsampling, like most encoders) and decode."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def blur(image: Image.Image, radius: float) -> Image.Image:
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=float(radius)))


def down_up(image: Image.Image, scale: float) -> Image.Image:
    """Downscale by ``scale`` (at least 1 px a side) and back up to the original size, both bicubic."""
    image = image.convert("RGB")
    w, h = image.size
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)


def crop_resize(image: Image.Image, keep: float, left_share: float = 0.5, top_share: float = 0.5) -> Image.Image:
    """Crop ``keep`` of each side (at least 1 px), placed at ``left_share`` / ``top_share`` of the slack (0.5 = the
    centre), and resize back to the original size with bicubic."""
    image = image.convert("RGB")
    w, h = image.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = round((w - cw) * left_share), round((h - ch) * top_share)
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
