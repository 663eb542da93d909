"""Batched steered decoding with continuous batching: many prompts, each with its own steering, decoded together.

`BatchEngine` keeps one batch of rows and one KV cache. Each `step()` first lets waiting requests join
(prefilled together, left-padded, up to `max_batch` rows and `prefill_tokens` prompt tokens per step), merges
their cache into the batch's (left padding, with a per-row attention mask and position ids), then decodes one
token for every row. A row that finishes (EOS, a stop string, max tokens, cancelled, non-finite logits) leaves
by index selection and the padding no row needs any more is cut away, so rows of any lengths come and go.

Steering per row costs about what one edit set costs: at each hook point, one encoder GEMM per SAE over the
batch's tokens (only rows that edit with that SAE) for the union of the features any row reads, then per-row
gathers of coefficients and masks and one small product per row (`steering.FeatureTable`, the same code that
`steer()` runs for a single spec). Greedy output of a row equals the same request alone.

    from monoscope.steer import Steering, generate_batch
    results = generate_batch(lm, ["Tell me a story.", "Tell me a story."], steerings=[None, Steering(sae).clamp(123, "8x")])

Caches other than plain full-attention layers (sliding windows, linear attention) run one row at a time.
"""

from __future__ import annotations

import inspect
import secrets
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import MonoscopeError
from ..model import HookPoint, edit
from ..model.hooks import EditFn
from .runtime import (
    Generation,
    Prompt,
    SamplingParams,
    context_length,
    decode_text,
    fit_context,
    prompt_token_ids,
    sampling_temperature,
)
from .steering import CompiledSteering, DirectionTable, FeatureTable, Steering, TokenRoles, apply_edits

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..model import LoadedModel
    from .steering import _FeatureGroup

__all__ = ["BatchEngine", "Request", "RowResult", "SamplingParams", "generate_batch"]

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class KVLayer(Protocol):
    """One layer of a plain full-attention KV cache (transformers' `DynamicLayer`): keys and values [B, H, T, D]."""

    keys: Tensor
    values: Tensor


class KVCache(Protocol):
    """What the engine uses of transformers' `DynamicCache`: its layers."""

    layers: list[KVLayer]


# ---------------------------------------------------------------- a request and its result


@dataclass
class Request:
    """One prompt (token ids) to continue, with its steering, sampling, streaming callback and cancel flag."""

    prompt_ids: list[int]
    steering: Steering | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None  # text deltas as they are decided (stop strings held back)
    cancel: threading.Event | None = None


@dataclass
class RowResult:
    text: str
    ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # stop | length | cancelled | error
    error: str | None = None
    error_code: str | None = None  # nonfinite (the steering overflowed), callback (on_text raised), aborted


# ---------------------------------------------------------------- text: incremental decoding and stop strings


def holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


