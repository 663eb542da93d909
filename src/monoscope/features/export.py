"""Export a feature database (`features.db`) to Neuronpedia's dataset layout and to Parquet tables.

Neuronpedia (`export_neuronpedia`) — the layout of Neuronpedia's public exports and of its
`utils/neuronpedia-utils` converters (field names as in its `db_models` dataclasses):

    OUT/{model_id}/{source_id}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one JSON object each
        features/batch-N.jsonl.gz       one Feature per line (stats, logit effects, neighbours, histogram,
                                        decoder vector for steering)
        activations/batch-N.jsonl.gz    one Activation per line: the top and quantile examples (tokens,
                                        per-token values, max, bin)
        explanations/batch-N.jsonl.gz   one Explanation per label (heuristic and LLM labels)

`source_id` is `{layer}-{set}` (e.g. `15-monoscope-res-4k`), as Neuronpedia names sources; batch N holds
features [N * batch_size, (N + 1) * batch_size).

Parquet (`export_parquet`): `features.parquet` (statistics, shown label, map position), `examples.parquet`
(one row per stored example, tokens and activations as lists), `labels.parquet`, `logit_effects.parquet`,
`neighbours.parquet`, and `meta.json` (the database's meta table).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .._io import atomic_write_bytes, atomic_write_json
from ..errors import MonoscopeError
from .store import FeatureStore

#: Neuronpedia's short names of hook kinds in source-set ids, and TransformerLens hook names.
_NP_KIND = {"resid_post": "res", "resid_pre": "res-pre", "mlp_out": "mlp", "attn_out": "att"}
DEFAULT_CREATOR_ID = "monoscope"


@dataclass
class ExportReport:
    folder: Path
    features: int
    activations: int
    explanations: int
    files: int

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "features": self.features, "activations": self.activations,
                "explanations": self.explanations, "files": self.files}


def _width_text(n: int) -> str:
    for unit, size in (("m", 2**20), ("k", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _model_id(name: str | None) -> str:
    if not name:
        return "unknown-model"
    return re.sub(r"[^a-z0-9.-]+", "-", str(name).rstrip("/").split("/")[-1].lower()).strip("-")


def default_source_id(store: FeatureStore) -> str:
    hook = str(store.meta.get("hook_point") or "resid_post.0")
    kind, _, layer = hook.partition(".")
    return f"{layer or 0}-monoscope-{_NP_KIND.get(kind, kind)}-{_width_text(store.n_features)}"


def _cuid(*parts: Any) -> str:
    """A stable 25-character id shaped like Neuronpedia's cuids (lower-case, starting with a letter)."""
    return "c" + hashlib.sha1("/".join(str(p) for p in parts).encode()).hexdigest()[:24]


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return 0.0
    return v


def _write_gz_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(row, allow_nan=False, default=_finite) for row in rows]
    atomic_write_bytes(path, gzip.compress(("\n".join(lines) + ("\n" if lines else "")).encode(), compresslevel=5))
    return len(lines)


def _clean(values: list[float]) -> list[float]:
    return [round(float(v), 6) if np.isfinite(v) else 0.0 for v in values]


