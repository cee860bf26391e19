"""Generator parameters: the settings an image generator writes next to the pixels.

Recognised (each one finding, ``says`` ``ai-generated``, or ``ai-edited`` for an A1111 inpainting run):

* **AUTOMATIC1111 / Forge / SD.Next** text: PNG text ``parameters``, or the same text in EXIF UserComment (JPEG, WebP)
  or a JPEG comment. Its last line reads ``Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: ..., Model: ...``.
* **ComfyUI**: PNG text ``prompt`` (the API graph: nodes with ``class_type``) and/or ``workflow`` (the editor graph,
  ``nodes``); in WebP it writes them into EXIF Make/Model as ``workflow:{...}`` / ``prompt:{...}``.
* **NovelAI**: PNG text ``Software: NovelAI`` with a ``Comment`` JSON (steps, sampler, seed...) and ``Source``.
* **InvokeAI**: ``invokeai_metadata`` / ``invokeai_graph`` (JSON), older ``sd-metadata`` (JSON) and ``Dream``.
* **Fooocus / SwarmUI / other JSON ``parameters``**: a JSON object with generator keys (steps, sampler, seed, cfg...).
* **Easy Diffusion**: PNG text keys such as ``use_stable_diffusion_model`` and ``num_inference_steps``.
* **Midjourney**: a ``Job ID: <uuid>`` in a PNG ``Description``, XMP ``dc:description`` or IPTC caption.

Strong as a claim (cameras and photo editors never write these), but only a claim: anyone can add, copy, edit or strip
such text, and most sites strip it on upload. Text is capped at 1 MiB per value when read and at 2000 characters in
``detail``.
"""

from __future__ import annotations

import json
import re

from ._container import Text

DETAIL_CHARS = 2000
# AUTOMATIC1111's own pattern for "key: value" pairs on the parameters line (modules/infotext_utils.py: re_param).
_RE_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_STEPS = re.compile(r"(?m)^\s*Steps: *\d+")
_RE_JOB_ID = re.compile(r"Job ID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", re.I)
_GEN_KEYS = {"steps", "sampler", "sampler_name", "cfg", "cfg_scale", "guidance_scale", "scheduler", "seed",
             "base_model", "model", "negative_prompt", "prompt", "denoising_strength", "num_inference_steps"}


def _short(text: str, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(text: Text):
    if text.truncated:
        return None
    try:
        return json.loads(text.value)
    except (ValueError, RecursionError):
        return None


def _finding(generator: str, where: str, summary: str, fields: dict, says: str = "ai-generated") -> dict:
    return {
        "kind": "parameters",
        "says": says,
        "detail": _short(f"{where}: {generator} generation settings ({summary})."),
        "strong": True,
        "fields": {"generator": generator, "where": where, **fields},
    }


def a1111(text: Text) -> dict | None:
    value = text.value
    m = _RE_STEPS.search(value)
    if not m or not re.search(r"\b(Sampler|CFG scale|Seed|Size|Model hash):", value):
        return None
    head, line = value[: m.start()], value[m.start() :].split("\n", 1)[0]
    params = {k.strip(): v.strip().strip('"') for k, v in _RE_PARAM.findall(line) if k.strip()}
    prompt, _, negative = head.partition("Negative prompt:")
    keep = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Model hash", "Version",
            "Denoising strength", "Mask blur")
    fields = {k: params[k][:200] for k in keep if k in params}
    version = params.get("Version", "")
    generator = "Forge" if version.startswith("f") else "AUTOMATIC1111-style web UI"
    inpaint = any(k in params for k in ("Mask blur", "Inpaint area", "Masked content", "Mask mode"))
    fields["prompt"] = _short(prompt.strip(), 500)
    summary = ", ".join(f"{k}: {fields[k]}" for k in ("Steps", "Sampler", "CFG scale", "Seed", "Model") if k in fields)
    says = "ai-edited" if inpaint else "ai-generated"
    if inpaint:
        summary += "; inpainting: part of an existing image was regenerated"
    if fields["prompt"]:
        summary += f'; prompt: "{_short(fields["prompt"], 300)}"'
    return _finding(generator, text.where, summary, fields, says)


def _comfy_nodes(prompt_graph, workflow) -> tuple[list[str], list[str]]:
    classes: list[str] = []
    models: list[str] = []
    if isinstance(prompt_graph, dict):
        for node in prompt_graph.values():
            if isinstance(node, dict) and isinstance(node.get("class_type"), str):
                classes.append(node["class_type"])
                inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
                for key in ("ckpt_name", "unet_name", "model_name", "lora_name"):
                    if isinstance(inputs.get(key), str):
                        models.append(inputs[key])
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list):
        for node in workflow["nodes"]:
            if isinstance(node, dict) and isinstance(node.get("type"), str):
                classes.append(node["type"])
                wv = node.get("widgets_values")
                if node["type"].startswith(("CheckpointLoader", "UNETLoader", "LoraLoader")) and isinstance(wv, list):
                    models += [v for v in wv[:1] if isinstance(v, str)]
    return classes, models


