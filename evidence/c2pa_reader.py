"""C2PA content credentials, read and validated with ``c2pa-python`` (import ``c2pa``), offline.

What is read: the active manifest's claim generator, its signer (certificate common name and issuer, signing time),
the validation outcome, and every ``c2pa.actions`` / ``c2pa.actions.v2`` action's ``digitalSourceType``:

* ``.../trainedAlgorithmicMedia`` on ``c2pa.created`` -> ``ai-generated``; on any other action -> ``ai-edited``;
* ``.../compositeWithTrainedAlgorithmicMedia`` -> ``ai-edited``;
* ``digitalCapture`` / ``computationalCapture`` (and film, print) -> ``camera``.

When the active manifest makes no such claim, the other manifests in the store (its ingredients' history) are
searched, and ``detail`` says the claim comes from an earlier step.

Validation decides strength:

* **valid** (c2pa's ``validation_state`` ``Valid`` or ``Trusted``; with older c2pa-python: no failure code other
  than ``signingCredential.untrusted``): the signature checks and the file's bytes hash to what was signed. An AI claim
  is then **strong**. Without trust anchors the signer is not on any trust list (c2pa reports
  ``signingCredential.untrusted``, named in ``detail``): the credential proves the file is unchanged since some key
  signed that claim, not who holds the key; nobody gains much by falsely labelling their own image as AI-made, so an AI
  claim stays strong. A ``camera`` claim is strong only from a **trusted** signer (``read_evidence(...,
  trust_anchors=PEM)``), since a self-made key can sign "captured by a camera" on anything.
* **invalid** (tampered pixels, a forged or transplanted manifest, a broken signature): ``says`` is ``none`` and
  ``strong`` False; ``detail`` starts "C2PA credential FAILED validation", names the failure codes, and says what
  the credential had claimed (also in ``fields["claimed"]``). A credential that no longer matches the file vouches for
  nothing, and one can be grafted onto a real photo to discredit it, so its claim is not counted.
* **unreadable** (a JUMBF box that lies about its length, a truncated store): ``says`` ``none``, and the message goes
  to ``errors`` too.

Network: remote manifests and OCSP are never fetched (``verify.remote_manifest_fetch`` / ``ocsp_fetch`` off). A file
whose XMP only points to a remote credential (``dcterms:provenance``) gets a ``none`` finding that says so.
"""

from __future__ import annotations

import json

from .iptc import SOURCE_SAYS  # C2PA actions use the IPTC digital source type vocabulary

ORDER = ("ai-generated", "ai-edited", "camera", "none")
# Failure codes that do not make a credential invalid for our purpose: an unknown signer is reported, not failed.
NOT_FAILURES = {"signingCredential.untrusted", "signingCredential.ocsp.skipped", "timeStamp.untrusted"}
MAX_MANIFESTS = 64


def _settings(trust_anchors: str | None) -> dict:
    settings = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors:
        settings["trust"] = {"trust_anchors": trust_anchors}
    return settings


def _software(agent) -> str | None:
    if isinstance(agent, dict):
        agent = agent.get("name")
    return str(agent)[:200] if agent else None


def _actions(manifest: dict) -> list[dict]:
    out = []
    for assertion in manifest.get("assertions") or []:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        data = assertion.get("data") or {}
        for action in data.get("actions") or []:
            if not isinstance(action, dict):
                continue
            dst = str(action.get("digitalSourceType") or "")
            code = dst.rstrip("/").rsplit("/", 1)[-1] if dst else ""
            says = SOURCE_SAYS.get(code.lower(), "none")
            name = str(action.get("action") or "")
            if says == "ai-generated" and name != "c2pa.created":
                says = "ai-edited"
            out.append({"action": name, "source_type": code, "says": says,
                        "software": _software(action.get("softwareAgent"))})
    return out


def _claim(actions: list[dict]) -> tuple[str, dict | None]:
    best = min(actions, key=lambda a: ORDER.index(a["says"]), default=None)
    return (best["says"], best) if best else ("none", None)


def _generator(manifest: dict) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict) and info[0].get("name"):
        version = info[0].get("version")
        return f"{info[0]['name']}" + (f" {version}" if version else "")
    gen = manifest.get("claim_generator")
    return str(gen)[:200] if gen else None


def _codes(store: dict) -> tuple[list[str], list[str]]:
    """(failure codes, success codes) of the active manifest."""
    results = store.get("validation_results") or {}
    active = results.get("activeManifest") or {}
    failures = [s.get("code", "") for s in active.get("failure") or [] if isinstance(s, dict)]
    success = [s.get("code", "") for s in active.get("success") or [] if isinstance(s, dict)]
    if not results:  # older c2pa-python: only the flat validation_status list (failures)
        failures = [s.get("code", "") for s in store.get("validation_status") or [] if isinstance(s, dict)]
    return failures, success


