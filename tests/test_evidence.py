"""evidence: what an image file itself says about where it came from. Every file is made here, in memory."""

from __future__ import annotations

import datetime
import io
import json
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import evidence
from evidence import read_evidence, strongest, watermark

ROOT = Path(__file__).resolve().parents[1]
NOTHING = "No provenance evidence found in the file. This does not mean the image is real."
A1111 = (
    "a watercolor fox in a birch forest, golden hour\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


# ------------------------------------------------------------------------------------------------------ image makers


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields with per-channel grain (the SD watermark lives in chroma, so a
    flat or grey image would not carry it; real photos and generated images have chroma texture)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 32 + 2, w // 32 + 2, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8))


def png_bytes(im: Image.Image, text: dict | None = None, itxt: dict | None = None, **kw) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    for k, v in (itxt or {}).items():
        info.add_itxt(k, v)
    out = io.BytesIO()
    im.save(out, "PNG", pnginfo=info, **kw)
    return out.getvalue()


def jpeg_bytes(im: Image.Image, exif: Image.Exif | None = None, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=92, exif=exif.tobytes() if exif is not None else b"", **kw)
    return out.getvalue()


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def insert_after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    return png[:33] + b"".join(chunks) + png[33:]


def insert_jpeg_segment(jpg: bytes, marker: int, payload: bytes) -> bytes:
    return jpg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpg[2:]


def xmp_packet(source_type: str = TRAINED, description: str | None = None) -> str:
    desc = (f"<dc:description><rdf:Alt><rdf:li xml:lang='x-default'>{description}</rdf:li></rdf:Alt>"
            "</dc:description>") if description else ""
    return (
        "<?xpacket begin='\ufeff' id='W5M0MpCehiHzreSzNTczkc9d'?>"
        "<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
        "<rdf:Description rdf:about='' xmlns:Iptc4xmpExt='http://iptc.org/std/Iptc4xmpExt/2008-02-29/' "
        f"xmlns:dc='http://purl.org/dc/elements/1.1/' Iptc4xmpExt:DigitalSourceType='{source_type}'>{desc}"
        "</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end='w'?>"
    )


def kinds(result: dict) -> dict:
    return {f["kind"]: f for f in result["findings"]}


def assert_well_formed(result: dict) -> None:
    assert set(result) >= {"findings", "summary", "errors"}
    assert isinstance(result["summary"], str) and result["summary"].endswith(".")
    assert all(isinstance(e, str) and e for e in result["errors"])
    for f in result["findings"]:
        assert f["kind"] in evidence.KINDS and f["says"] in evidence.SAYS
        assert isinstance(f["detail"], str) and len(f["detail"]) <= 2000
        assert isinstance(f["proves"], str) and f["proves"]
    json.dumps(result)  # JSON-serialisable
    summary = result["summary"].lower()
    # Never claims an image is real; "does not mean/show the image is real" is the only way "real" may appear.
    assert "is real" not in summary.replace("does not mean the image is real", "").replace(
        "does not show the image is real", "")


# ------------------------------------------------------------------------------------------------------------- C2PA


@pytest.fixture(scope="module")
def c2pa_signing():
    """An ES256 test CA and end-entity certificate (digitalSignature, emailProtection EKU), and a c2pa signer that
    signs through a callback with the end-entity key."""
    import c2pa
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bayesfake test")])

    def usage(**on):
        keys = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{k: on.get(k, False) for k in keys})

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bayesfake test CA")).issuer_name(name("bayesfake test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("bayesfake test signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
    chain = pem(cert) + pem(ca)

    def es256(data: bytes) -> bytes:  # COSE wants the raw r||s form, not DER
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def sign(source: bytes, mime: str, source_type: str, action: str = "c2pa.created") -> bytes:
        signer = c2pa.Signer.from_callback(es256, c2pa.C2paSigningAlg.ES256, chain, None)
        manifest = {
            "claim_generator_info": [{"name": "bayesfake-tests", "version": "1.0"}],
            "title": "test image",
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                {"action": action, "digitalSourceType": source_type, "softwareAgent": {"name": "TestDiffusion 2"}},
            ]}}],
        }
        out = io.BytesIO()
        with c2pa.Builder(json.dumps(manifest)) as builder:
            builder.sign(signer, mime, io.BytesIO(source), out)
        return out.getvalue()

    return {"sign": sign, "ca_pem": pem(ca)}


