"""Stable Diffusion's invisible watermarks (``invisible-watermark``'s ``dwtDct`` method), decoded in numpy.

Which marks:

* **SD v1** reference scripts (CompVis ``txt2img.py``): ``WatermarkEncoder().set_watermark('bytes',
  'StableDiffusionV1'.encode())`` then ``encode(bgr, 'dwtDct')`` on the uint8 BGR array; 136 bits, found at 114.
* **SD v2** reference scripts (Stability ``stablediffusion``): the bytes ``SDV2``, the same way; 32 bits, found at 31.
* **SDXL** (diffusers ``StableDiffusionXLWatermarker``, Stability ``generative-models``): the 48 bits
  ``WATERMARK_BITS``, found at 40 (generative-models' own rule). Both embed into the float [0, 255] image;
  generative-models (and diffusers since PR #7013) hand the encoder BGR, older diffusers handed it RGB. ``PASSES``
  lists the three decodings tried.

How: ``imwatermark``'s ``dwtDct`` decoder converts BGR to YUV (OpenCV's 8-bit fixed-point formula), takes a one-level
Haar DWT of the U channel, cuts its approximation band into 4x4 blocks, and reads one bit per block from the largest
of the block's other 15 coefficients (``|value| mod 36 > 18``); block *k* votes for bit ``k mod L``. The reference
decoder walks the blocks in a Python loop (about 2 s on a 12 MP image, 0.16 s on 1 MP); this module computes the very
same per-block votes with array operations (bit-for-bit the same colour conversion and DWT arithmetic; the tests
compare it with ``imwatermark``'s own ``WatermarkDecoder``), so it never imports ``imwatermark``, OpenCV or
PyWavelets. One addition: the SDXL pipelines embed into the *float* image, whose U channel OpenCV offsets by 0.5
instead of 128, so decoding the uint8 file as ``WatermarkDecoder`` does loses 5-12 of the 48 bits (blocks whose float
U was negative flip); the SDXL mark is therefore also decoded in that float space, where it comes back whole.

Cost bound (the decision, measured in ``benchmarks/results_evidence.md``):

* only the **top band** of the image is decoded: the first rows, a multiple of 8, up to ``BAND_PIXELS`` (512 Ki
  pixels: half an SDXL image, all of a 512x512 SD v1 image, the top 128 rows of a 12 MP photo). Every block keeps
  its *global* index, so the band votes exactly as the same blocks do in a full decode, only with fewer votes per bit
  (about 60 per SD v1 bit, 170 per SDXL bit). Non-interlaced PNG and baseline JPEG are decoded only down to the band's
  last row, so the cost stays near 10-20 ms whatever the image size; they are checked up to ``MAX_PIXELS`` (16 Mi
  pixels). A full decode of a 12 MP image would cost 150-400 ms before any watermark work, and the reference decoder
  about 2 s more.
* progressive JPEG, interlaced PNG, WebP, GIF, BMP and TIFF must be decoded whole, so they are checked only up to
  ``FULL_DECODE_MAX_PIXELS`` (1 Mi pixels; a 4 MP progressive JPEG already costs 35 ms to decode). Images under
  256 x 256 are not checked either (the encoder refuses them).
* larger images are rarely watermarked anyway: the marks are embedded at the generator's output size (SD v1 512-768 px,
  SDXL about 1 MP, or whatever size an img2img/upscale pipeline outputs) and do not survive a later resize.
* a mark found is strong evidence (a false match needs 40 of 48, 114 of 136 or 31 of 32 bits by chance: about 5e-6
  for SDXL over its three decoding passes, 1e-8 for SD v2, far less for SD v1); a mark not found proves nothing:
  JPEG re-encoding, resizing, cropping off the top rows, or any generator that does not embed it (most don't) all
  leave none.
"""

from __future__ import annotations

import numpy as np

SDV1_MESSAGE = b"StableDiffusionV1"
SDV2_MESSAGE = b"SDV2"
# diffusers.pipelines.stable_diffusion_xl.watermark: WATERMARK_MESSAGE, as bits.
SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110
SDXL_BITS = [int(b) for b in bin(SDXL_MESSAGE)[2:]]

MAX_PIXELS = 16 * 1024 * 1024
FULL_DECODE_MAX_PIXELS = 1024 * 1024
BAND_PIXELS = 512 * 1024
MIN_PIXELS = 256 * 256
SCALE = 36  # imwatermark's dwtDct default scales=[0, 36, 36]: only channel 1 (U) carries the mark.

_C = 0.7071067811865476  # pywt's Haar filter tap, so the approximation band is bit-identical to pywt.dwt2(x, "haar")

# (name, bits, bits needed to call it found, key)
MARKS = [
    ("Stable Diffusion v1 reference watermark 'StableDiffusionV1'",
     [int(b) for b in np.unpackbits(np.frombuffer(SDV1_MESSAGE, np.uint8))], 114, SDV1_MESSAGE),
    ("SDXL watermark (diffusers / generative-models, 48 bits)", SDXL_BITS, 40, SDXL_MESSAGE),
    ("Stable Diffusion v2 reference watermark 'SDV2'",
     [int(b) for b in np.unpackbits(np.frombuffer(SDV2_MESSAGE, np.uint8))], 31, SDV2_MESSAGE),
]


