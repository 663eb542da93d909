"""Export a feature database (`features.db`) to Neuronpedia's dataset layout.

The layout of Neuronpedia's public exports and of its `utils/neuronpedia-utils` converters (field names as in
its `db_models` dataclasses):

    OUT/{model_id}/{source_id}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one JSON object each
        features/batch-N.jsonl.gz       one Feature per line (stats, logit effects, neighbours, histogram,
                                        decoder vector for steering)
        activations/batch-N.jsonl.gz    one Activation per line: the top and quantile examples (tokens,
                                        per-token values, max, bin)
        explanations/batch-N.jsonl.gz   one Explanation per label (heuristic and LLM labels)

`source_id` is `{layer}-{set}` (e.g. `15-monoscope-res-4k`), as Neuronpedia names sources; batch N holds
features [N * batch_size, (N + 1) * batch_size).
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
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..._io import atomic_write_bytes
from ...errors import MonoscopeError
from ..store import Example, FeatureRecord, FeatureStore, Label
from .report import ExportReport

if TYPE_CHECKING:
    from ...sae import SAE

#: Neuronpedia's short names of hook kinds in source-set ids, and TransformerLens hook names.
_NP_KIND = {"resid_post": "res", "resid_pre": "res-pre", "mlp_out": "mlp", "attn_out": "att"}
DEFAULT_CREATOR_ID = "monoscope"

#: A JSON object as written (values: whatever `json.dumps` takes).
Json = dict[str, object]


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


def _cuid(*parts: object) -> str:
    """A stable 25-character id shaped like Neuronpedia's cuids (lower-case, starting with a letter)."""
    return "c" + hashlib.sha1("/".join(str(p) for p in parts).encode()).hexdigest()[:24]


def _finite(v: object) -> object:
    if isinstance(v, float) and not np.isfinite(v):
        return 0.0
    return v


def _write_gz_jsonl(path: Path, rows: Iterable[Json]) -> int:
    lines = [json.dumps(row, allow_nan=False, default=_finite) for row in rows]
    atomic_write_bytes(path, gzip.compress(("\n".join(lines) + ("\n" if lines else "")).encode(), compresslevel=5))
    return len(lines)


def _write_jsonl(path: Path, row: Json) -> None:
    atomic_write_bytes(path, (json.dumps(row) + "\n").encode())


def _clean(values: list[float]) -> list[float]:
    return [round(float(v), 6) if np.isfinite(v) else 0.0 for v in values]


@dataclass
class _Release:
    """Who and what the export names: Neuronpedia's ids and the creator's."""

    model_id: str
    source_id: str
    set_name: str
    hook: str  # monoscope's hook point, e.g. resid_post.15
    tl_hook: str | None  # TransformerLens's name of it, e.g. blocks.15.hook_resid_post
    created: str
    release: str
    dataset: object  # the corpus spec
    creator_name: str
    creator_id: str

    @property
    def common(self) -> Json:
        return {"modelId": self.model_id, "layer": self.source_id}


def _release(
    store: FeatureStore,
    model_id: str | None,
    source_id: str | None,
    release_id: str | None,
    creator_name: str,
    creator_id: str,
) -> _Release:
    meta = store.meta
    model_id = model_id or _model_id(meta.get("model"))
    source_id = source_id or default_source_id(store)
    match = re.fullmatch(r"(\d+)-(.+)", source_id)
    if not match:
        raise MonoscopeError(
            f"source id {source_id!r} must look like LAYER-SET (e.g. 15-monoscope-res-4k), as Neuronpedia's do"
        )
    hook = str(meta.get("hook_point") or "")
    kind, _, layer = hook.partition(".")
    corpus = meta.get("corpus")
    return _Release(
        model_id=model_id,
        source_id=source_id,
        set_name=match[2],
        hook=hook,
        tl_hook=f"blocks.{layer}.hook_{kind}" if layer else None,
        created=str(meta.get("created") or datetime.now(timezone.utc).isoformat()),
        release=release_id or match[2],
        dataset=corpus.get("spec") if isinstance(corpus, dict) else corpus,
        creator_name=creator_name,
        creator_id=creator_id,
    )