@pytest.fixture(scope="module")
def signed_jpeg(c2pa_signing):
    return c2pa_signing["sign"](jpeg_bytes(photo(320, 240)), "image/jpeg", TRAINED)


def test_c2pa_valid_ai_credential_is_strong(signed_jpeg, c2pa_signing):
    result = read_evidence(signed_jpeg)
    assert_well_formed(result)
    f = kinds(result)["c2pa"]
    assert f["says"] == "ai-generated" and f["strong"] is True
    assert f["fields"]["validation"] == "valid" and f["fields"]["validation_state"] == "Valid"
    assert f["fields"]["signer"] == "bayesfake test signer"
    assert f["fields"]["claim_generator"].startswith("bayesfake-tests")
    assert f["fields"]["digital_source_type"] == "trainedAlgorithmicMedia"
    assert "not on any trust list" in f["detail"] and "TestDiffusion 2" in f["detail"]
    assert result["says"] == "ai-generated" and result["strong"] is True
    assert result["summary"].startswith("Strong evidence of AI generation: a valid C2PA credential")
    assert result["findings"][0]["kind"] == "c2pa" and result["errors"] == []

    trusted = read_evidence(signed_jpeg, trust_anchors=c2pa_signing["ca_pem"])
    assert kinds(trusted)["c2pa"]["fields"]["validation"] == "trusted"
    assert "trust anchor you supplied" in kinds(trusted)["c2pa"]["detail"]
    refused = read_evidence(signed_jpeg, trust_anchors="not a certificate")
    assert kinds(refused)["c2pa"]["fields"]["validation"] == "valid"
    assert refused["errors"][0].startswith("C2PA trust anchors refused, read without them")


def test_c2pa_tampered_after_signing_is_reported_invalid_and_not_strong(signed_jpeg):
    data = bytearray(signed_jpeg)
    sos = data.rfind(b"\xff\xda")
    for i in range(sos + 60, sos + 90):  # flip entropy-coded pixel bytes after signing
        data[i] ^= 0x5A
    result = read_evidence(bytes(data))
    assert_well_formed(result)
    f = kinds(result)["c2pa"]
    assert f["says"] == "none" and f["strong"] is False
    assert f["fields"]["validation"] == "invalid" and f["fields"]["claimed"] == "ai-generated"
    assert "assertion.dataHash.mismatch" in f["fields"]["failures"]
    assert f["detail"].startswith("C2PA credential FAILED validation")
    assert not evidence.is_strong(f)
    assert result["says"] == "none" and result["strong"] is False
    assert "failed validation" in result["summary"] and "does not mean the image is real" in result["summary"]


def test_c2pa_ai_edit_and_camera_claims(c2pa_signing):
    edited = c2pa_signing["sign"](png_bytes(photo(300, 260)), "image/png",
                                  "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia")
    f = kinds(read_evidence(edited))["c2pa"]
    assert f["says"] == "ai-edited" and f["strong"] is True
    camera = c2pa_signing["sign"](jpeg_bytes(photo(300, 260)), "image/jpeg",
                                  "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture")
    result = read_evidence(camera)
    f = kinds(result)["c2pa"]
    assert f["says"] == "camera" and f["strong"] is False  # a self-made key can sign "camera" on anything
    assert result["summary"].startswith("Weak camera evidence only")
    trusted = read_evidence(camera, trust_anchors=c2pa_signing["ca_pem"])
    assert kinds(trusted)["c2pa"]["strong"] is True
    assert trusted["summary"].startswith("Camera provenance:")
    assert_well_formed(trusted)


# ------------------------------------------------------------------------------------------------------ parameters


def test_a1111_parameters_in_png_text_chunk():
    result = read_evidence(png_bytes(photo(320, 240), {"parameters": A1111}))
    assert_well_formed(result)
    f = kinds(result)["parameters"]
    assert f["says"] == "ai-generated" and f["strong"] is True
    assert f["fields"]["Steps"] == "28" and f["fields"]["Sampler"] == "DPM++ 2M"
    assert f["fields"]["Model"] == "v1-5-pruned-emaonly" and f["fields"]["Seed"] == "1234567"
    assert "watercolor fox" in f["fields"]["prompt"]
    assert result["summary"].startswith("Strong evidence of AI generation: the file carries")


