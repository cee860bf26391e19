"""Score a folder or a data set of images with the detectors, at scale: ``bayesfake score SOURCE --out OUT.parquet``.

    bayesfake score SOURCE [--detectors a,b] --out results.parquet [--num-samples T] [--adaptive] [--split NAME]
        [--batch-size 128] [--chunk-size 1024] [--no-evidence] [--seed S] [--limit N] [--threads N]
    accelerate launch --multi_gpu --num_processes N -m bayesfake score SOURCE ... --out results.parquet
    torchrun --nproc_per_node N -m bayesfake score SOURCE ... --out results.parquet

(``--multi_gpu`` is Accelerate's torchrun-style launcher; without a GPU each process runs on the CPU and they meet over
gloo. ``accelerate launch --cpu --num_processes N`` starts a single process here: Accelerate 1.x runs several CPU
processes only through mpirun.)

SOURCE is an image folder (searched recursively, files with an image suffix, in sorted order), a ``.parquet`` file, a
Hugging Face ``datasets`` folder (a parquet/arrow/csv/json data set, or one written by ``save_to_disk``) or a Hub data
set id (read with the real ``datasets.load_dataset``, streamed; offline it comes from the local cache). Images are
streamed: a folder is walked with ``os.scandir``, a parquet file is read in record batches, a data set is iterated
with ``streaming=True``; only the current chunk is ever held in memory.

One row per image, keyed by ``key`` (the path relative to the folder, or ``SPLIT/ROW``), with ``index`` (its position
in the stream), ``sha256`` of the image bytes, ``label`` (a data set's label, if it has one), ``error`` (why an image
could not be scored: unreadable files get a row, never a crash), and per detector ``NAME/p_fake`` (mean P(FAKE)),
``NAME/std`` (standard deviation of P(FAKE) over the samples), ``NAME/predictive_entropy``,
``NAME/mutual_information``, ``NAME/expected_entropy``, ``NAME/verdict``, ``NAME/num_samples`` (samples the answer
rests on), ``NAME/in_domain`` and ``NAME/domain_score`` (the detector's domain gate: whether the image is like its
training data, and how unlike it is; null for a detector without a gate); then the file's own provenance evidence
(``evidence.read_evidence``): ``evidence_says``, ``evidence_strong``, ``evidence_summary`` (``--no-evidence`` skips
it); then the one answer over the scored detectors (``hub_models.headline``: detectors outside their domain do not
count, a disagreement is "uncertain"): ``headline`` (one of the four verdicts), ``headline_answered``,
``headline_abstained`` and ``headline_outside`` (lists of detector column names); null for an image no detector
scored.

Each detector runs with its own image processor and its ``config.num_samples`` (``--num-samples`` overrides), seeded
with its ``config.sampling_seed`` (``--seed`` overrides), so results are repeatable and an image gets the same answer
in any batch, on any process.

Crash-safe and resumable: every chunk of ``--chunk-size`` images is written as its own parquet file under
``OUT.parts/`` (written to a temporary name, then renamed), so a kill loses at most the chunk in flight; a rerun with
the same settings skips every key already written, and the end merges the parts with any earlier ``OUT`` into ``OUT``
(sorted by ``index``, one row per key) and removes the parts. Rows written by an older version of this command, before
the domain and headline columns existed, are kept: their ``in_domain`` and ``domain_score`` stay null (not measured)
and their headline is computed from their verdicts, with a warning. The settings record each detector's
``release_version``: a resume with another release of a detector is refused, since its rows would mix two models.
Under ``accelerate launch`` each process scores every N-th image still to do and writes its own parts; the main
process merges after all are done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
DATA_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}
# Per detector, from its domain gate (null for a detector without one).
DOMAIN_FIELDS = (("in_domain", pa.bool_()), ("domain_score", pa.float64()))
# The one answer over the scored detectors (hub_models.headline), per image.
HEADLINE_FIELDS = [pa.field("headline", pa.string()), pa.field("headline_answered", pa.list_(pa.string())),
                   pa.field("headline_abstained", pa.list_(pa.string())),
                   pa.field("headline_outside", pa.list_(pa.string()))]
# Columns an older version of this command did not write; a resumed run keeps those rows (see merge).
ADDED_COLUMNS = ("/in_domain", "/domain_score", *(f.name for f in HEADLINE_FIELDS))
SETTINGS_KEY = b"bayesfake.score"
MERGE_ROWS = 4096


@dataclass
class Record:
    """One image of the stream: ``data`` holds its bytes (None with ``error`` when they could not be read)."""

    index: int
    key: str
    data: bytes | None = None
    error: str | None = None
    label: str | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def _walk(folder: Path, root: Path):
    """Image files under ``folder``, depth first, each directory's entries in sorted order (os.scandir, streamed)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        log.warning("cannot list %s: %s", folder, err)
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), root)
            elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(entry.path)
        except OSError:
            continue


