"""BayesFakeImageProcessor: any PIL input becomes [1, 3, size, size] float pixel_values, exactly as in training."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hub_models.image_processing_bayesfake import BayesFakeImageProcessor, to_rgb

SIZE = 8
RED, BLUE, WHITE = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (1.0, 1.0, 1.0)  # normalised with mean = std = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def processor():
    return BayesFakeImageProcessor(size=SIZE)


def pixels(processor, image):
    out = processor(image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, SIZE, SIZE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    return out


def colour(out, y=None, x=None):
    """Mean normalised RGB of the whole image, or of one pixel."""
    if y is None:
        return out[0].mean(dim=(1, 2))
    return out[0, :, y, x]


def close(value, rgb, atol=0.05):
    return torch.allclose(value, torch.as_tensor(rgb, dtype=torch.float32), atol=atol)


def reopened(image, fmt, **save_kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return Image.open(io.BytesIO(buffer.getvalue()))


# ----------------------------------------------------------------------------------------------------------------------
# Every PIL mode


def test_rgb(processor):
    assert close(colour(pixels(processor, Image.new("RGB", (20, 12), (255, 0, 0)))), RED)


def test_rgba_composited_over_white(processor):
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # transparent black reads as white
    assert close(colour(pixels(processor, image)), WHITE)
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 128))  # half-transparent black: mid grey
    assert close(colour(pixels(processor, half)), (0.0, 0.0, 0.0), atol=0.02)
    opaque = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    assert close(colour(pixels(processor, opaque)), BLUE)


def test_la(processor):
    assert close(colour(pixels(processor, Image.new("LA", (10, 10), (0, 0)))), WHITE)
    assert close(colour(pixels(processor, Image.new("LA", (10, 10), (0, 255)))), (-1.0, -1.0, -1.0))


def test_l_and_1(processor):
    assert close(colour(pixels(processor, Image.new("L", (10, 10), 255))), WHITE)
    assert close(colour(pixels(processor, Image.new("1", (10, 10), 0))), (-1.0, -1.0, -1.0))
    assert close(colour(pixels(processor, Image.new("1", (10, 10), 1))), WHITE)


def test_palette(processor):
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    assert close(colour(pixels(processor, image)), RED)


def test_palette_with_transparency(processor):
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 10, 5))  # top half red, bottom half index 0 = transparent black
    image.info["transparency"] = 0
    out = pixels(processor, reopened(image, "PNG"))
    assert close(colour(out, 0, SIZE // 2), RED)
    assert close(colour(out, SIZE - 1, SIZE // 2), WHITE)


def test_cmyk(processor):
    assert close(colour(pixels(processor, Image.new("CMYK", (10, 10), (0, 0, 0, 0)))), WHITE)
    assert close(colour(pixels(processor, Image.new("CMYK", (10, 10), (0, 255, 255, 0)))), RED)


def test_16_bit_png(processor, tmp_path):
    array = np.full((10, 12), 128 * 257, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    image = Image.open(path)
    assert image.mode.startswith("I")  # PIL reopens 16-bit PNG as I;16 or I
    out = pixels(processor, image)
    expected = (128 / 255 - 0.5) / 0.5
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)
    white = tmp_path / "white.png"
    Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16)).save(white)
    assert close(colour(pixels(processor, Image.open(white))), WHITE, atol=1e-6)


def test_mode_i_and_f(processor):
    image_i = Image.fromarray(np.full((10, 10), 65535, dtype=np.int32))
    assert image_i.mode == "I"
    assert close(colour(pixels(processor, image_i)), WHITE, atol=1e-6)
    image_f = Image.fromarray(np.full((10, 10), 255.0, dtype=np.float32))
    assert image_f.mode == "F"
    assert close(colour(pixels(processor, image_f)), WHITE, atol=1e-6)
    out_of_range = Image.fromarray(np.full((10, 10), 1e6, dtype=np.float32))  # clipped, not wrapped
    assert close(colour(pixels(processor, out_of_range)), WHITE, atol=1e-6)


def test_exif_rotated_jpeg(processor, tmp_path):
    # 64 wide x 32 tall: left half red, right half blue. Orientation 6 means "rotate 90 degrees clockwise to view",
    # so the upright image is 32 wide x 64 tall with red on top and blue below.
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)

    upright = to_rgb(Image.open(path))
    assert upright.size == (32, 64)  # width and height swapped before any resize

    # Shorter side to 8 then center crop: the upright image gives red top rows and blue bottom rows; an unrotated one
    # would give red left columns and blue right columns.
    out = pixels(processor, str(path))
    assert close(colour(out, 0, SIZE // 2), RED, atol=0.1)
    assert close(colour(out, SIZE - 1, SIZE // 2), BLUE, atol=0.1)
    assert close(colour(out, SIZE // 2 - 2, 0), colour(out, SIZE // 2 - 2, SIZE - 1), atol=0.1)


def test_animated_gif_first_frame(processor, tmp_path):
    frames = [Image.new("RGB", (10, 10), rgb) for rgb in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = Image.open(path)
    assert image.is_animated
    image.seek(2)  # even when the caller left it on a later frame
    assert close(colour(pixels(processor, image)), RED, atol=0.02)
    assert close(colour(pixels(processor, str(path))), RED, atol=0.02)


def test_one_pixel_image(processor):
    assert close(colour(pixels(processor, Image.new("RGB", (1, 1), (0, 0, 255)))), BLUE)


def test_extreme_aspect_ratio(processor):
    pixels(processor, Image.new("RGB", (1000, 1), (0, 0, 255)))


@pytest.mark.parametrize("size", [(8, 100_000), (100_000, 8)])
def test_extreme_aspect_ratio_is_cropped_before_resizing(processor, size, monkeypatch):
    """A 274-byte 8x100,000 PNG must not be resized into a 32x400,000 intermediate (0.9 GB per 100k rows)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 0, 255)).save(buffer, format="PNG")
    resized = []
    original = Image.Image.resize

    def recording_resize(self, new_size, *args, **kwargs):
        resized.append(new_size)
        return original(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    assert close(colour(pixels(processor, buffer.getvalue())), BLUE)
    assert resized and max(w * h for w, h in resized) <= 4 * processor.size**2


def test_moderate_aspect_ratio_is_unchanged_by_the_crop(processor):
    """Up to 4:1 nothing is cropped first: the pixels are those of resize-then-crop as before."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 200, 3), dtype=np.uint8))
    w, h, size = image.width, image.height, processor.size
    scale = size / min(w, h)
    expected = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    left = (expected.width - size) // 2
    expected = np.asarray(expected.crop((left, 0, left + size, size)))
    assert np.array_equal(processor.to_rgb_uint8(image), expected)


# ----------------------------------------------------------------------------------------------------------------------
# Unusable inputs give a clear ValueError


def test_empty_file(processor, tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable image"):
        processor(str(path))
    with pytest.raises(ValueError, match="not a readable image"):
        processor(b"")


def test_truncated_jpeg(processor, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="not a readable image"):
        processor(str(path))


def test_text_file(processor, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="not a readable image"):
        processor(str(path))


def test_missing_file(processor, tmp_path):
    with pytest.raises(ValueError, match="no such image file"):
        processor(str(tmp_path / "nowhere.png"))


def test_too_many_pixels():
    small = BayesFakeImageProcessor(size=SIZE, max_pixels=100)
    with pytest.raises(ValueError, match="too large"):
        small(Image.new("RGB", (11, 10)))
    small(Image.new("RGB", (10, 10)))  # exactly at the limit is fine


def test_bad_arrays_and_tensors(processor):
    with pytest.raises(ValueError, match="uint8"):
        processor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="tensors"):
        processor(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ValueError, match="resample"):
        BayesFakeImageProcessor(resample="box")


# ----------------------------------------------------------------------------------------------------------------------
# Same preprocessing as training


def test_uint8_numpy(processor):
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 2] = 255
    assert close(colour(pixels(processor, rgb)), BLUE)
    grey = np.full((10, 12), 255, dtype=np.uint8)
    assert close(colour(pixels(processor, grey)), WHITE)


def test_batch_of_mixed_inputs(processor, tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (5, 9), 255).save(path)
    out = processor([Image.new("RGB", (20, 12), (255, 0, 0)), str(path), np.zeros((4, 4, 3), np.uint8),
                     path.read_bytes()])["pixel_values"]
    assert out.shape == (4, 3, SIZE, SIZE)


def test_native_size_equals_training_normalisation():
    processor = BayesFakeImageProcessor(size=32, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    raw = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = processor(Image.fromarray(raw))["pixel_values"]
    expected = processor.normalize_uint8(torch.from_numpy(raw).permute(2, 0, 1)[None])
    assert torch.equal(out, expected)
    assert torch.equal(processor(raw)["pixel_values"], expected)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    manual = (torch.from_numpy(raw).permute(2, 0, 1)[None].float() / 255 - mean) / std
    assert torch.allclose(out, manual, atol=1e-6)


def test_numpy_return_type(processor):
    out = processor(Image.new("RGB", (9, 9)), return_tensors="np")["pixel_values"]
    assert isinstance(out, np.ndarray) and out.shape == (1, 3, SIZE, SIZE) and out.dtype == np.float32


def test_from_config_and_auto_loading(tmp_path, tiny_config_kwargs):
    """The processor saved next to a model loads back through AutoImageProcessor and gives identical outputs."""
    from transformers import AutoImageProcessor

    from hub_models.configuration_bayesfake import BayesFakeConfig
    from hub_models.export import export_detector
    from hub_models.modeling_bayesfake import BayesFakeDetector

    config = BayesFakeConfig(image_size=16, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3],
                             resample="bilinear", **tiny_config_kwargs)
    folder = export_detector(BayesFakeDetector(config), tmp_path / "tiny")
    local = BayesFakeImageProcessor.from_config(config)
    loaded = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "BayesFakeImageProcessor"
    assert (loaded.size, loaded.image_mean, loaded.image_std, loaded.resample) == (16, [0.4, 0.5, 0.6],
                                                                                   [0.2, 0.25, 0.3], "bilinear")
    rng = np.random.default_rng(1)
    inputs = [Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)),
              Image.new("RGBA", (40, 30), (10, 20, 30, 100)), Image.new("L", (16, 16), 77)]
    for image in inputs:
        assert torch.equal(loaded(image)["pixel_values"], local(image)["pixel_values"])