def _write_headers(
    folder: Path, r: _Release, store: FeatureStore, url: str | None, hf_repo_id: str | None, hf_folder_id: str | None
) -> None:
    """release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl."""
    meta = store.meta
    _write_jsonl(
        folder / "release.jsonl",
        {
            "name": r.release,
            "description": f"monoscope SAE {r.source_id} on {r.model_id}",
            "creatorName": r.creator_name,
            "creatorId": r.creator_id,
            "visibility": "PUBLIC",
            "isNewUi": False,
            "featured": False,
            "descriptionShort": f"monoscope {r.set_name}",
            "urls": [url] if url else [],
            "creatorEmail": None,
            "creatorNameShort": r.creator_name,
            "defaultSourceSetName": r.set_name,
            "defaultSourceId": r.source_id,
            "defaultUmapSourceIds": [],
            "createdAt": r.created,
        },
    )
    _write_jsonl(
        folder / "model.jsonl",
        {
            "id": r.model_id,
            "instruct": bool(re.search(r"(-it|instruct|chat)$", r.model_id)),
            "creatorId": r.creator_id,
            "displayNameShort": r.model_id,
            "displayName": str(meta.get("model") or r.model_id),
            "tlensId": None,
            "dimension": meta.get("d_in"),
            "visibility": "PUBLIC",
            "defaultSourceSetName": r.set_name,
            "defaultSourceId": r.source_id,
            "inferenceEnabled": False,
            "layers": 0,
            "neuronsPerLayer": 0,
            "createdAt": r.created,
            "owner": r.creator_name,
            "updatedAt": r.created,
            "website": None,
        },
    )
    _write_jsonl(
        folder / "sourceset.jsonl",
        {
            "modelId": r.model_id,
            "name": r.set_name,
            "creatorId": r.creator_id,
            "createdAt": r.created,
            "creatorName": r.creator_name,
            "releaseName": r.release,
            "description": f"{r.hook or 'unknown hook'} - {_width_text(store.n_features)} (monoscope)",
            "visibility": "PUBLIC",
        },
    )
    _write_jsonl(
        folder / "source.jsonl",
        {
            "id": r.source_id,
            "modelId": r.model_id,
            "setName": r.set_name,
            "creatorId": r.creator_id,
            "hasDashboards": True,
            "inferenceEnabled": False,
            "inferenceHosts": [],
            "saelensConfig": None,
            "saelensRelease": None,
            "saelensSaeId": None,
            "hfRepoId": hf_repo_id,
            "hfFolderId": hf_folder_id,
            "visibility": "PUBLIC",
            "defaultOfModelId": None,
            "hasUmap": False,
            "hasUmapLogSparsity": False,
            "hasUmapClusters": False,
            "num_prompts": meta.get("contexts_analysed"),
            "num_tokens_in_prompt": meta.get("context_size"),
            "dataset": r.dataset,
            "notes": "exported by monoscope",
            "createdAt": r.created,
        },
    )


def _decoder_vectors(sae: SAE | None, store: FeatureStore) -> np.ndarray | None:
    if sae is None:
        return None
    if sae.cfg.d_sae != store.n_features:
        raise MonoscopeError(
            f"the SAE has {sae.cfg.d_sae} features but the database {store.n_features}; pass the SAE it was built from"
        )
    return sae.W_dec.detach().float().cpu().numpy()