def _has_data_files(folder: Path) -> bool:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return True
    for _, _, files in os.walk(folder):
        if any(Path(name).suffix.lower() in DATA_SUFFIXES for name in files):
            return True
    return False


def source_kind(source: str) -> str:
    """``folder`` (images), ``parquet`` (one file), ``saved`` (``save_to_disk``) or ``datasets`` (folder or Hub id)."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        raise ValueError(f"{source}: a file source must be .parquet (for images, give their folder)")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        return "datasets" if _has_data_files(path) else "folder"
    return "datasets"  # a Hub dataset id


def _image_bytes(value) -> tuple[bytes | None, str | None]:
    """Bytes of a data set's image cell ({"bytes", "path"} or raw bytes), or an error."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes(), None
            except OSError as err:
                return None, f"cannot read {value['path']}: {err}"
    return None, "no image bytes in this row"


def _label_name(value, names) -> str | None:
    if value is None:
        return None
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return str(value)


def _image_column(features) -> str:
    for name, feature in (features or {}).items():
        if type(feature).__name__ == "Image":
            return name
    if features and "image" in features:
        return "image"
    raise ValueError(f"no image column in the data set (columns: {', '.join(features or {}) or 'unknown'})")


def _dataset_rows(source: str, kind: str, split: str | None):
    """(split name, row iterator, image column, label names, number of rows or None) per split, streamed."""
    import datasets

    if kind == "saved":
        loaded = datasets.load_from_disk(source)
    else:
        try:
            loaded = datasets.load_dataset(source, streaming=True)
        except Exception as err:  # noqa: BLE001 - e.g. a Hub id offline: streaming needs the Hub, the cache does not
            if kind != "datasets" or Path(source).exists():
                raise
            log.info("%s: streaming unavailable (%s: %s); reading the local cache (memory-mapped)", source,
                     type(err).__name__, err)
            loaded = datasets.load_dataset(source)
    splits = loaded if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)) else {"train": loaded}
    names = [split] if split else list(splits)
    for name in names:
        if name not in splits:
            raise ValueError(f"{source}: no split {name!r} (splits: {', '.join(splits)})")
        ds = splits[name]
        column = _image_column(ds.features)
        ds = ds.cast_column(column, datasets.Image(decode=False))
        label_feature = (ds.features or {}).get("label")
        label_names = getattr(label_feature, "names", None)
        total = None
        try:
            total = len(ds)
        except TypeError:
            info = getattr(ds, "info", None)
            if info is not None and info.splits and name in info.splits:
                total = info.splits[name].num_examples
        yield name, ds, column, label_names, total