def comfyui(texts: dict[str, Text]) -> dict | None:
    prompt, workflow = texts.get("prompt"), texts.get("workflow")
    if prompt is None and workflow is None:
        return None
    graph = _json(prompt) if prompt else None
    flow = _json(workflow) if workflow else None
    classes, models = _comfy_nodes(graph, flow)
    looks = bool(classes) or any(
        t is not None and t.truncated and ('"class_type"' in t.value or '"nodes"' in t.value)
        for t in (prompt, workflow)
    )
    if not looks:
        return None
    samplers = sorted({c for c in classes if "Sampler" in c})
    where = " and ".join(t.where for t in (prompt, workflow) if t is not None)
    summary = f"{len(classes)} graph nodes" if classes else "graph too large to parse whole"
    if samplers:
        summary += f", samplers: {', '.join(samplers[:5])}"
    if models:
        summary += f", models: {', '.join(dict.fromkeys(models[:5]))}"
    return _finding("ComfyUI", where, summary, {"nodes": len(classes), "samplers": samplers[:10],
                                                 "models": list(dict.fromkeys(models))[:10]})


def novelai(texts: dict[str, Text]) -> dict | None:
    software = texts.get("Software")
    if software is None or "novelai" not in software.value.lower():
        return None
    comment = _json(texts["Comment"]) if "Comment" in texts else None
    fields = {}
    if isinstance(comment, dict):
        for k in ("steps", "sampler", "scale", "seed", "width", "height"):
            if isinstance(comment.get(k), (int, float, str)):
                fields[k] = str(comment[k])[:100]
    if "Source" in texts:
        fields["source"] = texts["Source"].value[:200]
    if not fields:
        return None  # a bare "Software: NovelAI" is left to the exif reader (weak)
    summary = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return _finding("NovelAI", software.where + (" and 'Comment'" if comment else ""), summary, fields)


def invokeai(texts: dict[str, Text]) -> dict | None:
    for key in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream"):
        if key not in texts:
            continue
        text = texts[key]
        data = _json(text) if key != "Dream" else None
        fields = {}
        if isinstance(data, dict):
            model = data.get("model")
            if isinstance(model, dict):
                model = model.get("name") or model.get("model_name")
            for k, v in (("model", model), ("steps", data.get("steps")), ("seed", data.get("seed")),
                         ("scheduler", data.get("scheduler")), ("app_version", data.get("app_version"))):
                if isinstance(v, (str, int, float)):
                    fields[k] = str(v)[:200]
        elif key == "Dream" and not re.search(r"\s-s\s*\d+|\s-S\s*\d+", text.value):
            continue
        elif key != "Dream" and not text.truncated:
            continue
        summary = ", ".join(f"{k}: {v}" for k, v in fields.items()) or _short(text.value, 300)
        return _finding("InvokeAI", text.where, summary, fields)
    return None


def json_parameters(text: Text) -> dict | None:
    data = _json(text)
    if not isinstance(data, dict):
        return None
    generator = "generator (JSON parameters)"
    if isinstance(data.get("sui_image_params"), dict):
        data, generator = data["sui_image_params"], "SwarmUI"
    elif str(data.get("metadata_scheme", "")).lower() == "fooocus" or "Fooocus" in str(data.get("version", "")):
        generator = "Fooocus"
    lowered = {str(k).lower().replace(" ", "_"): v for k, v in data.items()}
    hits = _GEN_KEYS & set(lowered)
    if len(hits) < 2 or not hits & {"steps", "sampler", "sampler_name", "cfg", "cfg_scale", "guidance_scale", "seed",
                                     "num_inference_steps", "scheduler"}:
        return None
    fields = {k: str(lowered[k])[:200] for k in sorted(hits) if isinstance(lowered[k], (str, int, float))}
    summary = ", ".join(f"{k}: {v}" for k, v in fields.items() if k not in ("prompt", "negative_prompt"))
    return _finding(generator, text.where, summary, fields)


def easy_diffusion(texts: dict[str, Text]) -> dict | None:
    keys = {"use_stable_diffusion_model", "num_inference_steps", "guidance_scale", "sampler_name", "seed"}
    hits = keys & set(texts)
    if "use_stable_diffusion_model" not in hits and len(hits) < 3:
        return None
    fields = {k: texts[k].value[:200] for k in sorted(hits)}
    where = "PNG text chunks " + ", ".join(repr(k) for k in sorted(hits))
    return _finding("Easy Diffusion-style text chunks", where, ", ".join(f"{k}: {v}" for k, v in fields.items()),
                    fields)


def midjourney(texts: list[Text]) -> dict | None:
    for text in texts:
        m = _RE_JOB_ID.search(text.value)
        if m:
            prompt = text.value[: m.start()].strip()
            summary = f"Job ID {m.group(1)}" + (f'; prompt: "{_short(prompt, 300)}"' if prompt else "")
            return _finding("Midjourney", text.where, summary, {"job_id": m.group(1), "prompt": _short(prompt, 500)})
    return None


def read(texts: list[Text], described: list[Text]) -> list[dict]:
    """Findings from the file's text values (``texts``: PNG text chunks, JPEG comments, generator text in EXIF) and
    its descriptions (``described``: XMP dc:description, IPTC caption), which are searched for a Midjourney Job ID."""
    by_key: dict[str, Text] = {}
    for t in texts:
        by_key.setdefault(t.key, t)
    found: list[dict] = []
    seen_a1111 = False
    for t in texts:
        if t.key in ("parameters", "UserComment", "comment", "ImageDescription", "XPComment", "Comment"):
            f = a1111(t)
            if f and not seen_a1111:
                found.append(f)
                seen_a1111 = True
                continue
        if t.key == "parameters" and not seen_a1111:
            f = json_parameters(t)
            if f:
                found.append(f)
                seen_a1111 = True
    for reader in (comfyui, novelai, invokeai, easy_diffusion):
        f = reader(by_key)
        if f:
            found.append(f)
    mj = midjourney([t for t in texts if t.key in ("Description", "ImageDescription", "comment", "Comment")]
                    + described)
    if mj:
        found.append(mj)
    return found