def test_a1111_inpainting_is_ai_edited():
    text = A1111 + ", Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked"
    f = kinds(read_evidence(png_bytes(photo(320, 240), {"parameters": text})))["parameters"]
    assert f["says"] == "ai-edited" and f["strong"] is True


@pytest.mark.parametrize("byte_order", ["utf-16-be", "utf-16-le"])
def test_a1111_parameters_in_jpeg_exif_user_comment(byte_order):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111.encode(byte_order)  # piexif writes BE; others LE
    result = read_evidence(jpeg_bytes(photo(320, 240), exif))
    assert_well_formed(result)
    f = kinds(result)["parameters"]
    assert f["says"] == "ai-generated" and f["fields"]["Sampler"] == "DPM++ 2M"
    assert f["fields"]["where"] == "EXIF UserComment"
    assert "camera" not in {x["says"] for x in result["findings"]}


def test_a1111_parameters_in_webp_exif():
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111.encode("utf-16-be")
    out = io.BytesIO()
    photo(320, 240).save(out, "WEBP", exif=exif.tobytes())
    result = read_evidence(out.getvalue())
    assert result["format"] == "webp" and kinds(result)["parameters"]["says"] == "ai-generated"


COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                               "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
COMFY_WORKFLOW = {"last_node_id": 9, "nodes": [
    {"id": 3, "type": "KSampler", "widgets_values": [5, "fixed", 20, 8, "euler", "normal", 1]},
    {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sd_xl_base_1.0.safetensors"]},
], "links": [], "version": 0.4}


def test_comfyui_png_prompt_and_workflow_chunks():
    data = png_bytes(photo(320, 240), {"prompt": json.dumps(COMFY_PROMPT), "workflow": json.dumps(COMFY_WORKFLOW)})
    result = read_evidence(data)
    assert_well_formed(result)
    f = kinds(result)["parameters"]
    assert f["says"] == "ai-generated" and f["strong"] is True and f["fields"]["generator"] == "ComfyUI"
    assert "KSampler" in f["fields"]["samplers"] and f["fields"]["models"] == ["sd_xl_base_1.0.safetensors"]
    # Either chunk alone is enough.
    only_workflow = read_evidence(png_bytes(photo(320, 240), {"workflow": json.dumps(COMFY_WORKFLOW)}))
    assert kinds(only_workflow)["parameters"]["fields"]["generator"] == "ComfyUI"
    # A "prompt" chunk that is just text is not ComfyUI.
    assert "parameters" not in kinds(read_evidence(png_bytes(photo(320, 240), {"prompt": "a cat"})))


def test_comfyui_webp_workflow_in_exif_make_is_not_a_camera():
    exif = Image.Exif()
    exif[0x010F] = "workflow:" + json.dumps(COMFY_WORKFLOW)
    exif[0x0110] = "prompt:" + json.dumps(COMFY_PROMPT)
    out = io.BytesIO()
    photo(320, 240).save(out, "WEBP", exif=exif.tobytes())
    result = read_evidence(out.getvalue())
    assert kinds(result)["parameters"]["fields"]["generator"] == "ComfyUI"
    assert result["says"] == "ai-generated" and "camera" not in {f["says"] for f in result["findings"]}


@pytest.mark.parametrize("text, generator", [
    ({"Software": "NovelAI", "Source": "NovelAI Diffusion V4 4F6B3A2C",
      "Comment": json.dumps({"steps": 28, "sampler": "k_euler_ancestral", "scale": 5, "seed": 1})}, "NovelAI"),
    ({"invokeai_metadata": json.dumps({"model": {"name": "juggernaut"}, "steps": 30, "seed": 7,
                                       "scheduler": "euler"})}, "InvokeAI"),
    ({"sd-metadata": json.dumps({"model": "stable diffusion", "app_version": "2.3.5",
                                 "image": {"steps": 50}})}, "InvokeAI"),
    ({"parameters": json.dumps({"Prompt": "a cat", "Steps": 30, "Sampler": "dpmpp_2m_sde_gpu", "Seed": 9,
                                "Base Model": "juggernautXL", "Version": "Fooocus v2.5.5",
                                "metadata_scheme": "fooocus"})}, "Fooocus"),
    ({"Description": "a lighthouse in a storm --ar 3:2 Job ID: 0e5e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"}, "Midjourney"),
])
def test_other_generators_text_chunks(text, generator):
    result = read_evidence(png_bytes(photo(320, 240), text))
    f = kinds(result)["parameters"]
    assert f["fields"]["generator"] == generator and f["says"] == "ai-generated" and f["strong"] is True


def test_midjourney_job_id_in_xmp_description():
    xmp = xmp_packet("http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
                     "sunset over dunes --v 6 Job ID: 11111111-2222-4333-8444-555555555555")
    result = read_evidence(png_bytes(photo(320, 240), itxt={"XML:com.adobe.xmp": xmp}))
    assert kinds(result)["parameters"]["fields"]["generator"] == "Midjourney"
    assert kinds(result)["iptc"]["says"] == "ai-generated"
    # The same in an IPTC-IIM caption (2:120) inside a JPEG's Photoshop APP13 block.
    caption = b"koi pond, ukiyo-e --v 6.1 Job ID: 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    iim = b"\x1c\x02\x78" + struct.pack(">H", len(caption)) + caption
    irb = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(iim)) + iim + b"\x00" * (len(iim) & 1)
    result = read_evidence(insert_jpeg_segment(jpeg_bytes(photo(320, 240)), 0xED, b"Photoshop 3.0\x00" + irb))
    f = kinds(result)["parameters"]
    assert f["fields"]["job_id"] == "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d" and "koi pond" in f["fields"]["prompt"]