def iter_source(source: str | os.PathLike, split: str | None = None):
    """Stream the images of ``source`` as ``Record`` objects, in a fixed order (see the module docstring)."""
    source = str(source)
    kind = source_kind(source)
    if kind == "folder":
        root = Path(source)
        for index, path in enumerate(_walk(root, root)):
            key = path.relative_to(root).as_posix()
            try:
                yield Record(index, key, data=path.read_bytes())
            except OSError as err:
                yield Record(index, key, error=f"cannot read the file: {err}")
        return
    if kind == "parquet":
        file = pq.ParquetFile(source)
        schema = file.schema_arrow
        column = "image" if "image" in schema.names else next(
            (f.name for f in schema if pa.types.is_struct(f.type) and "bytes" in [c.name for c in f.type]), None)
        if column is None:
            raise ValueError(f"{source}: no image column (columns: {', '.join(schema.names)})")
        columns = [column] + (["label"] if "label" in schema.names else [])
        index = 0
        prefix = split or Path(source).stem
        for batch in file.iter_batches(batch_size=256, columns=columns):
            images = batch.column(column).to_pylist()
            labels = batch.column("label").to_pylist() if "label" in columns else [None] * len(images)
            for value, label in zip(images, labels):
                data, error = _image_bytes(value)
                yield Record(index, f"{prefix}/{index}", data, error, _label_name(label, None))
                index += 1
        return
    index = 0
    for name, ds, column, label_names, _ in _dataset_rows(source, kind, split):
        for row_id, row in enumerate(ds):
            data, error = _image_bytes(row.get(column))
            yield Record(index, f"{name}/{row_id}", data, error, _label_name(row.get("label"), label_names))
            index += 1


def source_size(source: str | os.PathLike, split: str | None = None) -> int | None:
    """How many images ``iter_source`` will yield when that is known without reading them (else None)."""
    source = str(source)
    kind = source_kind(source)
    if kind == "parquet":
        return pq.ParquetFile(source).metadata.num_rows
    if kind in ("datasets", "saved"):
        try:
            sizes = [total for *_, total in _dataset_rows(source, kind, split)]
        except Exception:  # noqa: BLE001 - a size is only for the progress bar
            return None
        return None if any(s is None for s in sizes) else sum(sizes)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Detectors


