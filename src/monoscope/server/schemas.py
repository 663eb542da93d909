"""The HTTP contract: every request and response body as a pydantic model.

These models are the source of `openapi.json` (the committed contract, see docs/server.md): change a model
here, regenerate the file with `python -m monoscope.server.openapi > src/monoscope/server/openapi.json`,
and the drift test passes again.

The OpenAI-compatible part follows the OpenAI API (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`); monoscope's extension is the `steering` list (and `steering_strength`,
`steering_positions`) in a completion request, which any OpenAI client sends with `extra_body`.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---------------------------------------------------------------- limits (defaults; the server may lower them)

MAX_BODY_BYTES = 1_000_000
MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 256
MAX_STEERING_ITEMS = 64
MAX_STOP = 4
MAX_SCAN_CHARS = 8_000
MAX_EXAMPLE_TEXTS = 16
MAX_VALUE = 1e6

_RELATIVE = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*[xX]\s*")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    """OpenAI request bodies: unknown fields (sent by newer clients) are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- errors


class ErrorDetail(_Model):
    message: str = Field(description="What went wrong and what to do about it, in one line.")
    type: str = Field(
        description="invalid_request_error, authentication_error, not_found_error, server_busy or server_error."
    )
    param: Optional[str] = Field(None, description="The request field at fault, when there is one.")
    code: Optional[str] = Field(
        None, description="A stable machine-readable code, e.g. invalid_json, body_too_large, unknown_feature."
    )


class ErrorResponse(_Model):
    """Every 4xx/5xx answer (the OpenAI error shape)."""

    error: ErrorDetail


# ---------------------------------------------------------------- steering


class SteeringItem(_Model):
    """One equalizer setting: a feature of an SAE (`feature`, `mode`, `value`) or a served steering vector
    (`vector`, `coefficient`)."""

    feature: Optional[int] = Field(None, ge=0, description="Feature id of the SAE (0 to d_sae - 1).")
    mode: Literal["clamp", "add", "multiply", "ablate"] = Field(
        "clamp",
        description="clamp: set the feature to value; add: add value x its decoder direction; multiply: scale it by value; ablate: set it to 0.",
    )
    value: Union[float, str] = Field(
        0.0,
        description='A number in the feature\'s activation units, or a multiple of its max activation such as "8x".',
    )
    sae: Optional[str] = Field(
        None, max_length=200, description="Which served SAE the feature belongs to (default: the first)."
    )
    positions: Optional[Literal["all", "prompt", "generated"]] = Field(
        None, description="Where the edit applies (default: steering_positions)."
    )
    vector: Optional[str] = Field(
        None, max_length=200, description="Id of a served steering vector (GET /api/info lists them)."
    )
    coefficient: float = Field(1.0, ge=-MAX_VALUE, le=MAX_VALUE, description="Multiplier of the steering vector.")

    @field_validator("value")
    @classmethod
    def _value(cls, v: Union[float, str]) -> Union[float, str]:
        if isinstance(v, str):
            if not _RELATIVE.fullmatch(v):
                try:
                    v = float(v)
                except ValueError:
                    raise ValueError(
                        "write a number (4, -2.5) or a multiple of the feature's max activation (8x)"
                    ) from None
            else:
                number = float(v.strip().rstrip("xX"))
                if abs(number) > MAX_VALUE:
                    raise ValueError(f"{number:g}x is beyond +-{MAX_VALUE:g}")
                return v.strip().lower()
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v) or abs(v) > MAX_VALUE):
            raise ValueError(f"value must be a finite number within +-{MAX_VALUE:g}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> "SteeringItem":
        if (self.feature is None) == (self.vector is None):
            raise ValueError(
                "each steering item needs either `feature` (an SAE feature id) or `vector` (a steering vector id), not both"
            )
        return self


class SteeringFields(BaseModel):
    steering: Optional[list[SteeringItem]] = Field(
        None,
        max_length=MAX_STEERING_ITEMS,
        description="monoscope extension: features to clamp/add/multiply/ablate and steering vectors to add while generating. "
        "Empty or absent: plain generation.",
    )
    steering_strength: float = Field(
        1.0, ge=-100.0, le=100.0, description="monoscope extension: global multiplier of every steering edit."
    )
    steering_positions: Literal["all", "prompt", "generated"] = Field(
        "all", description="monoscope extension: where edits apply by default."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (as in vLLM).")


# ---------------------------------------------------------------- OpenAI-compatible


class ContentPart(_Lenient):
    type: str = Field("text", max_length=32)
    text: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS)


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = Field(None, description="Text, or a list of text parts.")

    @field_validator("content")
    @classmethod
    def _length(cls, v: Union[str, list[ContentPart], None]) -> Union[str, list[ContentPart], None]:
        if isinstance(v, str) and len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"a message may hold at most {MAX_PROMPT_CHARS} characters")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = False


