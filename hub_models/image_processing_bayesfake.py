"""Image processor of a BayesFake detector: exactly the preprocessing used in training, for any PIL input.

Ships inside every Hub repo next to ``preprocessor_config.json`` (``AutoImageProcessor`` with
``trust_remote_code=True``). Training decodes its data through ``to_rgb_uint8`` and normalises with
``normalize_uint8``, so a served image goes through the very same steps as a training image.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

# The layouts' views (one registry, next to the config that names the layout; a release ships both files).
from .configuration_bayesfake import VIEW_NAMES

try:  # HEIC/HEIF (iPhone photos) where the optional decoder is installed; by name: no dependency to pin or ship
    importlib.import_module("pillow_heif").register_heif_opener()
except ImportError:
    pass

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Larger inputs are refused before decoding (PIL itself refuses > 2x its own limit as a decompression bomb).
DEFAULT_MAX_PIXELS = 64_000_000
# Longest side / shortest side kept before resizing (see resize_center_crop); 4:1 covers panoramas unchanged.
MAX_ASPECT = 4


def load_image(source, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open a path, bytes or PIL image; raise ``ValueError`` with a plain reason when it is not a usable image.

    ``draft_size`` (longer side, shorter side): a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 of its size
    that still has at least these sides (libjpeg's DCT scaling: a 4000x3000 photo needed at 512 px decodes ~10x
    faster); other formats decode whole."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        import io

        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ValueError(f"no such image file: {source}")
    try:
        image = Image.open(source)
        if draft_size is not None and image.format == "JPEG":
            w, h = image.size
            scale = max(draft_size[0] / max(w, h), draft_size[1] / min(w, h))
            if scale < 1:
                image.draft(image.mode, (math.ceil(w * scale), math.ceil(h * scale)))
        image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"image refused: too many pixels ({err})") from err
    except Exception as err:  # PIL raises many types for corrupt, truncated or non-image data
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from err
    return image


def to_rgb(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any PIL image -> 8-bit RGB: EXIF orientation applied, first frame of an animation, alpha over white,
    16/32-bit integer and float modes scaled to 8 bits, palette/CMYK/L/1/LAB/HSV/YCbCr converted."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has no pixels ({image.width}x{image.height})")
    if image.width * image.height > max_pixels:
        raise ValueError(f"image too large: {image.width}x{image.height} pixels exceeds the limit of {max_pixels:,}")
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if mode != "F":  # 16-bit (and PNG 16-bit opened as "I") span 0..65535
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int, resample: str) -> Image.Image:
    """Resize the shorter side to ``size`` (antialiased), then center-crop to ``size`` x ``size``.

    An image longer than ``MAX_ASPECT`` times its width (or the reverse) is first center-cropped to that ratio: the
    final square lies well inside the crop, so the answer is the same up to the filter's edge support, and the resize
    never builds a huge intermediate (an 8x100,000 PNG of 274 bytes would otherwise grow a 32x400,000 image).
    """
    if image.size == (size, size):
        return image
    w, h = image.size
    short = min(w, h)
    if max(w, h) > MAX_ASPECT * short:
        cw, ch = min(w, MAX_ASPECT * short), min(h, MAX_ASPECT * short)
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
        w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), PIL_FILTERS[resample])
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_views(image: Image.Image, size: int, layout: str, max_side: int, resample: str) -> list[Image.Image]:
    """The views of a multi-view detector (``BayesFakeConfig.view_layout``), each ``size`` x ``size``, cut from a copy
    of ``image`` whose longer side is at most ``max_side`` (never upscaled, unless its shorter side is below ``size``):
    "whole" = that copy resized and centre-cropped; the corners and centre are crops at the copy's own scale."""
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    scale = max(scale, size / min(w, h))
    if scale != 1.0:
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), PIL_FILTERS[resample])
    w, h = image.size
    boxes = {"corner_tl": (0, 0), "corner_tr": (w - size, 0), "corner_bl": (0, h - size),
             "corner_br": (w - size, h - size), "centre": ((w - size) // 2, (h - size) // 2)}
    views = {name: image.crop((x, y, x + size, y + size)) for name, (x, y) in boxes.items()}
    views["whole"] = resize_center_crop(image, size, resample)
    return [views[name] for name in VIEW_NAMES[layout]]



class BayesFakeImageProcessor(BaseImageProcessor):
    """PIL/array/path -> normalised ``pixel_values`` [B, 3, size, size]; for a detector whose domain gate has its own
    extractor (``domain_size`` set), also ``domain_pixel_values`` [B, 3, domain_size, domain_size]: the same image
    resized from the original, so the gate sees what the thumbnail lost (a photo shrunk to 32 px looks like CIFAR)."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 32,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        resample: str = "bicubic",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        domain_size: int | None = None,
        domain_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        domain_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        view_layout: str = "center",
        view_max_side: int = 512,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # tolerate the {"height", "width"} form other processors write
            size = int(size.get("height") or size.get("shortest_edge"))
        if resample not in PIL_FILTERS:
            raise ValueError(f"resample must be one of {sorted(PIL_FILTERS)}; got {resample!r}")
        self.size = int(size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.resample = resample
        self.max_pixels = int(max_pixels)
        self.domain_size = None if domain_size is None else int(domain_size)
        self.domain_mean = [float(v) for v in domain_mean]
        self.domain_std = [float(v) for v in domain_std]
        if self.domain_size is not None:
            self.model_input_names = ["pixel_values", "domain_pixel_values"]
        if view_layout != "center" and view_layout not in VIEW_NAMES:
            raise ValueError(f"view_layout must be 'center' or one of {sorted(VIEW_NAMES)}; got {view_layout!r}")
        self.view_layout = view_layout
        self.view_max_side = int(view_max_side)

    @classmethod
    def from_config(cls, config) -> BayesFakeImageProcessor:
        """The processor matching a ``BayesFakeConfig`` (the config is the source of truth)."""
        extractor_gate = getattr(config, "domain_gate", None) not in (None, "features")
        domain = dict(domain_size=config.domain_image_size, domain_mean=config.domain_image_mean,
                      domain_std=config.domain_image_std) if extractor_gate else {}
        views = dict(view_layout=config.view_layout, view_max_side=config.view_max_side) \
            if getattr(config, "view_layout", "center") != "center" else {}
        return cls(size=config.image_size, image_mean=config.image_mean, image_std=config.image_std,
                   resample=config.resample, **domain, **views)

    def domain_processor(self) -> BayesFakeImageProcessor:
        """The processor of the gate's own input: ``domain_size`` px, its normalisation (``pixel_values`` only)."""
        if self.domain_size is None:
            raise ValueError("this detector's domain gate reads its own features: it has no separate input")
        return BayesFakeImageProcessor(size=self.domain_size, image_mean=self.domain_mean, image_std=self.domain_std,
                                       resample=self.resample, max_pixels=self.max_pixels)

    @staticmethod
    def _image_input(image):
        """A uint8 numpy array becomes a PIL image; a tensor is refused (tensors are taken as already preprocessed);
        anything else (PIL, path, bytes) goes to ``load_image`` as it is."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ValueError(f"numpy images must be uint8 HxW or HxWxC; got dtype {image.dtype}")
            return Image.fromarray(image)
        if torch.is_tensor(image):
            raise ValueError("pass PIL images, paths or uint8 numpy arrays; tensors are taken as already preprocessed")
        return image

    def to_rgb_uint8(self, image) -> np.ndarray:
        """One image (PIL, path, bytes or HxW[xC] uint8 array) -> [size, size, 3] uint8 RGB array."""
        image = to_rgb(load_image(self._image_input(image)), self.max_pixels)
        return np.asarray(resize_center_crop(image, self.size, self.resample), dtype=np.uint8)

    def views_uint8(self, image) -> np.ndarray:
        """One image (PIL, path, bytes or HxW[xC] uint8 array) -> its K views [K, size, size, 3] uint8 RGB
        (``view_layout``); a JPEG is decoded only as large as the views need (``load_image``'s draft)."""
        if self.view_layout == "center":
            return self.to_rgb_uint8(image)[None]
        image = to_rgb(load_image(self._image_input(image), draft_size=(self.view_max_side, self.size)),
                       self.max_pixels)
        views = image_views(image, self.size, self.view_layout, self.view_max_side, self.resample)
        return np.stack([np.asarray(view, dtype=np.uint8) for view in views])

    def normalize_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (or [B, K, 3, H, W]) uint8 -> float32 normalised with the config's mean and std (the last
        training step too)."""
        shape = (1, 3, 1, 1) if batch.dim() == 4 else (1, 1, 3, 1, 1)
        mean = torch.tensor(self.image_mean, device=batch.device).view(shape)
        std = torch.tensor(self.image_std, device=batch.device).view(shape)
        return (batch.float() / 255.0 - mean) / std

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        data = {}
        if self.view_layout != "center":  # [B, K, 3, S, S]: K views per image
            arrays = np.stack([self.views_uint8(image) for image in images])
            data["pixel_values"] = self.normalize_uint8(torch.from_numpy(arrays).permute(0, 1, 4, 2, 3))
            if return_tensors not in ("pt", None):
                data = {key: value.numpy() for key, value in data.items()}
            return BatchFeature(data=data, tensor_type=None)
        if self.domain_size is not None:  # decode once, resize twice: both from the original pixels
            images = [image if isinstance(image, np.ndarray) or torch.is_tensor(image)
                      else to_rgb(load_image(image), self.max_pixels) for image in images]
            domain = self.domain_processor()
            arrays = np.stack([domain.to_rgb_uint8(image) for image in images])
            data["domain_pixel_values"] = domain.normalize_uint8(torch.from_numpy(arrays).permute(0, 3, 1, 2))
        arrays = np.stack([self.to_rgb_uint8(image) for image in images])
        data = {"pixel_values": self.normalize_uint8(torch.from_numpy(arrays).permute(0, 3, 1, 2)), **data}
        if return_tensors not in ("pt", None):
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=None)


BayesFakeImageProcessor.register_for_auto_class("AutoImageProcessor")