def network_digest(module) -> str:
    """sha256 of a network's weights (names, dtypes, shapes and values): equal digests, equal networks."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def input_key(processor) -> tuple:
    """What a processor makes of an image: side, normalisation and resampling."""
    return (processor.size, tuple(processor.image_mean), tuple(processor.image_std), str(processor.resample))


class Detector:
    """A loaded detector with its processor and the settings it scores with."""

    def __init__(self, name: str, device, num_samples: int | None, seed: int | None, adaptive: bool):
        import torch

        from hub_models.hub import load_detector

        self.name = name
        self.column = Path(str(name).rstrip("/")).name
        self.model, self.processor = load_detector(name)
        self.model.to(device)
        self.device = device
        self.num_samples = num_samples or self.model.config.num_samples
        self.seed = seed
        self.adaptive = adaptive
        self.version = self.model.config.release_version
        # A gate with its own extractor reads the image resized from the original to its own size; without that
        # input it would judge the small thumbnail (much weaker). None: no gate, or a gate on the model's features.
        self.domain_processor = (self.processor.domain_processor()
                                 if getattr(self.processor, "domain_size", None) is not None else None)
        self.shared_route = self._shared_route()

    def _shared_route(self) -> tuple[str, tuple] | None:
        """Which frozen network's features this detector can take from another detector that computed them on the
        same images: ``("gate", key)`` for a domain gate with its own extractor (passed as ``domain_features``),
        ``("backbone", key)`` for a timm backbone (passed to ``forward_features``). ``key`` names the network's
        weights (a digest of their values) and its input (size, normalisation, resampling), so only identical
        features are shared: the five EfficientNet-Lite0 heads and the three gates' extractors are one ImageNet
        Lite0 at 128 px, which then runs once per image instead of eight times. None: nothing to share."""
        model = self.model
        if model.domain_gate is not None and model.domain_gate.extractor is not None:
            return "gate", (network_digest(model.domain_gate.extractor), input_key(self.domain_processor))
        if hasattr(model.backbone, "model") and not model.backbone_stochastic and not self.adaptive:
            return "backbone", (network_digest(model.backbone.model), input_key(self.processor))
        return None

    def fields(self) -> list[pa.Field]:
        c = self.column
        fields = [pa.field(f"{c}/p_fake", pa.float64()), pa.field(f"{c}/std", pa.float64()),
                  pa.field(f"{c}/predictive_entropy", pa.float64()),
                  pa.field(f"{c}/mutual_information", pa.float64()),
                  pa.field(f"{c}/expected_entropy", pa.float64()), pa.field(f"{c}/verdict", pa.string()),
                  pa.field(f"{c}/num_samples", pa.int32())]
        return fields + [pa.field(f"{c}/{field}", kind) for field, kind in DOMAIN_FIELDS]

    def score(self, images: list, shared: dict | None = None) -> tuple[dict[int, dict], dict[int, str]]:
        """Score decoded PIL images (None entries are skipped): per position its columns, or the error. ``shared``:
        features of frozen networks already computed on these images by other detectors (see ``_shared_route``),
        filled with this detector's own; one dict per batch of images."""
        import torch

        arrays, domain_arrays, positions, errors = [], [], [], {}
        for i, image in enumerate(images):
            if image is None:
                continue
            try:
                array = self.processor.to_rgb_uint8(image)
                if self.domain_processor is not None:
                    domain_arrays.append(self.domain_processor.to_rgb_uint8(image))
                arrays.append(array)
                positions.append(i)
            except ValueError as err:
                errors[i] = f"{self.column}: {err}"
        results: dict[int, dict] = {}
        if not arrays:
            return results, errors

        def normalized(processor, batch):
            return processor.normalize_uint8(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2))

        pixels = normalized(self.processor, arrays)
        domain = normalized(self.domain_processor, domain_arrays) if self.domain_processor is not None else None
        kwargs = dict(num_samples=self.num_samples, seed=self.seed)
        if self.adaptive:
            kwargs["adaptive"] = True
        route, features = self.shared_route, None
        if route is not None and shared is not None:
            slot = (route[1], tuple(positions))  # a gate and a backbone of the same network share too
            if slot not in shared:
                network = self.model.domain_gate.features if route[0] == "gate" else self.model.backbone
                with torch.inference_mode():
                    shared[slot] = network((domain if route[0] == "gate" else pixels).to(self.device))
            features = shared[slot]

        def run(rows):
            with torch.inference_mode():
                if features is not None and route[0] == "backbone":
                    return self.model.forward_features(features[rows], **kwargs)
                extra = ({"domain_features": features[rows]} if features is not None else
                         {} if domain is None else {"domain_pixel_values": domain[rows].to(self.device)})
                return self.model(pixels[rows].to(self.device), **extra, **kwargs)

        try:
            outs = [(positions, run(slice(None)))]
        except Exception:  # noqa: BLE001 - find the image at fault, score the others
            outs = []
            for j, position in enumerate(positions):
                try:
                    outs.append(([position], run(slice(j, j + 1))))
                except Exception as err:  # noqa: BLE001
                    errors[position] = f"{self.column}: {type(err).__name__}: {err}"
        c = self.column
        for where, out in outs:
            verdicts = self.model.verdicts(out)
            probs = out.probs[:, 1].double().cpu().tolist()
            std = out.std[:, 1].double().cpu().tolist()
            pe = out.predictive_entropy.double().cpu().tolist()
            mi = out.mutual_information.double().cpu().tolist()
            ee = out.expected_entropy.double().cpu().tolist()
            used = out.get("num_samples_used")
            used = used.cpu().tolist() if used is not None else [self.num_samples] * len(where)
            extra = {field: None if out.get(field) is None else out.get(field).reshape(len(where), -1)[:, 0].cpu()
                     .tolist() for field, _ in DOMAIN_FIELDS}
            for j, position in enumerate(where):
                row = {f"{c}/p_fake": probs[j], f"{c}/std": std[j], f"{c}/predictive_entropy": pe[j],
                       f"{c}/mutual_information": mi[j], f"{c}/expected_entropy": ee[j],
                       f"{c}/verdict": verdicts[j], f"{c}/num_samples": int(used[j])}
                for field, kind in DOMAIN_FIELDS:
                    value = None if extra[field] is None else extra[field][j]
                    row[f"{c}/{field}"] = None if value is None else bool(value) if kind == pa.bool_() else float(value)
                results[position] = row
        return results, errors