class _GenerationFields(_Lenient, SteeringFields):
    model: Optional[str] = Field(
        None, max_length=500, description="The served model id (GET /v1/models); may be left out."
    )
    max_tokens: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="Tokens to generate at most (capped by the server's limit)."
    )
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(
        None, ge=0, le=2**63 - 1, description="Sampling seed: the same seed gives the same tokens."
    )
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = Field(None, description=f"Up to {MAX_STOP} strings that end the completion.")
    n: Optional[int] = Field(None, ge=1, le=1, description="Only 1 is supported.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> Union[str, list[str], None]:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(len(s) > 200 for s in items):
            raise ValueError("stop strings may hold at most 200 characters")
        return v

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else (self.stop or [])) if s]


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="Alias of max_tokens (newer OpenAI clients)."
    )


class CompletionRequest(_GenerationFields):
    prompt: Union[str, list[str]] = Field(..., description="The text to continue (exactly as given: no chat template).")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        items = [v] if isinstance(v, str) else v
        if len(items) != 1:
            raise ValueError("give exactly one prompt")
        if len(items[0]) > MAX_PROMPT_CHARS:
            raise ValueError(f"a prompt may hold at most {MAX_PROMPT_CHARS} characters")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Model):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


class SteeringApplied(_Model):
    """What a steered completion was generated with (monoscope extension of the response)."""

    sae: Optional[str] = None
    edits: list[str] = Field(default_factory=list, description="Each edit as text, e.g. '12=clamp:8x'.")
    strength: float = 1.0


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    steering: Optional[SteeringApplied] = None