# --------------------------------------------------------------------------------------------------- IPTC / XMP


def test_xmp_digital_source_type_in_png_and_jpeg():
    xmp = xmp_packet()
    for data in (png_bytes(photo(320, 240), itxt={"XML:com.adobe.xmp": xmp}),
                 jpeg_bytes(photo(320, 240), xmp=xmp.encode())):
        result = read_evidence(data)
        assert_well_formed(result)
        f = kinds(result)["iptc"]
        assert f["says"] == "ai-generated" and f["strong"] is False
        assert f["fields"]["digital_source_type"] == "trainedAlgorithmicMedia"
        assert result["summary"].startswith("Weak evidence of AI generation: the file's IPTC digital source type")
    element_form = xmp.replace(f" Iptc4xmpExt:DigitalSourceType='{TRAINED}'>", ">").replace(
        "</rdf:Description>", "<Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/"
        "compositeWithTrainedAlgorithmicMedia</Iptc4xmpExt:DigitalSourceType></rdf:Description>")
    f = kinds(read_evidence(png_bytes(photo(320, 240), itxt={"XML:com.adobe.xmp": element_form})))["iptc"]
    assert f["says"] == "ai-edited"
    # The newscode URI alone in a PNG text chunk (no XMP).
    f = kinds(read_evidence(png_bytes(photo(320, 240), {"DigitalSourceType": TRAINED})))["iptc"]
    assert f["says"] == "ai-generated" and f["fields"]["where"] == "PNG tEXt chunk 'DigitalSourceType'"


# -------------------------------------------------------------------------------------------------------- EXIF


def test_camera_exif_is_weak_camera_evidence():
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R5"
    exif[0x0131] = "Firmware Version 1.8.1"
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 10:11:12"
    result = read_evidence(jpeg_bytes(photo(320, 240), exif))
    assert_well_formed(result)
    f = kinds(result)["exif"]
    assert f["says"] == "camera" and f["strong"] is False
    assert f["fields"]["Model"] == "Canon EOS R5" and f["fields"]["DateTimeOriginal"] == "2024:05:01 10:11:12"
    assert result["says"] == "camera" and result["strong"] is False
    assert result["summary"].startswith("Weak camera evidence only") and "not show the image is real" in \
        result["summary"]


def test_exif_software_naming_a_generator_is_weak_ai_evidence():
    exif = Image.Exif()
    exif[0x0131] = "Adobe Firefly"
    f = kinds(read_evidence(jpeg_bytes(photo(320, 240), exif)))["exif"]
    assert f["says"] == "ai-generated" and f["strong"] is False
    exif[0x0131] = "GIMP 2.10.36"
    f = kinds(read_evidence(jpeg_bytes(photo(320, 240), exif)))["exif"]
    assert f["says"] == "none"