# ----------------------------------------------------------------------------------------------------------------------
# Output: parts, resume, merge


def base_fields(evidence: bool) -> list[pa.Field]:
    fields = [pa.field("index", pa.int64()), pa.field("key", pa.string()), pa.field("sha256", pa.string()),
              pa.field("label", pa.string()), pa.field("error", pa.string())]
    if evidence:
        fields += [pa.field("evidence_says", pa.string()), pa.field("evidence_strong", pa.bool_()),
                   pa.field("evidence_summary", pa.string())]
    return fields


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _check_settings(schema: pa.Schema, settings: dict, where: Path) -> bool:
    """``ValueError`` unless ``where`` was written with ``settings``; True when it was written before the settings
    recorded the detectors' releases (``versions``), which then cannot be checked."""
    found = (schema.metadata or {}).get(SETTINGS_KEY)
    if found is None:
        return False
    earlier = json.loads(found)
    mine = dict(settings)
    unversioned = "versions" not in earlier
    if unversioned:
        mine.pop("versions", None)
    if earlier != mine:
        raise ValueError(f"{where} was written with other settings ({found.decode()}) than this run "
                         f"({json.dumps(settings)}): give another --out, or remove it to start again")
    return unversioned


def headline_columns(verdicts: dict[str, str | None]) -> dict:
    """The headline columns of one row from its detectors' verdicts (column name -> verdict, None where the detector
    did not score the image): ``hub_models.headline`` over those that did; all null when none did."""
    from hub_models.headline import headline

    scored = {name: verdict for name, verdict in verdicts.items() if verdict is not None}
    if not scored:
        return {field.name: None for field in HEADLINE_FIELDS}
    combined = headline(scored)
    return {"headline": combined.verdict, "headline_answered": combined.answered,
            "headline_abstained": combined.abstained, "headline_outside": combined.outside}


def conform(table: pa.Table, schema: pa.Schema, where: Path) -> pa.Table:
    """``table`` (rows of one part or of an earlier OUT) with ``schema``'s columns in its order.

    Rows written by an older version of this command lack the columns added since (``ADDED_COLUMNS``): their
    ``NAME/in_domain`` and ``NAME/domain_score`` become null (not measured: that run reported no domain check), and
    their headline is computed from their verdicts, by the same rule as new rows. Any other missing column is an
    error: the file is not a part of this run."""
    missing = [name for name in schema.names if name not in table.column_names]
    if not missing:
        return table.select(schema.names).cast(schema)
    unknown = [name for name in missing if not name.endswith(ADDED_COLUMNS)]
    if unknown:
        raise ValueError(f"{where} lacks the columns {', '.join(unknown)}: it was not written by this run's settings; "
                         "give another --out, or remove it to start again")
    verdict_columns = [name for name in schema.names if name.endswith("/verdict")]
    headlines = None
    if any(field.name in missing for field in HEADLINE_FIELDS):
        verdicts = {name: table.column(name).to_pylist() for name in verdict_columns}
        headlines = [headline_columns({name.removesuffix("/verdict"): values[i] for name, values in verdicts.items()})
                     for i in range(table.num_rows)]
    for name in missing:
        kind = schema.field(name).type
        values = ([row[name] for row in headlines] if headlines is not None and name in headlines[0]
                  else [None] * table.num_rows)
        table = table.append_column(pa.field(name, kind), pa.array(values, type=kind))
    return table.select(schema.names).cast(schema)