def export_neuronpedia(
    store: FeatureStore,
    out_dir: str | os.PathLike,
    *,
    model_id: str | None = None,
    source_id: str | None = None,
    sae: Any = None,
    batch_size: int = 128,
    release_id: str | None = None,
    creator_name: str = "monoscope",
    creator_id: str = DEFAULT_CREATOR_ID,
    url: str | None = None,
    hf_repo_id: str | None = None,
    hf_folder_id: str | None = None,
    include_vectors: bool = True,
) -> ExportReport:
    """Write `store` in Neuronpedia's dataset layout under `out_dir/{model_id}/{source_id}/`.

    `sae` (a loaded SAE, optional) adds each feature's decoder row as its steering vector (`vector`,
    `hasVector`, `hookName`, `vectorDefaultSteerStrength` = the max activation seen).
    """
    if batch_size < 1:
        raise MonoscopeError(f"batch size must be positive, got {batch_size}")
    meta = store.meta
    model_id = model_id or _model_id(meta.get("model"))
    source_id = source_id or default_source_id(store)
    match = re.fullmatch(r"(\d+)-(.+)", source_id)
    if not match:
        raise MonoscopeError(f"source id {source_id!r} must look like LAYER-SET (e.g. 15-monoscope-res-4k), as Neuronpedia's do")
    set_name = match[2]
    hook = str(meta.get("hook_point") or "")
    kind, _, layer = hook.partition(".")
    tl_hook = f"blocks.{layer}.hook_{kind}" if layer else None
    folder = Path(out_dir) / model_id / source_id
    for sub in ("features", "activations", "explanations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    created = str(meta.get("created") or datetime.now(timezone.utc).isoformat())
    release = release_id or set_name
    corpus = meta.get("corpus")
    dataset = corpus.get("spec") if isinstance(corpus, dict) else corpus
    atomic_write_bytes(folder / "release.jsonl", (json.dumps({
        "name": release, "description": f"monoscope SAE {source_id} on {model_id}", "creatorName": creator_name,
        "creatorId": creator_id, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
        "descriptionShort": f"monoscope {set_name}", "urls": [url] if url else [], "creatorEmail": None,
        "creatorNameShort": creator_name, "defaultSourceSetName": set_name, "defaultSourceId": source_id,
        "defaultUmapSourceIds": [], "createdAt": created}) + "\n").encode())
    atomic_write_bytes(folder / "model.jsonl", (json.dumps({
        "id": model_id, "instruct": bool(re.search(r"(-it|instruct|chat)$", model_id)), "creatorId": creator_id,
        "displayNameShort": model_id, "displayName": str(meta.get("model") or model_id), "tlensId": None,
        "dimension": meta.get("d_in"), "visibility": "PUBLIC", "defaultSourceSetName": set_name,
        "defaultSourceId": source_id, "inferenceEnabled": False, "layers": 0, "neuronsPerLayer": 0,
        "createdAt": created, "owner": creator_name, "updatedAt": created, "website": None}) + "\n").encode())
    atomic_write_bytes(folder / "sourceset.jsonl", (json.dumps({
        "modelId": model_id, "name": set_name, "creatorId": creator_id, "createdAt": created, "creatorName": creator_name,
        "releaseName": release, "description": f"{hook or 'unknown hook'} - {_width_text(store.n_features)} (monoscope)",
        "visibility": "PUBLIC"}) + "\n").encode())
    atomic_write_bytes(folder / "source.jsonl", (json.dumps({
        "id": source_id, "modelId": model_id, "setName": set_name, "creatorId": creator_id, "hasDashboards": True,
        "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
        "saelensSaeId": None, "hfRepoId": hf_repo_id, "hfFolderId": hf_folder_id, "visibility": "PUBLIC",
        "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
        "num_prompts": meta.get("contexts_analysed"), "num_tokens_in_prompt": meta.get("context_size"),
        "dataset": dataset, "notes": "exported by monoscope", "createdAt": created}) + "\n").encode())

    vectors = None
    if sae is not None and include_vectors:
        if sae.cfg.d_sae != store.n_features:
            raise MonoscopeError(f"the SAE has {sae.cfg.d_sae} features but the database {store.n_features}; pass the SAE it was built from")
        vectors = sae.W_dec.detach().float().cpu().numpy()
    n_feat = n_act = n_expl = files = 0
    common = {"modelId": model_id, "layer": source_id}
    for batch_index, lo in enumerate(range(0, store.n_features, batch_size)):
        ids = list(range(lo, min(lo + batch_size, store.n_features)))
        features, activations, explanations = [], [], []
        for record in store.features(ids):
            fid = record.id
            effects = store.logit_effects(fid)
            neighbours = store.neighbours(fid)
            edges, counts = store.histogram(fid)
            centres = [float(np.sqrt(edges[i] * edges[i + 1])) if edges[i] > 0 else float(edges[i + 1]) / 2 for i in range(len(counts))]
            feature = {
                **common, "index": str(fid), "creatorId": creator_id, "createdAt": created,
                "maxActApprox": _finite(float(record.max_activation)),
                "hasVector": vectors is not None, "vector": _clean(vectors[fid].tolist()) if vectors is not None else [],
                "vectorLabel": None,
                "vectorDefaultSteerStrength": _finite(float(record.max_activation)) if vectors is not None else 10,
                "hookName": tl_hook if vectors is not None else None,
                "topkCosSimIndices": [n.id for n in neighbours], "topkCosSimValues": _clean([n.cosine for n in neighbours]),
                "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
                "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
                "neg_str": [e.token for e in effects["down"]], "neg_values": _clean([e.value for e in effects["down"]]),
                "pos_str": [e.token for e in effects["up"]], "pos_values": _clean([e.value for e in effects["up"]]),
                "frac_nonzero": _finite(float(record.density)),
                "freq_hist_data_bar_heights": [int(c) for c in counts], "freq_hist_data_bar_values": _clean(centres),
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
            }
            features.append(feature)
            examples = [e for e in store.examples(fid, None) if e.kind in ("top", "quantile")]
            by_bin: dict[int, list[float]] = {}
            for e in examples:
                if e.kind == "quantile" and e.bin is not None:
                    by_bin.setdefault(e.bin, []).append(e.max_activation)
            for e in examples:
                values = _clean(e.activations)
                peak = int(np.argmax(values)) if values else 0
                if e.kind == "top":
                    bin_min, bin_max, contains = -1.0, float(record.max_activation), None
                else:
                    acts = by_bin.get(e.bin if e.bin is not None else -1, [e.max_activation])
                    bin_min, bin_max, contains = float(min(acts)), float(max(acts)), None
                activations.append({
                    "id": _cuid(model_id, source_id, fid, e.kind, e.rank), "tokens": e.tokens, **common, "index": str(fid),
                    "maxValue": max(values) if values else 0.0, "maxValueTokenIndex": peak,
                    "minValue": min(values) if values else 0.0, "values": values, "creatorId": creator_id,
                    "dataSource": dataset, "dataIndex": str(e.context), "dfaValues": [], "dfaTargetIndex": None,
                    "dfaMaxValue": None, "createdAt": created, "lossValues": [], "logitContributions": None,
                    "binMin": _finite(bin_min), "binMax": _finite(bin_max), "binContains": contains,
                    "qualifyingTokenIndex": peak,
                })
            for label in store.labels(fid):
                scores = {k: v for k, v in (("detection", label.detection), ("fuzzing", label.fuzzing),
                                            ("embedding", label.embedding_score)) if v is not None}
                explanations.append({
                    "id": _cuid(model_id, source_id, fid, "label", label.id), **common, "index": str(fid),
                    "description": label.text, "authorId": creator_id, "embedding": None, "triggeredById": None,
                    "typeName": label.source.split(":", 1)[0],
                    "explanationModelName": label.source.split(":", 1)[1] if ":" in label.source else label.source,
                    "notes": json.dumps(scores) if scores else None, "createdAt": label.created,
                })
        name = f"batch-{batch_index}.jsonl.gz"
        n_feat += _write_gz_jsonl(folder / "features" / name, features)
        n_act += _write_gz_jsonl(folder / "activations" / name, activations)
        n_expl += _write_gz_jsonl(folder / "explanations" / name, explanations)
        files += 3
    return ExportReport(folder, n_feat, n_act, n_expl, files + 4)


# ---------------------------------------------------------------- Parquet


def _batched(n: int, size: int) -> Iterator[list[int]]:
    for lo in range(0, n, size):
        yield list(range(lo, min(lo + size, n)))


def export_parquet(store: FeatureStore, out_dir: str | os.PathLike, *, batch_size: int = 1024) -> ExportReport:
    """Write the database as Parquet tables in `out_dir` (features, examples, labels, logit_effects, neighbours)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is a dependency
        raise MonoscopeError("Parquet export needs pyarrow: pip install pyarrow") from err
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    schemas = {
        "features": pa.schema([("id", pa.int64()), ("n_active", pa.int64()), ("n_contexts", pa.int64()), ("density", pa.float64()),
                               ("mean_activation", pa.float64()), ("max_activation", pa.float64()), ("std_activation", pa.float64()),
                               ("label", pa.string()), ("label_source", pa.string()), ("x", pa.float64()), ("y", pa.float64())]),
        "examples": pa.schema([("feature_id", pa.int64()), ("kind", pa.string()), ("rank", pa.int32()), ("bin", pa.int32()),
                               ("context", pa.int64()), ("start", pa.int32()), ("peak", pa.int32()), ("max_activation", pa.float32()),
                               ("text", pa.string()), ("tokens", pa.list_(pa.string())), ("token_ids", pa.list_(pa.int32())),
                               ("activations", pa.list_(pa.float32()))]),
        "labels": pa.schema([("id", pa.int64()), ("feature_id", pa.int64()), ("source", pa.string()), ("text", pa.string()),
                             ("detection", pa.float64()), ("fuzzing", pa.float64()), ("embedding_score", pa.float64()),
                             ("created", pa.string())]),
        "logit_effects": pa.schema([("feature_id", pa.int64()), ("direction", pa.string()), ("rank", pa.int32()),
                                    ("token_id", pa.int64()), ("token", pa.string()), ("value", pa.float32())]),
        "neighbours": pa.schema([("feature_id", pa.int64()), ("rank", pa.int32()), ("neighbour_id", pa.int64()), ("cosine", pa.float32())]),
    }
    tmp = {name: folder / f".{name}.parquet.{os.getpid()}.tmp" for name in schemas}
    writers = {name: pq.ParquetWriter(str(tmp[name]), schema, compression="zstd") for name, schema in schemas.items()}
    counts = dict.fromkeys(schemas, 0)
    try:
        for ids in _batched(store.n_features, batch_size):
            rows: dict[str, list[dict[str, Any]]] = {name: [] for name in schemas}
            for r in store.features(ids):
                rows["features"].append({**r.to_dict()})
                for e in store.examples(r.id, None):
                    rows["examples"].append({"feature_id": r.id, "kind": e.kind, "rank": e.rank, "bin": e.bin, "context": e.context,
                                             "start": e.start, "peak": e.peak, "max_activation": e.max_activation, "text": e.text,
                                             "tokens": e.tokens, "token_ids": e.token_ids, "activations": e.activations})
                rows["labels"].extend(label.to_dict() for label in store.labels(r.id))
                for direction, effects in store.logit_effects(r.id).items():
                    rows["logit_effects"].extend({"feature_id": r.id, "direction": direction, "rank": i, "token_id": t.token_id,
                                                  "token": t.token, "value": t.value} for i, t in enumerate(effects))
                rows["neighbours"].extend({"feature_id": r.id, "rank": i, "neighbour_id": n.id, "cosine": n.cosine}
                                          for i, n in enumerate(store.neighbours(r.id)))
            for name, batch in rows.items():
                if batch:
                    writers[name].write_table(pa.Table.from_pylist(batch, schema=schemas[name]))
                    counts[name] += len(batch)
        for w in writers.values():
            w.close()
        for name, path in tmp.items():
            os.replace(path, folder / f"{name}.parquet")
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    atomic_write_json(folder / "meta.json", store.meta)
    return ExportReport(folder, counts["features"], counts["examples"], counts["labels"], len(schemas) + 1)