def test_camera_exif_next_to_generator_parameters_does_not_win():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "NIKON CORPORATION", "NIKON Z 6"
    im = photo(320, 240)
    out = io.BytesIO()
    im.save(out, "PNG", exif=exif.tobytes(), pnginfo=_info({"parameters": A1111}))
    result = read_evidence(out.getvalue())
    assert result["says"] == "ai-generated" and result["strong"] is True
    assert "camera details" in result["summary"]


def _info(text):
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    return info


# --------------------------------------------------------------------------------------------------- watermark


def _sd_v1(im: Image.Image) -> Image.Image:
    """As the SD v1 reference scripts do: BGR array, 'StableDiffusionV1' bytes, dwtDct."""
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bytes", "StableDiffusionV1".encode())
    bgr = np.ascontiguousarray(np.asarray(im)[:, :, ::-1])
    return Image.fromarray(np.ascontiguousarray(enc.encode(bgr, "dwtDct")[:, :, ::-1]))


def _sdxl(im: Image.Image, float_path: bool = False, rgb: bool = False) -> Image.Image:
    """The SDXL 48-bit mark. ``float_path``: as generative-models (and diffusers since #7013) do it, on the float
    [0, 255] BGR image, then rounded to uint8 by the pipeline's postprocessing; ``rgb``: as diffusers did before
    #7013, handing the encoder the RGB array."""
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bits", watermark.SDXL_BITS)
    arr = np.asarray(im) if rgb else np.asarray(im)[:, :, ::-1]
    arr = np.ascontiguousarray(arr)
    if float_path:
        out = np.clip(np.round(enc.encode(arr.astype(np.float32), "dwtDct")), 0, 255).astype(np.uint8)
    else:
        out = enc.encode(arr, "dwtDct")
    return Image.fromarray(np.ascontiguousarray(out if rgb else out[:, :, ::-1]))


def test_sd_v1_watermark_is_found():
    im = _sd_v1(photo(512, 512, seed=1))
    result = read_evidence(png_bytes(im))
    assert_well_formed(result)
    f = kinds(result)["watermark"]
    assert f["says"] == "ai-generated" and f["strong"] is True
    assert "StableDiffusionV1" in f["detail"] and f["fields"]["marks"][0]["matched"] >= 116  # of 136; 114 needed
    assert result["summary"].startswith("Strong evidence of AI generation: the pixels carry")


def test_sdxl_watermark_is_found_in_the_top_band_only_decode():
    im = _sdxl(photo(1024, 768, seed=2))
    result = read_evidence(png_bytes(im))
    f = kinds(result)["watermark"]
    assert f["says"] == "ai-generated" and "SDXL" in f["detail"]
    assert f["fields"]["marks"][0]["matched"] >= 46
    assert "top 512 rows" in result["checked"]["watermark"]  # 1024 x 512 = the band budget
    # The pipelines' float path: imwatermark's uint8 decoding of the band loses bits here (36 of 48 for this seed,
    # under the 40 needed); decoding in the float space the mark was embedded in recovers it.
    im = _sdxl(photo(1024, 768, seed=2), float_path=True)
    bgr = np.asarray(im)[:512, :, ::-1]
    votes, index = watermark.block_votes(watermark.u_channel(bgr), (768, 1024))
    uint8_bits = watermark.decode_bits(votes, index, 48)
    assert int(np.sum(uint8_bits == np.array(watermark.SDXL_BITS, dtype=bool))) < 40
    f = kinds(read_evidence(png_bytes(im)))["watermark"]
    assert f["fields"]["marks"][0]["matched"] >= 46 and f["fields"]["marks"][0]["space"] == "float"
    # Older diffusers handed the encoder RGB.
    f = kinds(read_evidence(png_bytes(_sdxl(photo(1024, 768, seed=3), float_path=True, rgb=True))))["watermark"]
    assert f["fields"]["marks"][0]["matched"] >= 46 and f["fields"]["marks"][0]["order"] == "RGB passed as BGR"