def done_keys(out: Path, settings: dict) -> set[str]:
    """Keys already written to ``out`` or its parts (checking they were written with the same settings)."""
    keys: set[str] = set()
    files = ([out] if out.is_file() else []) + sorted(parts_dir(out).glob("*.parquet"))
    unversioned = []
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as err:  # noqa: BLE001 - parts are renamed into place whole; anything else is not ours
            raise ValueError(f"{file} is not a readable parquet file ({err}); remove it and rerun") from err
        if _check_settings(pf.schema_arrow, settings, file):
            unversioned.append(file)
        for batch in pf.iter_batches(columns=["key"], batch_size=65536):
            keys.update(batch.column(0).to_pylist())
    if unversioned:
        log.warning("%d earlier file(s) (%s) do not record which release of each detector wrote them (an older "
                    "bayesfake score); resuming on the assumption that they are the releases loaded now (%s)",
                    len(unversioned), unversioned[0], json.dumps(settings.get("versions")))
    return keys


def write_part(table: pa.Table, folder: Path, name: str) -> Path:
    """Write ``table`` as ``folder/name`` atomically: a kill leaves the whole file or none of it."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / (name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def merge(out: Path, schema: pa.Schema) -> int:
    """Merge ``out`` (if any) and its parts into ``out``, sorted by index, one row per key; remove the parts.

    Memory stays bounded: only (index, key) of every row is read at once; rows are copied in slices of
    ``MERGE_ROWS`` from the row groups that hold them (a row group is at most one chunk of one process).
    """
    folder = parts_dir(out)
    parts = sorted(folder.glob("*.parquet"))
    if not parts and (not out.is_file() or pq.ParquetFile(out).schema_arrow.names == schema.names):
        return pq.ParquetFile(out).metadata.num_rows if out.is_file() else 0  # nothing new: OUT is merged already
    # (an OUT written by an older version of this command, with nothing new to add, is rewritten with the columns
    # added since: see conform)
    sources = ([out] if out.is_file() else []) + parts
    older = {}  # file -> the columns it lacks (written by an older version of this command): said once per file
    for file in sources:
        pf = pq.ParquetFile(file)
        lacking = [name for name in schema.names if name not in pf.schema_arrow.names]
        if lacking:
            older[file] = (pf.metadata.num_rows, lacking)
    for file, (rows, lacking) in older.items():
        log.warning("%s: %d rows written by an older bayesfake score lack %s; their domain columns are left null (not "
                    "measured) and their headline is computed from their verdicts", file, rows, ", ".join(lacking))
    units = []  # (file, row group)
    entries = []  # (index, unit id, row in unit)
    seen: set[str] = set()
    for file in sources:
        pf = pq.ParquetFile(file)
        for group in range(pf.num_row_groups):
            unit = len(units)
            units.append((file, group))
            table = pf.read_row_group(group, columns=["index", "key"])
            for row, (index, key) in enumerate(zip(table.column(0).to_pylist(), table.column(1).to_pylist())):
                if key in seen:
                    continue
                seen.add(key)
                entries.append((index, unit, row))
    entries.sort()
    tmp = out.with_name(out.name + ".merging")
    cache: dict[int, pa.Table] = {}
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(entries), MERGE_ROWS):
            piece = entries[start:start + MERGE_ROWS]
            needed = {unit for _, unit, _ in piece}
            for unit in list(cache):
                if unit not in needed:
                    del cache[unit]
            for unit in needed - cache.keys():
                file, group = units[unit]
                cache[unit] = conform(pq.ParquetFile(file).read_row_group(group), schema, file)
            order = sorted(needed)
            offsets, offset = {}, 0
            for unit in order:
                offsets[unit] = offset
                offset += cache[unit].num_rows
            combined = pa.concat_tables([cache[unit] for unit in order])
            writer.write_table(combined.take(pa.array([offsets[unit] + row for _, unit, row in piece])))
    os.replace(tmp, out)
    for file in sources:
        if file != out:
            file.unlink(missing_ok=True)
    for leftover in folder.glob("*.tmp"):
        leftover.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return len(entries)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def _decode(record: Record):
    """(PIL image, error) of a record's bytes, decoded once for every detector."""
    from hub_models.image_processing_bayesfake import load_image

    if record.data is None:
        return None, record.error or "no image bytes"
    try:
        image = load_image(record.data)
        image.load()
        return image, None
    except ValueError as err:  # PIL names the in-memory file by its address: drop it, so reruns write the same text
        return None, re.sub(r" object at 0x[0-9a-fA-F]+", " object", str(err))