class TextAssembler:
    """The text of one row as tokens arrive: incremental decoding (a window of a few tokens, so a step costs
    the same at token 1000 as at token 1), stop strings cut where they start, deltas handed to `on_text`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.on_text = tokenizer, list(stops), on_text
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the text already taken
        self._read = 0

    @property
    def incremental(self) -> bool:
        return self.on_text is not None or bool(self.stops)

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has been completed (the row ends)."""
        self.ids.append(int(token))
        if not self.incremental:
            return False
        before = decode_text(self.tokenizer, self.ids[self._prefix : self._read])
        now = decode_text(self.tokenizer, self.ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False  # nothing new yet, or half a character: wait for the next token
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._check(final=False)

    def finish(self) -> str:
        """The final text (all of it sent to `on_text`)."""
        if not self.incremental:
            self.text = decode_text(self.tokenizer, self.ids)
            return self.text
        if not self.stopped:
            rest = decode_text(self.tokenizer, self.ids[self._prefix :])
            before = decode_text(self.tokenizer, self.ids[self._prefix : self._read])
            self.text += rest[len(before) :]
            self._check(final=True)
        return self.text

    def _check(self, final: bool) -> bool:
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, final, self.stopped = self.text[:cut], True, True
        upto = len(self.text) if final else len(self.text) - holdback(self.text, self.stops)
        if self.on_text is not None and upto > self.sent:
            self.on_text(self.text[self.sent : upto])
            self.sent = upto
        return self.stopped


# ---------------------------------------------------------------- rows


class Row:
    """A request inside the engine: its compiled steering, random generator, tokens and text so far."""

    def __init__(
        self,
        request: Request,
        compiled: CompiledSteering | None,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        index: int,
    ):
        self.request, self.compiled, self.index = request, compiled, index
        self.params = request.params
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(int(seed)) if self.params.temperature > 0 else None
        self.callback_error: BaseException | None = None
        self.text = TextAssembler(tokenizer, self.params.stop, self._emit if request.on_text is not None else None)
        self.length = 0  # tokens of this row in the KV cache
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.result: RowResult | None = None
        self.on_done: Callable[[RowResult], None] | None = None

    def _emit(self, delta: str) -> None:
        """Hand a delta to the request's callback; a callback that raises ends this row only."""
        if self.callback_error is None and self.request.on_text is not None:
            try:
                self.request.on_text(delta)
            except Exception as err:  # noqa: BLE001 - reported in the row's result
                self.callback_error = err

    @property
    def cancelled(self) -> bool:
        return self.request.cancel is not None and self.request.cancel.is_set()

    @property
    def strength(self) -> float:
        return float(self.request.steering.strength) if self.request.steering is not None else 1.0

    def finish(self, reason: str, error: str | None = None, code: str | None = None) -> RowResult:
        if self.result is not None:
            return self.result
        text = self.text.finish() if reason != "cancelled" else self.text.text
        if self.callback_error is not None and reason != "cancelled":
            reason, code = "error", "callback"
            error = f"the text callback failed: {type(self.callback_error).__name__}: {self.callback_error}"
        self.result = RowResult(
            text=text,
            ids=list(self.text.ids),
            prompt_ids=list(self.request.prompt_ids),
            finish_reason=reason,
            error=error,
            error_code=code if reason == "error" else None,
        )
        if self.on_done is not None:
            self.on_done(self.result)
        return self.result


class _BatchEdits:
    """The steering of a list of rows as per-hook tables (rebuilt whenever the rows change)."""

    def __init__(self, rows: Sequence[Row], device: torch.device):
        groups: dict[tuple[str, int], list[tuple[int, _FeatureGroup]]] = {}
        directions: dict[str, dict[int, list]] = {}
        for b, row in enumerate(rows):
            if row.compiled is None:
                continue
            for hook, plan in row.compiled.plans.items():
                for g in plan.groups:
                    groups.setdefault((hook, id(g.sae)), []).append((b, g))
                if plan.directions:
                    directions.setdefault(hook, {})[b] = plan.directions
        n = len(rows)
        skip = [row.request.steering.skip_first if row.request.steering is not None else True for row in rows]
        self.tables: dict[str, list[FeatureTable]] = {}
        for (hook, _), members in groups.items():
            where = [b for b, _ in members]
            self.tables.setdefault(hook, []).append(
                FeatureTable.build(
                    [g for _, g in members], [skip[b] for b in where], None if where == list(range(n)) else where
                )
            )
        self.directions: dict[str, DirectionTable] = {}
        for hook, by_row in directions.items():
            where = sorted(by_row)
            self.directions[hook] = DirectionTable.build(
                [by_row[b] for b in where], [skip[b] for b in where], None if where == list(range(n)) else where
            )
        self.strength = torch.tensor([row.strength for row in rows], dtype=torch.float32, device=device)

    def hooks(self, roles: TokenRoles) -> dict[str | HookPoint, EditFn]:
        def make(hook: str) -> EditFn:
            tables, directions = self.tables.get(hook, []), self.directions.get(hook)
            return lambda x: apply_edits(x, roles, tables, directions, self.strength)

        return {hook: make(hook) for hook in {*self.tables, *self.directions}}


# ---------------------------------------------------------------- the engine


class BatchEngine:
    """Continuous batching over one model: `add` requests (from any thread), `step` on one thread.

    `max_batch` rows decode together; `prefill_tokens` caps the prompt tokens prefilled in one step (a long
    queue of joiners does not stall the running rows for long). Not thread-safe except `add`, `cancel`ling
    through a request's event, and reading `running` / `waiting`.
    """

    def __init__(self, lm: LoadedModel, *, max_batch: int = 16, prefill_tokens: int = 2048):
        if int(max_batch) < 1:
            raise MonoscopeError(f"max_batch must be >= 1, got {max_batch}")
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.device = torch.device(lm.device)
        self.batchable = _batchable_cache(self.model)
        self.max_batch = int(max_batch) if self.batchable else 1
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.eos = _eos_ids(lm)
        self.context_length = context_length(self.model)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (min(self.eos) if self.eos else 0))
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" in params
        self._lock = threading.Lock()
        self._waiting: list[Row] = []
        self.rows: list[Row] = []
        self._cache: KVCache | None = None
        self._mask: Tensor | None = None  # [B, L] 1 where the cache holds a real token
        self._edits: _BatchEdits | None = None
        self._count = 0
        self.peak_batch = 0  # the most rows decoded together in one step

    # ---- queue

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self.rows or self._waiting)

    def add(self, request: Request, on_done: Callable[[RowResult], None] | None = None) -> Row:
        """Queue a request; its steering is compiled here, so a bad spec raises before it joins any batch."""
        if not request.prompt_ids:
            raise MonoscopeError("the prompt encodes to no tokens; give some text to continue")
        fit_context(request.prompt_ids, request.params.max_new_tokens, self.context_length)
        compiled = None
        if request.steering is not None and not request.steering.is_empty():
            compiled = request.steering.compile(self.lm)
        row = Row(request, compiled, self.tokenizer, self.device, self._count)
        row.on_done = on_done
        with self._lock:
            self._count += 1
            self._waiting.append(row)
        return row

    # ---- one step

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Admit waiting rows (prefill), then decode one token for every row; the rows that finished."""
        finished: list[Row] = []
        self._drop([r for r in self.rows if r.cancelled], "cancelled", finished)
        joiners = self._take_joiners(finished)
        if joiners:
            self._prefill(joiners, finished)
        if self.rows:
            self._decode(finished)
        return finished

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.has_work():
            self.step()

    def abort(self, message: str) -> list[Row]:
        """End every row, running or waiting, with an error and drop the cache (after a failure inside a step)."""
        with self._lock:
            rows, self._waiting = self.rows + self._waiting, []
        self.rows, self._cache, self._mask, self._edits = [], None, None, None
        for row in rows:
            row.finish("error", message, "aborted")
        return rows

    def _take_joiners(self, finished: list[Row]) -> list[Row]:
        room = self.max_batch - len(self.rows)
        taken: list[Row] = []
        budget = self.prefill_tokens
        with self._lock:
            keep = []
            for row in self._waiting:
                if row.cancelled:
                    row.finish("cancelled")
                    finished.append(row)
                elif len(taken) < room and (not taken or len(row.request.prompt_ids) <= budget):
                    taken.append(row)
                    budget -= len(row.request.prompt_ids)
                else:
                    keep.append(row)
            self._waiting = keep
        return taken

    def _forward(
        self,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        edits: _BatchEdits | None,
        roles: TokenRoles,
    ) -> tuple[Tensor, KVCache]:
        hooks = edits.hooks(roles) if edits is not None else {}
        kw: dict[str, object] = {"input_ids": ids, "position_ids": positions, "use_cache": True, self._cache_arg: cache}
        if not (mask.shape[0] == 1 and bool(mask.all())):
            kw["attention_mask"] = mask
        if self._keep_arg:
            kw["logits_to_keep"] = 1
        with edit(self.model, hooks) if hooks else nullcontext():
            out = self.model(**kw)
        cache_out = getattr(out, "cache", None)
        if cache_out is None:
            cache_out = getattr(out, "past_key_values", None)
        assert cache_out is not None, "the model returned no KV cache"
        return out.logits[:, -1, :].float(), cache_out

    def _prefill(self, joiners: list[Row], finished: list[Row]) -> None:
        longest = max(len(r.request.prompt_ids) for r in joiners)
        ids = torch.full((len(joiners), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joiners), longest), dtype=torch.long)
        for b, row in enumerate(joiners):
            prompt = row.request.prompt_ids
            ids[b, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[b, longest - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        roles = TokenRoles(
            real=mask.bool(), prompt=torch.ones_like(mask, dtype=torch.bool), first=mask.bool() & (positions == 0)
        )
        edits = _BatchEdits(joiners, self.device) if any(r.compiled is not None for r in joiners) else None
        logits, cache = self._forward(ids, mask, positions, None, edits, roles)
        for row in joiners:
            row.length = len(row.request.prompt_ids)
        done = self._sample_and_push(joiners, logits)
        survivors = [b for b, row in enumerate(joiners) if row not in done]
        finished.extend(done)
        if not survivors:
            return
        if len(survivors) < len(joiners):
            index = torch.tensor(survivors, device=self.device)
            _select_cache(cache, index)
            mask = mask.index_select(0, index)
            cache, mask = _trim(cache, mask)
        self._merge(cache, mask, [joiners[b] for b in survivors])

    def _decode(self, finished: list[Row]) -> None:
        rows = self.rows
        self.peak_batch = max(self.peak_batch, len(rows))
        assert self._mask is not None
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype, device=self.device)], 1)
        none = torch.zeros(len(rows), 1, dtype=torch.bool, device=self.device)
        roles = TokenRoles(real=~none, prompt=none, first=none)
        logits, self._cache = self._forward(ids, mask, positions, self._cache, self._edits, roles)
        self._mask = mask
        for row in rows:
            row.length += 1
        done = self._sample_and_push(rows, logits)
        if done:
            self._remove(done)
            finished.extend(done)

    # ---- sampling and finishing

    def _sample_and_push(self, rows: list[Row], logits: Tensor) -> list[Row]:
        """Pick each row's next token, push it to its text; the rows that finished (they are not in the batch)."""
        for b, row in enumerate(rows):
            if len(row.text.ids) < row.params.min_new_tokens and self.eos:
                logits[b, list(self.eos)] = float("-inf")
        best, greedy_t = logits.max(-1)  # a NaN anywhere in a row makes its max NaN; inf stays inf
        finite, greedy = torch.isfinite(best).tolist(), greedy_t.tolist()
        done: list[Row] = []
        for b, row in enumerate(rows):
            if not finite[b]:
                row.finish(
                    "error",
                    f"the activations became non-finite (NaN or inf) after {len(row.text.ids)} generated tokens: "
                    "the steering is too strong for this model; use smaller values or a lower strength",
                    "nonfinite",
                )
                done.append(row)
                continue
            token = greedy[b] if row.generator is None else _sample(logits[b], row.params, row.generator)
            row.next_token = token
            stopped = row.text.push(token)
            n = len(row.text.ids)
            if row.callback_error is not None:
                row.finish("error")
            elif stopped or (token in self.eos and n >= row.params.min_new_tokens):
                row.finish("stop")
            elif n >= row.params.max_new_tokens:
                row.finish("length")
            else:
                continue
            done.append(row)
        return done

    def _drop(self, rows: list[Row], reason: str, finished: list[Row]) -> None:
        if not rows:
            return
        for row in rows:
            row.finish(reason)
        self._remove(rows)
        finished.extend(rows)

    # ---- the KV cache

    def _merge(self, cache: KVCache, mask: Tensor, rows: list[Row]) -> None:
        if not self.rows:
            if self.batchable:
                cache.layers = [_growing_layer(layer.keys, layer.values) for layer in cache.layers]
            self._cache, self._mask, self.rows = cache, mask, list(rows)
        else:
            assert self._mask is not None and self._cache is not None
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers):
                _assign(
                    mine,
                    torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], 0),
                    torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], 0),
                )
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], 0)
            self.rows = self.rows + list(rows)
        self._edits = _BatchEdits(self.rows, self.device) if any(r.compiled is not None for r in self.rows) else None

    def _remove(self, gone: list[Row]) -> None:
        keep = [b for b, row in enumerate(self.rows) if row not in gone]
        if not keep:
            self.rows, self._cache, self._mask, self._edits = [], None, None, None
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.device)
            assert self._mask is not None and self._cache is not None
            _select_cache(self._cache, index)
            self._cache, self._mask = _trim(self._cache, self._mask.index_select(0, index))
            self.rows = [self.rows[b] for b in keep]
            self._edits = (
                _BatchEdits(self.rows, self.device) if any(r.compiled is not None for r in self.rows) else None
            )