def test_watermark_decoder_matches_imwatermark_bit_for_bit():
    from imwatermark import WatermarkDecoder

    for im in (_sd_v1(photo(512, 384, seed=3)), photo(400, 300, seed=4)):
        arr = np.asarray(im)
        for order in (arr[:, :, ::-1], arr):  # BGR, and RGB handed over as BGR
            ref = WatermarkDecoder("bits", 136).decode(np.ascontiguousarray(order), "dwtDct")
            votes, index = watermark.block_votes(watermark.u_channel(order), arr.shape[:2])
            assert np.array_equal(watermark.decode_bits(votes, index, 136), np.asarray(ref, dtype=bool))


def test_top_band_decode_equals_full_decode_rows():
    im = photo(640, 1200, seed=5)
    rows = watermark.band_rows(640, 1200)
    assert rows == 816 and rows < 1200
    for fmt, kw in (("png", {}), ("jpeg", {}), ("jpeg", {"progressive": True})):
        out = io.BytesIO()
        im.save(out, fmt.upper(), **kw)
        data = out.getvalue()
        band, _, _ = watermark.load_band(lambda: io.BytesIO(data), fmt, (640, 1200), False)
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert band.shape == (rows, 640, 3) and np.array_equal(band, full[:rows])


def test_no_watermark_and_no_metadata_means_no_findings():
    for data in (png_bytes(photo(512, 512, seed=6)), jpeg_bytes(photo(512, 512, seed=6))):
        result = read_evidence(data)
        assert_well_formed(result)
        assert result["findings"] == [] and result["errors"] == []
        assert result["says"] == "none" and result["strong"] is False
        assert result["summary"] == NOTHING
        assert "none found (absence proves nothing)" in result["checked"]["watermark"]


def test_watermark_decode_limits(monkeypatch):
    # Past MAX_PIXELS nothing is decoded; baseline JPEG and PNG are band-decoded below it; whole-decode formats
    # (progressive JPEG, WebP, ...) stop at 1 MP.
    monkeypatch.setattr(watermark, "MAX_PIXELS", 1_000_000)
    result = read_evidence(png_bytes(Image.new("RGB", (1100, 1000))))
    assert result["checked"]["watermark"].startswith("not checked: 1100x1000 is over") and result["errors"] == []
    monkeypatch.undo()
    big = photo(1200, 1000)
    assert read_evidence(jpeg_bytes(big))["checked"]["watermark"].startswith("checked the top 432 rows")
    assert "progressive JPEG images over 1 MP" in read_evidence(jpeg_bytes(big, progressive=True))["checked"][
        "watermark"]
    out = io.BytesIO()
    big.save(out, "WEBP")
    assert "WEBP images over 1 MP" in read_evidence(out.getvalue())["checked"]["watermark"]
    # Pillow's own limit is honoured too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    result = read_evidence(png_bytes(_sd_v1(photo(512, 512, seed=1))))
    assert "watermark" not in kinds(result) and result["checked"]["watermark"].startswith("not checked")


# ------------------------------------------------------------------------------------------------------ bad input