def _feature_json(r: _Release, store: FeatureStore, record: FeatureRecord, vectors: np.ndarray | None) -> Json:
    """One Feature: statistics, logit effects, neighbours, the activation histogram and the steering vector."""
    fid = record.id
    effects = store.logit_effects(fid)
    neighbours = store.neighbours(fid)
    edges, counts = store.histogram(fid)
    centres = [
        float(np.sqrt(edges[i] * edges[i + 1])) if edges[i] > 0 else float(edges[i + 1]) / 2 for i in range(len(counts))
    ]
    return {
        **r.common,
        "index": str(fid),
        "creatorId": r.creator_id,
        "createdAt": r.created,
        "maxActApprox": _finite(float(record.max_activation)),
        "hasVector": vectors is not None,
        "vector": _clean(vectors[fid].tolist()) if vectors is not None else [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": _finite(float(record.max_activation)) if vectors is not None else 10,
        "hookName": r.tl_hook if vectors is not None else None,
        "topkCosSimIndices": [n.id for n in neighbours],
        "topkCosSimValues": _clean([n.cosine for n in neighbours]),
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": [e.token for e in effects["down"]],
        "neg_values": _clean([e.value for e in effects["down"]]),
        "pos_str": [e.token for e in effects["up"]],
        "pos_values": _clean([e.value for e in effects["up"]]),
        "frac_nonzero": _finite(float(record.density)),
        "freq_hist_data_bar_heights": [int(c) for c in counts],
        "freq_hist_data_bar_values": _clean(centres),
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }


def _activation_jsons(r: _Release, record: FeatureRecord, examples: list[Example]) -> list[Json]:
    """One Activation per top and quantile example (random, non-activating ones are left out); a quantile
    example's bin spans the values of its bin's examples, a top example's [-1, the feature's max]."""
    fid = record.id
    shown = [e for e in examples if e.kind in ("top", "quantile")]
    by_bin: dict[int, list[float]] = {}
    for e in shown:
        if e.kind == "quantile" and e.bin is not None:
            by_bin.setdefault(e.bin, []).append(e.max_activation)
    out: list[Json] = []
    for e in shown:
        values = _clean(e.activations)
        peak = int(np.argmax(values)) if values else 0
        if e.kind == "top":
            bin_min, bin_max = -1.0, float(record.max_activation)
        else:
            acts = by_bin.get(e.bin if e.bin is not None else -1, [e.max_activation])
            bin_min, bin_max = float(min(acts)), float(max(acts))
        out.append(
            {
                "id": _cuid(r.model_id, r.source_id, fid, e.kind, e.rank),
                "tokens": e.tokens,
                **r.common,
                "index": str(fid),
                "maxValue": max(values) if values else 0.0,
                "maxValueTokenIndex": peak,
                "minValue": min(values) if values else 0.0,
                "values": values,
                "creatorId": r.creator_id,
                "dataSource": r.dataset,
                "dataIndex": str(e.context),
                "dfaValues": [],
                "dfaTargetIndex": None,
                "dfaMaxValue": None,
                "createdAt": r.created,
                "lossValues": [],
                "logitContributions": None,
                "binMin": _finite(bin_min),
                "binMax": _finite(bin_max),
                "binContains": None,
                "qualifyingTokenIndex": peak,
            }
        )
    return out


def _explanation_json(r: _Release, label: Label) -> Json:
    """One Explanation: a label, typed by its source ('heuristic', 'llm:MODEL', 'human'), its scores as notes."""
    scores = {
        k: v
        for k, v in (("detection", label.detection), ("fuzzing", label.fuzzing), ("embedding", label.embedding_score))
        if v is not None
    }
    return {
        "id": _cuid(r.model_id, r.source_id, label.feature_id, "label", label.id),
        **r.common,
        "index": str(label.feature_id),
        "description": label.text,
        "authorId": r.creator_id,
        "embedding": None,
        "triggeredById": None,
        "typeName": label.source.split(":", 1)[0],
        "explanationModelName": label.source.split(":", 1)[1] if ":" in label.source else label.source,
        "notes": json.dumps(scores) if scores else None,
        "createdAt": label.created,
    }


def export_neuronpedia(
    store: FeatureStore,
    out_dir: str | os.PathLike,
    *,
    model_id: str | None = None,
    source_id: str | None = None,
    sae: SAE | None = None,
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
    r = _release(store, model_id, source_id, release_id, creator_name, creator_id)
    folder = Path(out_dir) / r.model_id / r.source_id
    for sub in ("features", "activations", "explanations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    _write_headers(folder, r, store, url, hf_repo_id, hf_folder_id)
    vectors = _decoder_vectors(sae if include_vectors else None, store)
    n_feat = n_act = n_expl = files = 0
    for batch_index, lo in enumerate(range(0, store.n_features, batch_size)):
        features: list[Json] = []
        activations: list[Json] = []
        explanations: list[Json] = []
        for record in store.features(range(lo, min(lo + batch_size, store.n_features))):
            features.append(_feature_json(r, store, record, vectors))
            activations.extend(_activation_jsons(r, record, store.examples(record.id, None)))
            explanations.extend(_explanation_json(r, label) for label in store.labels(record.id))
        name = f"batch-{batch_index}.jsonl.gz"
        n_feat += _write_gz_jsonl(folder / "features" / name, features)
        n_act += _write_gz_jsonl(folder / "activations" / name, activations)
        n_expl += _write_gz_jsonl(folder / "explanations" / name, explanations)
        files += 3
    return ExportReport(folder, n_feat, n_act, n_expl, files + 4)