def _pad_left(t: Tensor, width: int, dim: int = -2) -> Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - (dim % t.dim()) - 1) + [missing, 0]
    return torch.nn.functional.pad(t, pad)


def _assign(layer: KVLayer, keys: Tensor, values: Tensor) -> None:
    if _GROWING is not None and isinstance(layer, _GROWING):
        layer.assign(keys, values)  # pyright: ignore[reportAttributeAccessIssue] - a GrowingLayer
    else:
        layer.keys, layer.values = keys, values


def _select_cache(cache: KVCache, index: Tensor) -> None:
    for layer in cache.layers:
        _assign(layer, layer.keys.index_select(0, index), layer.values.index_select(0, index))


def _trim(cache: KVCache, mask: Tensor) -> tuple[KVCache, Tensor]:
    """Cut the columns that are padding in every row (all on the left)."""
    real = mask.sum(-1)
    cut = int(mask.shape[1] - int(real.max()))
    if cut > 0:
        for layer in cache.layers:
            _assign(layer, layer.keys[:, :, cut:], layer.values[:, :, cut:])
        mask = mask[:, cut:]
    return cache, mask


def _growing_layer(keys: Tensor, values: Tensor) -> KVLayer:
    """A full-attention KV cache layer whose keys and values live in a buffer with room to grow: a decode step
    writes one column, where transformers' `DynamicLayer` concatenates (copies the whole cache every step).
    A subclass of `DynamicLayer` (defined on first use: transformers is imported late)."""
    global _GROWING
    if _GROWING is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            def __init__(self, keys: Tensor, values: Tensor):
                super().__init__()
                self.assign(keys, values)

            def assign(self, keys: Tensor, values: Tensor, room: int = 64) -> None:
                batch, heads, length, dim = keys.shape
                self._k = keys.new_empty(batch, heads, length + room, dim)
                self._v = values.new_empty(batch, heads, length + room, values.shape[-1])
                self._k[:, :, :length] = keys
                self._v[:, :, :length] = values
                self.length, self.device, self.is_initialized = length, keys.device, True
                self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

            def update(
                self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
            ) -> tuple[Tensor, Tensor]:
                n = key_states.shape[-2]
                if self.length + n > self._k.shape[-2]:
                    self.assign(
                        self._k[:, :, : self.length], self._v[:, :, : self.length], room=max(64, self.length)
                    )  # double the room: amortised O(1)
                self._k[:, :, self.length : self.length + n] = key_states
                self._v[:, :, self.length : self.length + n] = value_states
                self.length += n
                self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
                return self.keys, self.values

        _GROWING = GrowingLayer
    return _GROWING(keys, values)