def _peak_rss_growth_mb(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_empty_and_non_image_input(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for data in (b"", empty, str(empty)):
        result = read_evidence(data)
        assert_well_formed(result)
        assert result["findings"] == [] and "empty file" in result["errors"][0]
        assert "no provenance evidence either way" in result["summary"]
    for junk in (b"%PDF-1.7\n" + b"x" * 5000, bytes(range(256)) * 10, b"\x89PNG"):
        result = read_evidence(junk)
        assert_well_formed(result)
        assert result["findings"] == [] and result["errors"]
    result = read_evidence(tmp_path / "missing.png")
    assert "could not read the file" in result["errors"][0]
    assert "expected bytes or a path" in read_evidence(12345)["errors"][0]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_truncated_metadata_is_reported_not_raised():
    png = png_bytes(photo(320, 240), {"parameters": A1111})
    cut = png.index(b"tEXt") + 40
    result = read_evidence(png[:cut])
    assert_well_formed(result)
    assert any("truncated" in e for e in result["errors"])
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    jpg = jpeg_bytes(photo(320, 240), exif)
    result = read_evidence(jpg[: jpg.index(b"Exif") + 20])
    assert_well_formed(result)
    assert any("truncated" in e for e in result["errors"])
    # EXIF whose IFD points outside the block.
    broken = jpg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + 6 + 8) + b"Exif\x00\x00II*\x00\xff\xff\x00\x00" + jpg[2:]
    assert_well_formed(read_evidence(broken))


def test_jumbf_box_that_lies_about_its_length():
    jumd = struct.pack(">I", 30) + b"jumd" + bytes.fromhex("6332706100110010800000aa00389b71") + b"\x03c2pa\x00"
    box = struct.pack(">I", 0xFFFFFFF0) + b"jumb" + jumd + b"\x00" * 64
    jpg = insert_jpeg_segment(jpeg_bytes(photo(320, 240)), 0xEB, b"JP\x00\x01\x00\x00\x00\x01" + box)
    png = insert_after_ihdr(png_bytes(photo(320, 240)), chunk(b"caBX", box))
    for data in (jpg, png):
        result, growth = _peak_rss_growth_mb(lambda: read_evidence(data))
        assert_well_formed(result)
        assert any("JUMBF box says it holds 4,294,967,280 bytes" in e for e in result["errors"])
        f = kinds(result)["c2pa"]
        assert f["says"] == "none" and f["strong"] is False and f["fields"]["validation"] == "unreadable"
        assert growth < 100
    # A box whose length is fine but whose content is garbage goes to c2pa, which refuses it in words.
    small = struct.pack(">I", 8 + len(jumd) + 16) + b"jumb" + jumd + b"\x00" * 16
    result = read_evidence(insert_jpeg_segment(jpeg_bytes(photo(320, 240)), 0xEB, b"JP\x00\x01\x00\x00\x00\x01"
                                               + small))
    assert_well_formed(result)
    assert kinds(result)["c2pa"]["says"] == "none" and any("C2PA credential unreadable" in e for e in result["errors"])
    # A PNG chunk length that runs past the end of the file.
    lying = png_bytes(photo(320, 240))[:33] + struct.pack(">I", 0x7FFFFFF0) + b"tEXt" + b"parameters\x00Steps: 1"
    result = read_evidence(lying)
    assert_well_formed(result)
    assert any("says it holds 2,147,483,632 bytes" in e for e in result["errors"])


def test_huge_png_text_chunk_is_capped():
    huge = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1\n" + "x" * (50 * 1024 * 1024)
    data = insert_after_ihdr(png_bytes(photo(320, 240)), chunk(b"tEXt", b"parameters\x00" + huge.encode()))
    del huge
    result, growth = _peak_rss_growth_mb(lambda: read_evidence(data))
    assert_well_formed(result)
    assert any("only the first 1,048,576 were kept" in e for e in result["errors"])
    f = kinds(result)["parameters"]
    assert f["says"] == "ai-generated" and len(f["detail"]) <= 2000
    assert len(json.dumps(result)) < 20_000
    assert growth < 60  # the 50 MB chunk is sliced, never copied whole


def test_compressed_text_bomb_is_capped():
    bomb = zlib.compress(b"A" * (200 * 1024 * 1024), 9)  # 200 MB of text in ~200 KB
    data = insert_after_ihdr(png_bytes(photo(320, 240)), chunk(b"zTXt", b"Comment\x00\x00" + bomb))
    result, growth = _peak_rss_growth_mb(lambda: read_evidence(data))
    assert_well_formed(result)
    assert any("only the first 1,048,576 were kept" in e for e in result["errors"])
    assert growth < 60


def test_decompression_bomb_is_not_decoded():
    # A valid PNG header claiming 100,000 x 100,000 pixels (10 gigapixels) with a tiny IDAT.
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    result, growth = _peak_rss_growth_mb(lambda: read_evidence(data))
    assert_well_formed(result)
    assert result["size"] == [100_000, 100_000] and result["checked"]["watermark"].startswith("not checked")
    assert growth < 50


def test_truncated_pixels_are_reported_in_words():
    data = png_bytes(photo(512, 512))
    result = read_evidence(data[: len(data) // 2])
    assert_well_formed(result)
    assert any(e.startswith("watermark: the pixels could not be decoded") for e in result["errors"])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" / "Truncated File Read"
def test_random_corruption_never_raises():
    """A small deterministic fuzz: truncations, flipped bytes and lying 32-bit lengths over files of every walker."""
    import random

    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111.encode("utf-16-be")
    webp = io.BytesIO()
    photo(300, 300).save(webp, "WEBP", exif=exif.tobytes(), xmp=xmp_packet().encode())
    bases = [
        png_bytes(photo(300, 300), {"parameters": A1111, "prompt": json.dumps(COMFY_PROMPT)},
                  itxt={"XML:com.adobe.xmp": xmp_packet()}),
        jpeg_bytes(photo(300, 300), exif, xmp=xmp_packet().encode()),
        webp.getvalue(),
    ]
    rng = random.Random(0)
    for _ in range(150):
        data = bytearray(rng.choice(bases))
        op = rng.random()
        if op < 0.3:
            data = data[: rng.randrange(len(data))]
        elif op < 0.7:
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            at = rng.randrange(len(data))
            data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xf0", b"\x00\x00\x00\x01"])
        result = read_evidence(bytes(data))
        assert_well_formed(result)
        assert not any("reader failed" in e or "could not be walked" in e for e in result["errors"]), result["errors"]


def test_other_formats_and_a_remote_credential_pointer():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "FUJIFILM", "X-T5"
    for fmt in ("TIFF", "GIF", "BMP"):
        out = io.BytesIO()
        photo(300, 280).save(out, fmt, **({"exif": exif.tobytes()} if fmt == "TIFF" else {}))
        result = read_evidence(out.getvalue())
        assert_well_formed(result)
        assert result["format"] == fmt.lower() and result["errors"] == []
        assert result["checked"]["watermark"].startswith("checked the top 280 rows")
        if fmt == "TIFF":
            assert kinds(result)["exif"]["says"] == "camera"
    pointer = xmp_packet("http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture").replace(
        "Iptc4xmpExt:DigitalSourceType=", "xmlns:dcterms='http://purl.org/dc/terms/' "
        "dcterms:provenance='https://cr.example/manifests/abc.c2pa' Iptc4xmpExt:DigitalSourceType=")
    result = read_evidence(jpeg_bytes(photo(320, 240), xmp=pointer.encode()))
    f = kinds(result)["c2pa"]
    assert f["says"] == "none" and f["fields"]["remote_url"] == "https://cr.example/manifests/abc.c2pa"
    assert kinds(result)["iptc"]["says"] == "camera" and result["says"] == "camera" and not result["strong"]


# ------------------------------------------------------------------------------------------------ API and the CLI


def test_strongest_and_strength_rules():
    assert strongest([]) == "none"
    assert strongest([{"says": "camera"}, {"says": "ai-edited"}, {"says": "none"}]) == "ai-edited"
    assert strongest([{"says": "camera"}, {"says": "ai-generated"}, {"says": "ai-edited"}]) == "ai-generated"
    assert evidence.STRONG_KINDS == {"c2pa", "parameters", "watermark"}
    assert not evidence.is_strong({"kind": "exif", "says": "camera", "strong": True})
    assert not evidence.is_strong({"kind": "iptc", "says": "ai-generated", "strong": True})
    assert evidence.is_strong({"kind": "parameters", "says": "ai-generated", "strong": True})


def test_path_input_and_cli(tmp_path, capsys):
    from evidence.__main__ import main

    a = tmp_path / "a.png"
    a.write_bytes(png_bytes(photo(320, 240), {"parameters": A1111}))
    b = tmp_path / "b.png"
    b.write_bytes(png_bytes(photo(320, 240)))
    assert kinds(read_evidence(a))["parameters"]["says"] == "ai-generated"
    assert main([str(a), str(b), "--brief"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["says"] for o in out] == ["ai-generated", "none"] and out[1]["summary"] == NOTHING
    proc = subprocess.run([sys.executable, "-m", "evidence", str(a)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["findings"][0]["kind"] == "parameters"


def test_package_imports_no_model_code(tmp_path):
    """The library needs neither model code nor OpenCV/imwatermark (so no libGL), even after a full read."""
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(_sd_v1(photo(512, 512, seed=1)), {"parameters": A1111}))
    code = (f"import sys, evidence; r = evidence.read_evidence({str(path)!r}); "
            "assert {f['kind'] for f in r['findings']} == {'parameters', 'watermark'}, r; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('hub_models', 'train', 'space', 'torch', 'transformers', 'cv2', 'imwatermark', 'pywt') "
            "or m == 'evidence.__main__'); print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