class ChatDelta(_Model):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChatDelta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: None = None


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed chat completion (`data: {...}`; the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(_Model):
    index: int = 0
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


class Completion(_Model):
    """A completion, or (streamed) one chunk of it with object `text_completion` too, as OpenAI does."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    steering: Optional[SteeringApplied] = None


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "monoscope"


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- server information


class SAEInfo(_Model):
    id: str = Field(description="Name used in `sae` fields and query parameters.")
    path: str
    hook_point: str
    d_in: int
    d_sae: int
    architecture: str
    k: Optional[int] = None
    has_database: bool = Field(description="Whether a feature database (features.db) is served for it.")
    tokens_analysed: Optional[int] = None
    map_method: Optional[str] = None
    meaning_search: bool = Field(description="Whether search by meaning is available (label embeddings stored).")


class VectorInfo(_Model):
    id: str
    hook_points: list[str]
    model: Optional[str] = None


class Limits(_Model):
    max_body_bytes: int
    max_prompt_chars: int
    max_tokens: int
    context_length: Optional[int]
    max_steering_items: int
    max_queue: int
    max_batch: int = Field(description="Completions decoded together in one batch (more wait for a free row).")


class ServerInfo(_Model):
    name: Literal["monoscope"] = "monoscope"
    version: str
    model: str = Field(description="The served model id (as in /v1/models).")
    model_source: str = Field(description="Where the model was loaded from.")
    ablated_direction: Optional[str] = Field(
        None,
        description="The direction projected out of the residual stream at every layer "
        "(`serve --ablate-direction`), or null.",
    )
    saes: list[SAEInfo]
    vectors: list[VectorInfo]
    limits: Limits
    auth: bool = Field(description="Whether /v1 and /api need an API key (Authorization: Bearer KEY).")


class ServerStats(_Model):
    queued: int = Field(description="Model jobs waiting or running.")
    running: int = Field(description="Completions decoding in the batch now.")
    peak_batch: int = Field(description="The most completions decoded together so far.")
    generations: int = Field(description="Completions finished.")
    cancelled: int = Field(description="Completions stopped because the client went away.")
    failed: int
    tokens_generated: int
    last_cancelled_tokens: Optional[int] = Field(
        None, description="Tokens the last cancelled completion had produced when it stopped."
    )


class Health(_Model):
    status: Literal["ok"] = "ok"


# ---------------------------------------------------------------- features


class FeatureSummary(_Model):
    id: int
    label: Optional[str] = None
    label_source: Optional[str] = None
    density: float = Field(description="Share of analysed tokens it fires on.")
    max_activation: float
    mean_activation: Optional[float] = Field(None, description="Mean over the tokens it fires on.")
    n_active: int
    dead: bool
    x: Optional[float] = None
    y: Optional[float] = None
    sparkline: list[int] = Field(
        default_factory=list, description="Its activation histogram, shortened to at most 32 counts."
    )


class FeatureList(_Model):
    sae: str
    total: int = Field(description="Features of the SAE (d_sae).")
    offset: int
    features: list[FeatureSummary]


class ExampleOut(_Model):
    kind: Literal["top", "quantile", "random"]
    rank: int
    bin: Optional[int] = Field(None, description="Quantile bin (0 = lowest) of quantile examples.")
    tokens: list[str]
    activations: list[float]
    peak: int = Field(description="Index in tokens of the strongest activation.")
    max_activation: float
    text: str


class Histogram(_Model):
    edges: list[float] = Field(description="Bin edges (log-spaced), one more than counts.")
    counts: list[int]


class TokenEffectOut(_Model):
    token: str
    token_id: int
    value: float


class NeighbourOut(_Model):
    id: int
    cosine: float
    label: Optional[str] = None


class LabelOut(_Model):
    id: int
    source: str
    text: str
    detection: Optional[float] = None
    fuzzing: Optional[float] = None
    embedding_score: Optional[float] = None
    created: str


class FeatureDetail(FeatureSummary):
    std_activation: float
    n_contexts: int


class FeatureDashboard(_Model):
    sae: str
    feature: FeatureDetail
    labels: list[LabelOut]
    top_examples: list[ExampleOut]
    quantile_examples: list[ExampleOut]
    histogram: Histogram
    logits_up: list[TokenEffectOut]
    logits_down: list[TokenEffectOut]
    neighbours: list[NeighbourOut]
    tokens_analysed: int


class NeighbourList(_Model):
    sae: str
    feature: int
    neighbours: list[NeighbourOut]


class FamilyMatchOut(_Model):
    id: int
    cosine: float = Field(description="Cosine of the two features' decoder directions.")
    label: Optional[str] = None
    density: Optional[float] = None


class FamilyInSAE(_Model):
    sae: str
    d_sae: int
    matches: list[FamilyMatchOut] = Field(description="Closest features in this SAE, best decoder cosine first.")


class FamilyResponse(_Model):
    sae: str
    feature: int
    across: list[FamilyInSAE] = Field(description="One entry per other served SAE of the same model and hook point.")


class SearchHitOut(_Model):
    id: int
    score: float
    label: Optional[str] = None
    density: float
    max_activation: float
    words_rank: Optional[int] = None
    meaning_rank: Optional[int] = None
    similarity: Optional[float] = None
    examples_rank: Optional[int] = Field(
        None, description="Rank by the cosine of the query and the texts the feature fires on most."
    )
    label_score: Optional[float] = Field(
        None, description="Embedding score of the label (heuristic labels: on held-out examples)."
    )
    sparkline: list[int] = Field(default_factory=list)


class SearchResponse(_Model):
    sae: str
    query: str
    mode: Literal["hybrid", "words", "meaning"] = Field(
        description="The mode used (hybrid falls back to words without label embeddings)."
    )
    hits: list[SearchHitOut]


class ExampleSearchRequest(_Model):
    texts: list[str] = Field(
        ..., min_length=1, max_length=MAX_EXAMPLE_TEXTS, description="Example texts the wanted features fire on."
    )
    contrast: list[str] = Field(
        default_factory=list,
        max_length=MAX_EXAMPLE_TEXTS,
        description="Texts they should not fire on (default: the corpus baseline).",
    )
    sae: Optional[str] = Field(None, max_length=200)
    limit: int = Field(20, ge=1, le=100)

    @field_validator("texts", "contrast")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        if any(len(t) > MAX_SCAN_CHARS for t in v):
            raise ValueError(f"each text may hold at most {MAX_SCAN_CHARS} characters")
        return v


class ExampleSearchHit(_Model):
    id: int
    score: float
    example_mean: float
    baseline_mean: float
    fired_in: float
    label: Optional[str] = None
    density: Optional[float] = None
    sparkline: list[int] = Field(default_factory=list)


class ExampleSearchResponse(_Model):
    sae: str
    hits: list[ExampleSearchHit]


class ScanRequest(_Model):
    text: str = Field(..., min_length=1, max_length=MAX_SCAN_CHARS)
    sae: Optional[str] = Field(None, max_length=200)
    top: int = Field(5, ge=1, le=20, description="Features per token.")
    n_top_features: int = Field(20, ge=1, le=200, description="Strongest features over the whole text.")


class FeatureHitOut(_Model):
    id: int
    activation: float
    fraction: Optional[float] = Field(
        None, description="activation / the feature's max activation in the analysed corpus (needs the database)."
    )
    label: Optional[str] = None


class ScannedToken(_Model):
    position: int
    token: str
    token_id: int
    features: list[FeatureHitOut]


class TopFeatureOut(_Model):
    id: int
    max_activation: float = Field(description="Its strongest activation in this text.")
    n_tokens: int
    position: int
    label: Optional[str] = None
    density: Optional[float] = None
    corpus_max_activation: Optional[float] = Field(
        None, description="Its max activation in the analysed corpus (needs the database)."
    )


class ScanResponse(_Model):
    sae: str
    text: str
    tokens: list[ScannedToken]
    top: list[TopFeatureOut]
    truncated: bool
    notes: list[str]


class MapResponse(_Model):
    """The 2-D feature map, column by column (row i of every list is one feature)."""

    sae: str
    method: Optional[str] = Field(description="umap or pca; null when the analysis made no map.")
    ids: list[int]
    x: list[float]
    y: list[float]
    density: list[float]
    labels: list[Optional[str]]


class AttributionRequest(_Model):
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    target: str = Field(
        ..., min_length=1, max_length=2000, description="The completion whose token(s) to explain, e.g. ' Paris'."
    )
    sae: Optional[str] = Field(None, max_length=200)
    metric: Literal["logit", "logprob"] = "logit"
    top: int = Field(15, ge=1, le=100)
    chat: bool = Field(False, description="Apply the chat template to the prompt.")
    per_token: bool = Field(
        False, description="Attribute every token of the target in turn (at most 32), not just its first."
    )


class FeatureAttributionOut(_Model):
    feature: int
    attribution: float
    activation: float
    last_activation: float
    label: Optional[str] = None


class TokenAttribution(_Model):
    target_token: str
    target_id: int
    logit: float
    logprob: float
    total: float
    error_attribution: float
    features: list[FeatureAttributionOut]


class AttributionResponse(_Model):
    sae: str
    hook_point: str
    prompt: str
    target: str
    metric: str
    tokens: list[TokenAttribution]


class SuggestRequest(_Model):
    concept: str = Field(..., min_length=1, max_length=200, description="What to steer toward, e.g. 'the ocean'.")
    references: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Short texts about the concept (each at most 2,000 characters).",
    )
    sae: Optional[str] = Field(None, max_length=200)
    method: Literal["auto", "features", "vector"] = Field(
        "features",
        description="What may steer: SAE features, a learned vector, or auto (features, "
        "a learned vector when none moves the text).",
    )


class SuggestedFeature(_Model):
    feature: int
    value: float = Field(description="The value to add, in the feature's activation units.")
    multiple: Optional[float] = Field(
        None, description="The same as a multiple of the feature's max activation (the equalizer's `add` value)."
    )
    label: Optional[str] = None


class SuggestResponse(_Model):
    sae: str
    concept: str
    works: bool = Field(
        description="Whether anything tried moved the completions toward the concept at a bounded perplexity."
    )
    kind: Optional[Literal["feature", "group", "contrast", "vector", "diffmean"]] = Field(
        None,
        description="feature, group (learned weights) or contrast (DiffMean's features): `features` are added; vector "
        "(learned) or diffmean: a raw vector, `features` are those it points along.",
    )
    positions: Literal["all", "prompt", "generated"]
    hook_point: str
    features: list[SuggestedFeature] = Field(
        description="The features to add (kind feature or group); for a vector, the SAE features it points along."
    )
    vector_cosines: list[float] = Field(
        default_factory=list, description="For a vector: the cosine of each listed feature's decoder row with it."
    )
    strength: Optional[float] = Field(None, description="Norm of the added vector / the hook's mean activation norm.")
    similarity: Optional[float] = Field(
        None, description="Mean MiniLM cosine of the steered completions with the concept (on suggest's own prompts)."
    )
    unsteered_similarity: Optional[float] = None
    mention_rate: Optional[float] = None
    perplexity_ratio: Optional[float] = Field(
        None, description="Perplexity of the steered completions / the unsteered ones."
    )
    notes: list[str] = Field(default_factory=list)
    seconds: float