def u_channel(arr: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(arr, COLOR_BGR2YUV)[..., 1]`` for uint8 ``arr`` read as BGR, bit-exact (14-bit fixed point),
    as int32."""
    b = arr[..., 0].astype(np.int32)
    y = arr[..., 2] * np.int32(4899)
    y += arr[..., 1] * np.int32(9617)
    y += b * np.int32(1868)
    y += 8192
    y >>= 14
    b -= y
    b *= 8061
    b += (128 << 14) + 8192
    b >>= 14
    return np.clip(b, 0, 255, out=b)


def block_votes(channel: np.ndarray, full_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block votes (0/1) and each block's global index, for the top rows ``channel`` of an image of
    ``full_shape`` (rows, cols), exactly as ``EmbedMaxDct.decode`` computes them on the whole image."""
    rows, cols = full_shape
    ca_cols = cols // 4 * 2
    nbc = ca_cols // 4  # blocks per row of the full image's approximation band
    nbr_full = (rows // 4 * 2) // 4
    x = channel[: channel.shape[0] // 8 * 8, : nbc * 8]
    # pywt.dwt2 'haar' approximation, in float64 and in pywt's order of operations (along axis 0, then axis 1), so
    # that the votes are bit-identical to imwatermark's even where a value sits exactly on the threshold.
    f64 = np.float64
    ca = _C * (_C * x[0::2, 0::2].astype(f64) + _C * x[1::2, 0::2].astype(f64))
    ca += _C * (_C * x[0::2, 1::2].astype(f64) + _C * x[1::2, 1::2].astype(f64))
    nbr = min(ca.shape[0] // 4, nbr_full)
    blocks = ca[: nbr * 4, : nbc * 4].reshape(nbr, 4, nbc, 4).transpose(0, 2, 1, 3).reshape(nbr * nbc, 16)
    mags = np.abs(blocks[:, 1:])
    pos = np.argmax(mags, axis=1)
    val = mags[np.arange(len(pos)), pos]
    votes = (np.mod(val, SCALE) > 0.5 * SCALE).astype(np.float64)
    index = (np.arange(nbr)[:, None] * nbc + np.arange(nbc)[None, :]).reshape(-1)
    return votes, index


def decode_bits(votes: np.ndarray, index: np.ndarray, length: int) -> np.ndarray:
    """Average the votes per bit (block k votes for bit k mod length) and threshold as imwatermark does."""
    bit = index % length
    sums = np.bincount(bit, weights=votes, minlength=length)
    counts = np.bincount(bit, minlength=length)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = sums / counts
    return (np.nan_to_num(avg) * 255) > 127


def u_channel_float(arr: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(arr.astype(float32), COLOR_BGR2YUV)[..., 1]``: the U channel as the SDXL pipelines' encoder
    saw it (they watermark the float [0, 255] image, where OpenCV offsets U by 0.5, not 128), in float32 as there."""
    f32 = np.float32
    b = arr[..., 0].astype(f32)
    y = arr[..., 2] * f32(0.299)
    y += arr[..., 1] * f32(0.587)
    y += b * f32(0.114)
    b -= y
    b *= f32(0.492)
    b += f32(0.5)
    return b


# The decoding passes: (channel order the encoder was handed, colour space it embedded in, marks to look for).
# * uint8, BGR: imwatermark's own decoding, as the SD v1/v2 reference scripts embed (and any uint8 BGR embedding);
# * float, BGR: the SDXL mark as generative-models and diffusers (since #7013) embed it, in the float image;
# * float, RGB handed over as BGR: the SDXL mark as diffusers embedded it before #7013.
# In the float cases imwatermark's uint8 decoding loses 5-12 of the 48 bits (blocks whose float U was negative flip
# on the way to uint8); decoding in the space the mark was embedded in brings it back whole (see the tests).
PASSES = (
    ("BGR", "uint8", {SDV1_MESSAGE, SDV2_MESSAGE, SDXL_MESSAGE}),
    ("BGR", "float", {SDXL_MESSAGE}),
    ("RGB passed as BGR", "float", {SDXL_MESSAGE}),
)


def detect(rgb_band: np.ndarray, full_shape: tuple[int, int]) -> list[dict]:
    """Every mark that matches in one of the ``PASSES``: ``[{"mark", "matched", "bits", "order", "space"}]``, best
    match per mark, best first."""
    found = []
    for order, space, keys in PASSES:
        arr = rgb_band[..., ::-1] if order == "BGR" else rgb_band
        votes, index = block_votes(u_channel(arr) if space == "uint8" else u_channel_float(arr), full_shape)
        for name, bits, need, key in MARKS:
            if key not in keys or len(votes) < 4 * len(bits):
                continue
            decoded = decode_bits(votes, index, len(bits))
            matched = int(np.sum(decoded == np.array(bits, dtype=bool)))
            if matched >= need:
                found.append({"mark": name, "matched": matched, "bits": len(bits), "order": order, "space": space})
    found.sort(key=lambda f: f["matched"] / f["bits"], reverse=True)
    best: dict[str, dict] = {}
    for f in found:
        best.setdefault(f["mark"], f)
    return list(best.values())


# ------------------------------------------------------------------------------------------------ bounded decoding


def band_rows(width: int, height: int) -> int:
    rows = max(8, BAND_PIXELS // max(width, 1)) // 8 * 8
    return min(rows, height // 8 * 8)


def load_band(stream_factory, fmt: str, size, interlaced: bool) -> tuple[np.ndarray | None, str, tuple]:
    """``(top band as uint8 RGB, what was checked, (width, height))``, or ``(None, why not, size)``. Never decodes
    more than ``MAX_PIXELS`` pixels nor more than Pillow's ``Image.MAX_IMAGE_PIXELS``; the size is checked from the
    header before any pixel is decoded."""
    from PIL import Image

    limit = MAX_PIXELS
    if Image.MAX_IMAGE_PIXELS:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    if size is not None and size[0] * size[1] > limit:
        return None, _too_big(size, limit), size
    try:
        im = Image.open(stream_factory())
    except Image.DecompressionBombError:
        return None, "not checked: over Pillow's MAX_IMAGE_PIXELS", size
    with im:
        if size is None:
            size = im.size
        elif im.size != tuple(size):
            why = f"not checked: the decoder reports {im.size[0]}x{im.size[1]}, the header {size[0]}x{size[1]}"
            return None, why, size
        w, h = size
        if w * h > limit:
            return None, _too_big(size, limit), size
        if w * h < MIN_PIXELS:
            return None, f"not checked: {w}x{h} is under 256x256 pixels", size
        partial = fmt in ("png", "jpeg") and not interlaced
        if not partial and w * h > FULL_DECODE_MAX_PIXELS:
            kind = {"png": "interlaced PNG", "jpeg": "progressive JPEG"}.get(fmt, fmt.upper())
            return None, f"not checked: {kind} images over 1 MP must be decoded whole (time budget)", size
        rows = band_rows(w, h)
        if rows < 8 or rows * w > 4 * BAND_PIXELS:
            return None, f"not checked: {w}x{h} is too wide or too short for a band of rows", size
        if partial and len(im.tile) == 1 and rows < h:
            band = _top_rows(im, rows, fmt)
        else:
            im.load()
            band = im.crop((0, 0, w, rows))
        if band.mode not in ("RGB", "RGBA", "L", "P", "LA", "PA", "CMYK", "YCbCr"):
            return None, f"not checked: pixel mode {band.mode}", size
        arr = np.asarray(band if band.mode == "RGB" else band.convert("RGB"))
    return arr[:rows], f"checked the top {rows} rows ({rows * w / 1e6:.2f} MP) for SD v1, SD v2 and SDXL marks", size


def _too_big(size, limit: int) -> str:
    return f"not checked: {size[0]}x{size[1]} is over the {limit / 1e6:.1f} MP decoding limit"


def _top_rows(im, rows: int, fmt: str):
    """Decode only the first ``rows`` rows: shrink the decoder's target region (Pillow decodes PNG and JPEG
    top-down, so the rows it writes are exactly the image's first rows; the tests check this against a full decode).
    The PNG decoder stops cleanly when the region is full; libjpeg then complains that the rest of the scan was not
    read, which Pillow reports as a broken stream after the rows are in place, so that one error is expected here."""
    w = im.size[0]
    tile = im.tile[0]
    im.tile = [tile._replace(extents=(0, 0, w, rows))] if hasattr(tile, "_replace") else [
        (tile[0], (0, 0, w, rows), tile[2], tile[3])]
    im._size = (w, rows)
    im.load_end = lambda: None  # the PNG trailer walk would start mid-IDAT
    try:
        im.load()
    except OSError:
        if fmt != "jpeg" or getattr(im, "_im", None) is None:
            raise
    return im


def read(stream_factory, fmt: str, size, interlaced: bool) -> tuple[dict | None, str]:
    """``(finding or None, what was checked)``; raises OSError (in plain words) when the pixels can't be decoded."""
    try:
        arr, checked, size = load_band(stream_factory, fmt, size, interlaced)
    except (OSError, SyntaxError, ValueError) as exc:
        raise OSError(f"the pixels could not be decoded for the watermark check ({exc})") from None
    if arr is None:
        return None, checked
    hits = detect(arr, (size[1], size[0]))
    if not hits:
        return None, checked + ": none found (absence proves nothing)"
    best = hits[0]
    detail = (
        f"{best['mark']} decoded from the pixels: {best['matched']} of {best['bits']} bits match "
        f"(channel order {best['order']}, {best['space']} YUV; top {arr.shape[0]} rows)."
    )
    return {
        "kind": "watermark",
        "says": "ai-generated",
        "detail": detail,
        "strong": True,
        "fields": {"marks": hits},
    }, checked + f": found {best['mark']}"