def interpret(store: dict) -> dict:
    """A ``c2pa`` finding from the manifest store JSON (``Reader.json()``)."""
    manifests = store.get("manifests") or {}
    label = store.get("active_manifest")
    active = manifests.get(label) if isinstance(manifests, dict) else None
    if not isinstance(active, dict):
        return {"kind": "c2pa", "says": "none", "strong": False,
                "detail": "A C2PA manifest store is present but has no active manifest.",
                "fields": {"validation": "invalid"}}
    failures, success = _codes(store)
    state = store.get("validation_state")
    real_failures = [c for c in failures if c not in NOT_FAILURES]
    if state:
        valid = state in ("Valid", "Trusted") and not real_failures
    else:
        valid = not real_failures
    trusted = state == "Trusted" or "signingCredential.trusted" in success
    sig = active.get("signature_info") or {}
    signer = sig.get("common_name") or sig.get("issuer")
    issuer = sig.get("issuer")
    generator = _generator(active)

    says, action = _claim(_actions(active))
    from_history = None
    if says == "none":
        for other_label, other in list(manifests.items())[:MAX_MANIFESTS]:
            if other_label == label or not isinstance(other, dict):
                continue
            s, a = _claim(_actions(other))
            if ORDER.index(s) < ORDER.index(says):
                says, action, from_history = s, a, other.get("title") or other_label
    words = {
        "ai-generated": "was made by a generative AI model",
        "ai-edited": "was edited with generative AI (composite with AI-generated parts)",
        "camera": "was captured by a camera",
        "none": "makes no AI or camera-capture claim",
    }[says]
    who = f"signed by {signer!r}" + (f" (issuer {issuer!r})" if issuer and issuer != signer else "")
    claim = words
    if action:
        claim += f" (action {action['action']}, digitalSourceType {action['source_type']}"
        claim += f", software {action['software']!r})" if action.get("software") else ")"
    if from_history:
        claim = f"an earlier step in its history ({from_history!r}) {claim}"
    fields = {
        "validation": "trusted" if valid and trusted else "valid" if valid else "invalid",
        "validation_state": state,
        "failures": real_failures[:20],
        "signer": signer,
        "issuer": issuer,
        "signed_at": sig.get("time"),
        "claim_generator": generator,
        "digital_source_type": action["source_type"] if action else None,
        "manifests": len(manifests) if isinstance(manifests, dict) else 0,
    }
    if not valid:
        codes = ", ".join(dict.fromkeys(real_failures or [str(state)]))
        fields["claimed"] = says
        return {
            "kind": "c2pa",
            "says": "none",
            "strong": False,
            "detail": (
                f"C2PA credential FAILED validation ({codes}): the file was changed after signing, or the credential "
                f"was forged or copied from another file. It was {who} and claimed the image {claim}; a credential "
                "that fails validation vouches for nothing about these pixels."
            ),
            "fields": fields,
        }
    trust_words = (
        "the signer chains to a trust anchor you supplied"
        if trusted
        else "the signer's certificate is not on any trust list given to this reader, so the signature proves the "
        "file is unchanged since that key signed it, not who holds the key"
    )
    strong = says in ("ai-generated", "ai-edited") or (says == "camera" and trusted)
    detail = f"Valid C2PA credential {who}" + (f", made with {generator!r}" if generator else "")
    detail += f": it says the image {claim}; {trust_words}."
    return {"kind": "c2pa", "says": says, "strong": strong, "detail": detail, "fields": fields}


def read(stream, mime: str, trust_anchors: str | None = None) -> tuple[dict | None, str | None]:
    """``(finding or None, error message or None)``; ``None, None`` when the file holds no C2PA manifest."""
    try:
        import c2pa
    except ImportError as exc:  # pragma: no cover - c2pa-python is a dependency
        return None, f"C2PA not checked: c2pa-python is not installed ({exc})."
    kwargs = {}
    note = None
    if hasattr(c2pa, "Context"):  # c2pa-python >= 0.29; older ones read with their defaults and no trust anchors
        try:
            kwargs["context"] = c2pa.Context.from_dict(_settings(trust_anchors))
        except Exception as exc:  # e.g. trust anchors that are not PEM certificates
            kwargs["context"] = c2pa.Context.from_dict(_settings(None))
            note = f"C2PA trust anchors refused, read without them: {str(exc)[:200]}"
    try:
        reader = c2pa.Reader(mime, stream, **kwargs)
        try:
            store = json.loads(reader.json())
        finally:
            close = getattr(reader, "close", None)
            if close:
                close()
    except Exception as exc:  # c2pa.C2paError and its subclasses, or anything the native layer raises
        name = type(exc).__name__.lstrip("_")
        if "ManifestNotFound" in name or "JumbfNotFound" in str(exc):
            return None, None
        message = str(exc).strip() or name
        finding = {
            "kind": "c2pa",
            "says": "none",
            "strong": False,
            "detail": f"C2PA data is present but could not be read ({message[:300]}); it vouches for nothing.",
            "fields": {"validation": "unreadable"},
        }
        error = f"C2PA credential unreadable: {message[:300]}"
        return finding, f"{note}; {error}" if note else error
    finally:
        ctx = kwargs.get("context")
        if ctx is not None and hasattr(ctx, "close"):
            ctx.close()
    return interpret(store), note


def malformed(problem: str) -> dict:
    return {
        "kind": "c2pa",
        "says": "none",
        "strong": False,
        "detail": f"C2PA data is present but malformed ({problem}); it was not read and vouches for nothing.",
        "fields": {"validation": "unreadable"},
    }


def remote_pointer(url: str) -> dict:
    return {
        "kind": "c2pa",
        "says": "none",
        "strong": False,
        "detail": (
            f"The file's XMP points to a remote C2PA credential ({url}); it was not fetched (reading is offline), "
            "so it was not checked."
        ),
        "fields": {"validation": "not fetched", "remote_url": url},
    }