_GROWING: type | None = None


def _batchable_cache(model: PreTrainedModel) -> bool:
    """Whether the model's KV cache is plain full-attention layers, which left padding and row selection handle."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.config)
        return all(type(layer) is DynamicLayer for layer in cache.layers)
    except Exception:  # noqa: BLE001 - an unusual model: one row at a time is always right
        return False


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (
        getattr(lm.tokenizer, "eos_token_id", None),
        getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(s) for s in source)
    return ids


def _sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from logits [V]: temperature, then top-k, then top-p (nucleus), then a draw from `generator`."""
    scores = logits / params.temperature
    if params.top_k:
        kth = scores.topk(min(int(params.top_k), scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > params.top_p  # the smallest set whose mass reaches top_p is kept
        scores = scores.scatter(0, order, ordered.masked_fill(outside, float("-inf")))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


# ---------------------------------------------------------------- the Python API


def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[Prompt | Sequence[int] | Tensor],
    *,
    steerings: Steering | None | Sequence[Steering | None] = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None | Sequence[int | None] = None,
    stop: Sequence[str] = (),
    raw: bool = False,
    ignore_eos: bool = False,
    max_batch: int = 16,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Generation]:
    """Generate from many prompts at once, each with its own steering (or one `Steering` for all, or None).

    `prompts`: strings (through the chat template when the model has one, unless `raw`), chat messages, or
    token ids. `seed`: one for every row or one per row (a seed alone samples at temperature 1, as in
    `generate`); each row draws from its own generator, so its sample does not depend on the other rows.
    Greedy output equals `generate` for each prompt alone. Every spec is compiled before any generation, so a
    bad one raises at once. Returns one `Generation` per prompt, in order, with `finish_reason` (stop, length
    or error: a steering so strong that the activations became NaN/inf ends its row, the others go on).
    """
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        return []
    specs: list[Steering | None] = list(steerings) if isinstance(steerings, (list, tuple)) else [steerings] * n  # type: ignore[list-item]
    seeds: list[int | None] = list(seed) if isinstance(seed, (list, tuple)) else [seed] * n  # type: ignore[list-item]
    if len(specs) != n or len(seeds) != n:
        raise MonoscopeError(
            f"got {n} prompts but {len(specs)} steerings and {len(seeds)} seeds; give one each, or one for all"
        )
    engine = BatchEngine(lm, max_batch=max_batch)
    results: list[Generation | None] = [None] * n
    for i, (prompt, spec, row_seed) in enumerate(zip(prompts, specs, seeds)):
        ids = prompt_token_ids(lm.tokenizer, prompt, raw=raw)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=sampling_temperature(temperature, row_seed),
            top_p=top_p,
            seed=row_seed,
            stop=tuple(stop),
            min_new_tokens=max_new_tokens if ignore_eos else 0,
        )
        callback = None if on_text is None else (lambda delta, i=i: on_text(i, delta))

        def done(result: RowResult, i: int = i) -> None:
            results[i] = Generation(
                text=result.text,
                ids=result.ids,
                prompt_ids=result.prompt_ids,
                finish_reason=result.finish_reason,
                error=result.error,
            )

        engine.add(Request(ids, spec, params, on_text=callback), on_done=done)
    engine.run()
    return [r for r in results if r is not None]