def _evidence_columns(data: bytes | None) -> dict:
    from evidence import read_evidence

    if data is None:
        return {"evidence_says": None, "evidence_strong": None, "evidence_summary": None}
    found = read_evidence(data)
    return {"evidence_says": found["says"], "evidence_strong": bool(found["strong"]),
            "evidence_summary": found["summary"]}


def score_chunk(records: list[Record], detectors: list[Detector], schema: pa.Schema, evidence: bool,
                batch_size: int) -> pa.Table:
    """The rows of one chunk of records, as a table of ``schema``."""
    rows = []
    decoded = [_decode(r) for r in records]
    for record, (_, error) in zip(records, decoded):
        row = {"index": record.index, "key": record.key, "label": record.label,
               "sha256": hashlib.sha256(record.data).hexdigest() if record.data is not None else None,
               "error": error}
        if evidence:
            row.update(_evidence_columns(record.data))
        rows.append(row)
    images = [image for image, _ in decoded]
    shared = {start: {} for start in range(0, len(images), batch_size)}  # frozen features, per batch of images
    for detector in detectors:
        for start in range(0, len(images), batch_size):
            results, errors = detector.score(images[start:start + batch_size], shared[start])
            for position, columns in results.items():
                rows[start + position].update(columns)
            for position, error in errors.items():
                row = rows[start + position]
                row["error"] = error if not row["error"] else f"{row['error']}; {error}"
    for row in rows:
        row.update(headline_columns({d.column: row.get(f"{d.column}/verdict") for d in detectors}))
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def _state():
    """(rank, world size, barrier, device) from Accelerate when launched by it, else a single process."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from datetime import timedelta

        from accelerate import PartialState

        # gloo on CPU (accelerate picks MULTI_CPU when told cpu=True under a torchrun-style launch), NCCL on GPUs;
        # a long timeout, since a process that finishes its share waits at the barrier for the others.
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        state = PartialState(cpu=cpu, timeout=timedelta(hours=24))
        return state.process_index, state.num_processes, state.wait_for_everyone, state.device
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower()
                          not in ("1", "true", "yes") else "cpu")
    return 0, 1, lambda: None, device


def score(source, out, detectors=None, num_samples: int | None = None, seed: int | None = None,
          adaptive: bool = False, evidence: bool = True, split: str | None = None, batch_size: int = 128,
          chunk_size: int = 1024, limit: int | None = None, threads: int | None = None,
          progress: bool = True) -> dict:
    """Score ``source`` into the parquet file ``out`` (see the module docstring); returns a summary dict.

    Run by several processes (``accelerate launch``), each scores its share and the main process merges.
    """
    import torch

    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    out = Path(out)
    rank, world, barrier, device = _state()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, cores // world))
    try:
        return _score(source, out, detectors, num_samples, seed, adaptive, evidence, split, batch_size, chunk_size,
                      limit, progress, rank, world, barrier, device)
    finally:
        torch.set_num_threads(previous_threads)


def _score(source, out: Path, detectors, num_samples, seed, adaptive, evidence, split, batch_size, chunk_size, limit,
           progress, rank, world, barrier, device) -> dict:
    from tqdm.auto import tqdm

    from hub_models.hub import DEFAULT_REPO_IDS
    names = list(detectors or DEFAULT_REPO_IDS)
    loaded = [Detector(name, device, num_samples, seed, adaptive) for name in names]
    columns = [d.column for d in loaded]
    if len(set(columns)) != len(columns):
        raise ValueError(f"two detectors would write the same columns ({', '.join(columns)}): give each a folder or "
                         "repo id with its own name")
    fields = base_fields(evidence)
    for detector in loaded:
        fields += detector.fields()
    fields += HEADLINE_FIELDS
    where = Path(source).resolve() if Path(source).exists() else source
    settings = {"source": str(where), "split": split, "detectors": [d.column for d in loaded],
                "num_samples": {d.column: d.num_samples for d in loaded}, "seed": seed, "adaptive": adaptive,
                "evidence": evidence, "versions": {d.column: d.version for d in loaded}}
    schema = pa.schema(fields, metadata={SETTINGS_KEY: json.dumps(settings).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_keys(out, settings)
    barrier()  # every process has read what is done before any writes more
    total = source_size(source, split) if progress and rank == 0 else None
    if total is not None and limit is not None:
        total = min(total, limit)
    bar = tqdm(total=total, initial=min(len(skip), total or 0), unit="img",
               desc=f"score (rank {rank}/{world})" if world > 1 else "score",
               disable=not progress or rank != 0, mininterval=1.0, dynamic_ncols=True)
    folder = parts_dir(out)
    token = f"{time.time_ns()}-{os.getpid()}-r{rank}"
    chunk: list[Record] = []
    counts = {"scored": 0, "skipped": len(skip), "errors": 0, "parts": 0}
    remaining = 0
    start = time.perf_counter()

    def flush():
        if not chunk:
            return
        table = score_chunk(chunk, loaded, schema, evidence, batch_size)
        write_part(table, folder, f"part-{token}-{counts['parts']:06d}.parquet")
        counts["parts"] += 1
        counts["scored"] += len(chunk)
        counts["errors"] += sum(e is not None for e in table.column("error").to_pylist())
        chunk.clear()

    for record in iter_source(source, split):
        if limit is not None and record.index >= limit:
            break
        if record.key in skip:
            continue
        mine = remaining % world == rank  # the j-th image still to do goes to process j mod N
        remaining += 1
        bar.update(1)  # rank 0 counts the whole stream; the rate is the images/s of all processes together
        if not mine:
            continue
        chunk.append(record)
        if len(chunk) >= chunk_size:
            flush()
    flush()
    bar.close()
    elapsed = time.perf_counter() - start
    barrier()
    merged = merge(out, schema) if rank == 0 else None
    barrier()
    summary = {**counts, "rank": rank, "world_size": world, "seconds": elapsed, "rows": merged, "out": str(out),
               "images_per_s": counts["scored"] / elapsed if elapsed > 0 else None}
    if rank == 0:
        log.info("scored %d images (%d already done) in %.1f s", counts["scored"], counts["skipped"], elapsed)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bayesfake score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder, .parquet file, datasets folder or Hub dataset id")
    parser.add_argument("--out", required=True, type=Path, help="the results parquet file")
    parser.add_argument("--detectors", help="comma-separated repo ids or folders (default: every released detector)")
    parser.add_argument("--num-samples", type=int, help="T for every detector (default: each one's config)")
    parser.add_argument("--adaptive", action="store_true",
                        help="stop sampling an image once its verdict is settled (model(..., adaptive=True))")
    parser.add_argument("--seed", type=int, help="sampling seed (default: each detector's config.sampling_seed)")
    parser.add_argument("--split", help="score only this split of a data set (default: all splits)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    parser.add_argument("--chunk-size", type=int, default=1024, help="images per part file (what a kill can lose)")
    parser.add_argument("--no-evidence", action="store_true", help="skip reading provenance evidence from the files")
    parser.add_argument("--limit", type=int, help="only the first N images of the stream")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()] if args.detectors else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = score(args.source, args.out, detectors, num_samples=args.num_samples, seed=args.seed,
                    adaptive=args.adaptive, evidence=not args.no_evidence, split=args.split,
                    batch_size=args.batch_size, chunk_size=args.chunk_size, limit=args.limit, threads=args.threads,
                    progress=not args.quiet)
    sys.stderr.write(json.dumps(summary) + "\n")  # one line per process, in one write
    sys.stderr.flush()
    return summary


if __name__ == "__main__":
    main()
