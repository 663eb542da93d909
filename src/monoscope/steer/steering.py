"""Feature steering: a `Steering` spec (the equalizer) and `steer(model, steering)`, which applies it during any
forward pass or `generate` call.

Feature edits, with f_i(x) the SAE's activation of feature i and d_i = W_dec[i] (raw model scale):

    clamp     x' = x + (v - f_i(x)) d_i      (Anthropic's method: the SAE's reconstruction error is kept)
    add       x' = x + v d_i
    multiply  x' = x + (m - 1) f_i(x) d_i
    ablate    x' = x - f_i(x) d_i            (clamp to 0)

Direction edits, with r the unit direction: `orthogonal` sets the component along r to c times itself
(x' = x + (c - 1)(x.r) r; c = 0 removes it), `cap` caps it (x' = x - max(x.r - v, 0) r), and `add` adds a
vector (steering vectors). Every edit's change is multiplied by the global `strength`.

Per forward pass and SAE, the features of all edits and conditions are encoded with one encoder GEMM; the
edits are then one [tokens, edits] x [edits, d] product. Positions: `all`, `prompt` (the tokens given to
`generate`) or `generated` (the tokens it produced). They are tracked across `generate`'s calls with or
without the KV cache: a forward on top of an empty cache starts a new sequence (its tokens are the prompt)
unless it is the previous input plus one token (generation without a cache); later calls with the cache
carry one generated token each. The first position of a sequence (BOS or not, an attention sink with an
outsized norm that SAEs are not trained on) is left alone unless `skip_first=False`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import MonoscopeError
from ..model import HookPoint, LoadedModel, edit, find_blocks
from ..sae.base import SAE
from ..sae.interop import check_model_match
from ..sae.io import sae_hook_point
from .spec import (
    Condition,
    DirectionEdit,
    FeatureEdit,
    Value,
    check_number,
    check_positions,
    parse_feature_spec,
    parse_mode,
)

if TYPE_CHECKING:
    from .featuredb import MaxActivationSource


@runtime_checkable
class Directions(Protocol):
    """What `Steering.add_vector` reads from a `SteeringVector`: one direction per hook point (a protocol, so this
    module does not import `vectors`, which imports the generation helpers built on it)."""

    @property
    def directions(self) -> Mapping[str, Tensor]: ...  # read-only here, so a dict attribute matches


# ---------------------------------------------------------------- helpers on models and SAEs


class SteeringWarning(UserWarning):
    """Something is probably wrong (an SAE trained on another model) but steering can still run."""


def _unwrap(model: nn.Module | LoadedModel) -> tuple[nn.Module, LoadedModel | None]:
    """(nn.Module, LoadedModel or None) from a LoadedModel or a bare module."""
    if isinstance(model, nn.Module):
        return model, None
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner, model
    raise MonoscopeError(f"expected a transformers model or a LoadedModel, got {type(model).__name__}")


def model_width(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_name_of(model: nn.Module, loaded: LoadedModel | None = None) -> str | None:
    if loaded is not None and getattr(loaded, "name", None):
        return str(loaded.name)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def check_sae_fits(sae: SAE, model: nn.Module, hook: str, loaded: LoadedModel | None = None) -> None:
    """Width must match (error); the recorded model name should (loud warning); the hook must exist."""
    hp = HookPoint.parse(hook)
    n_layers = len(find_blocks(model))
    if hp.layer >= n_layers:
        raise MonoscopeError(
            f"the SAE reads hook point {hp}, but the model has only {n_layers} layers (0-{n_layers - 1}); use the model the SAE was trained on"
        )
    check_model_match(sae, model_name_of(model, loaded), model_width(model), category=SteeringWarning)


def feature_codes(sae: SAE, x: Tensor, features: Tensor) -> Tensor:
    """Activations [n, m] of `features` (LongTensor [m]) for flat input x [n, d_in]: one encoder GEMM.

    TopK needs every pre-activation (a feature is active only when among the k largest); JumpReLU and ReLU
    SAEs need only the wanted encoder columns.
    """
    x = x.to(sae.W_enc.dtype)
    centred = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    arch = sae.cfg.architecture
    if arch == "topk":
        if sae.cfg.k is None:
            raise MonoscopeError("this TopK SAE's cfg.json has no k; it cannot be steered")
        pre = torch.addmm(sae.b_enc, centred, sae.W_enc)
        kth = pre.topk(sae.cfg.k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        picked = pre.index_select(1, features)
        return torch.where(picked >= kth, picked.relu(), torch.zeros_like(picked))
    if arch in ("jumprelu", "standard"):
        pre = torch.addmm(sae.b_enc.index_select(0, features), centred, sae.W_enc.index_select(1, features))
        if arch == "jumprelu":  # a JumpReLUSAE: its `threshold` is a tensor
            return pre.relu() * (pre > cast(Tensor, sae.threshold).index_select(0, features))
        return pre.relu()
    return sae.encode(x).index_select(-1, features)


# ---------------------------------------------------------------- the spec


class Steering:
    """The equalizer: feature edits (on one or more SAEs) and direction edits, with one global strength.

        s = Steering(sae).clamp(1234, "8x").add(99, 4).ablate(7)
        s.strength = 0.5
        with steer(lm, s):
            lm.model.generate(...)

    `positions` (all / prompt / generated) is the default for edits that do not set their own; the first
    position of a sequence is left alone unless `skip_first=False` (see the module docstring).
    `max_activations` resolves values like `8x`: a dict {feature: max}, a features.db path, a `FeatureDB`,
    or a callable (sae, [features]) -> {feature: max}; when absent, the database next to the SAE is used if
    there is one, else an estimate over a few starter-corpus contexts (needs a LoadedModel).
    """

    def __init__(
        self,
        sae: SAE | None = None,
        *,
        strength: float = 1.0,
        positions: str = "all",
        max_activations: MaxActivationSource | None = None,
        skip_first: bool = True,
    ):
        self.sae = sae
        self.feature_edits: list[FeatureEdit] = []
        self.direction_edits: list[DirectionEdit] = []
        self.strength = strength
        self.positions = positions
        self.max_activations = max_activations
        self.skip_first = skip_first

    # ---- properties validated on assignment --------------------------------------------------------

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = check_number(value, "strength")

    @property
    def positions(self) -> str:
        return self._positions

    @positions.setter
    def positions(self, value: str) -> None:
        self._positions = check_positions(value) or "all"

    @property
    def edits(self) -> list:
        return [*self.feature_edits, *self.direction_edits]

    def is_empty(self) -> bool:
        return not self.feature_edits and not self.direction_edits

    def __len__(self) -> int:
        return len(self.feature_edits) + len(self.direction_edits)

    def copy(self) -> "Steering":
        new = copy.copy(self)
        new.feature_edits = list(self.feature_edits)
        new.direction_edits = list(self.direction_edits)
        return new

    # ---- feature edits -----------------------------------------------------------------------------

    def _sae(self, sae: SAE | None) -> SAE:
        sae = sae if sae is not None else self.sae
        if sae is None:
            raise MonoscopeError("a feature edit needs an SAE: Steering(sae) or pass sae=")
        return sae

    def set(
        self,
        feature: int,
        mode: str,
        value: "Value | float | str" = 0.0,
        *,
        sae: SAE | None = None,
        positions: str | None = None,
        when: "Condition | str | None" = None,
        hook: str | None = None,
    ) -> "Steering":
        """Set (or replace) the edit of `feature`; `when` makes it conditional (`Condition` or 'ID>THRESHOLD')."""
        sae = self._sae(sae)
        condition = Condition.parse(when) if isinstance(when, str) else when
        value = Value(0.0) if parse_mode(mode) == "ablate" else Value.parse(value)
        new = FeatureEdit(
            sae=sae, feature=feature, mode=mode, value=value, positions=positions, condition=condition, hook=hook
        )
        self.feature_edits = [
            e for e in self.feature_edits if not (e.sae is sae and e.feature == new.feature and e.hook == new.hook)
        ]
        self.feature_edits.append(new)
        return self

    def clamp(self, feature: int, value: "Value | float | str", **kw: Any) -> "Steering":
        return self.set(feature, "clamp", value, **kw)

    def add(self, feature: int, value: "Value | float | str", **kw: Any) -> "Steering":
        return self.set(feature, "add", value, **kw)

    def multiply(self, feature: int, factor: "Value | float | str", **kw: Any) -> "Steering":
        return self.set(feature, "multiply", factor, **kw)

    def ablate(self, feature: int, **kw: Any) -> "Steering":
        return self.set(feature, "ablate", 0.0, **kw)

    def remove(self, feature: int, *, sae: SAE | None = None) -> bool:
        """Drop the edit(s) of `feature`; whether there was one."""
        sae = sae if sae is not None else self.sae
        before = len(self.feature_edits)
        self.feature_edits = [
            e for e in self.feature_edits if not (e.feature == int(feature) and (sae is None or e.sae is sae))
        ]
        return len(self.feature_edits) < before

    def reset(self) -> "Steering":
        self.feature_edits.clear()
        self.direction_edits.clear()
        self.strength = 1.0
        return self

    def parse(
        self,
        specs: "str | list[str]",
        *,
        sae: SAE | None = None,
        positions: str | None = None,
        when: "Condition | str | None" = None,
    ) -> "Steering":
        """Add CLI-style specs: `ID=clamp:VALUE`, `ID=add:VALUE`, `ID=multiply:M`, `ID=ablate`, `ID=VALUE` (clamp)."""
        for spec in [specs] if isinstance(specs, str) else list(specs):
            feature, mode, value = parse_feature_spec(spec)
            self.set(feature, mode, value, sae=sae, positions=positions, when=when)
        return self

    # ---- direction edits ---------------------------------------------------------------------------

    def orthogonal(
        self, direction: Tensor, hook: str, c: float = 0.0, *, positions: str | None = None, label: str = ""
    ) -> "Steering":
        """Set the component of the activation along `direction` (made unit) to `c` times itself."""
        self.direction_edits.append(
            DirectionEdit(str(HookPoint.parse(hook)), direction, "orthogonal", c, positions, label)
        )
        return self

    def cap(
        self, direction: Tensor, hook: str, value: float, *, positions: str | None = None, label: str = ""
    ) -> "Steering":
        """Cap the component of the activation along `direction` (made unit) at `value`."""
        self.direction_edits.append(
            DirectionEdit(str(HookPoint.parse(hook)), direction, "cap", value, positions, label)
        )
        return self

    def add_vector(
        self,
        vector: Tensor | Directions,
        coefficient: float = 1.0,
        *,
        hook: str | None = None,
        positions: str | None = None,
        label: str = "",
    ) -> "Steering":
        """Add `coefficient` x a vector: a raw tensor at `hook`, or a `SteeringVector` (each of its hook points)."""
        if isinstance(vector, Directions):
            for point, tensor in vector.directions.items():
                if hook is None or str(HookPoint.parse(hook)) == point:
                    self.direction_edits.append(
                        DirectionEdit(
                            point,
                            tensor,
                            "add",
                            coefficient,
                            positions,
                            label or getattr(vector, "name", "") or "vector",
                        )
                    )
            return self
        if hook is None:
            raise MonoscopeError("add_vector with a plain tensor needs hook= (e.g. resid_post.12)")
        direction = torch.as_tensor(vector)
        self.direction_edits.append(
            DirectionEdit(str(HookPoint.parse(hook)), direction, "add", coefficient, positions, label or "vector")
        )
        return self

    # ---- text -----------------------------------------------------------------------------------------

    def describe(self) -> list[str]:
        lines = [e.describe() for e in self.feature_edits] + [e.describe() for e in self.direction_edits]
        if self.strength != 1.0:
            lines.append(f"strength {self.strength:g}")
        return lines

    def __repr__(self) -> str:
        return f"Steering({'; '.join(self.describe()) or 'empty'})"

    # ---- compile ---------------------------------------------------------------------------------------

    def compile(self, model: nn.Module | LoadedModel) -> "CompiledSteering":
        """Check everything against `model` and resolve values; errors come here, before any generation."""
        module, loaded = _unwrap(model)
        return CompiledSteering.build(self, module, loaded)


# ---------------------------------------------------------------- positions


@dataclass
class TokenRoles:
    """What each token of one forward pass is, bool [B, T] each: a real token (not left padding), a prompt
    token (else a generated one), the first token of its sequence. Built by `PositionTracker` inside
    `generate`, and directly by the batch engine, which knows each row's padding and prompt."""

    real: Tensor
    prompt: Tensor
    first: Tensor

    def masks(self, skip_first: Tensor) -> Tensor:
        """Bool [B, T, 3]: which tokens the positions all / prompt / generated edit (rows' `skip_first` [B] or [1])."""
        editable = self.real & ~(self.first & skip_first.to(self.real.device).view(-1, 1))
        return torch.stack([editable, editable & self.prompt, editable & ~self.prompt], -1)

    def select(self, rows: Tensor) -> "TokenRoles":
        return TokenRoles(
            self.real.index_select(0, rows), self.prompt.index_select(0, rows), self.first.index_select(0, rows)
        )

    @classmethod
    def whole(
        cls, batch: int, length: int, device: torch.device | str, start: int = 0, prompt_len: int | None = None
    ) -> "TokenRoles":
        """Unpadded rows whose tokens sit at `start`... of their sequence; the first `prompt_len` are prompt."""
        where = torch.arange(start, start + length, device=device).expand(batch, length)
        prompt = where < (prompt_len if prompt_len is not None else start + length)
        return cls(real=torch.ones_like(prompt), prompt=prompt, first=where == 0)


@dataclass
class _Call:
    """One forward pass of the model: where its tokens sit in the sequence."""

    start: int
    length: int
    prompt_len: int
    ids: Tensor | None
    attention_mask: Tensor | None = None
    roles: dict = field(default_factory=dict)


class PositionTracker:
    """Follows `generate` through its forward calls: which positions are prompt and which are generated (and,
    from the attention mask, which are left padding)."""

    def __init__(self, skip_first: bool = True):
        self.skip_first = skip_first
        self.prompt_len: int | None = None
        self._forced: int | None = None
        self._prev: tuple[int, int, Tensor | None] | None = None  # (past, length, ids)
        self.current: _Call | None = None

    def begin(self, prompt_length: int | None = None) -> None:
        """Start a new sequence; with `prompt_length`, its first `prompt_length` tokens are the prompt."""
        self._prev = None
        self.prompt_len = None
        self._forced = prompt_length

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            batch, length = ids.shape[0], ids.shape[-1]
        elif isinstance(embeds, Tensor):
            batch, length = embeds.shape[0], embeds.shape[1]
        else:
            self.current = None
            return
        past = _past_length(kwargs.get("past_key_values", kwargs.get("cache")))
        if past == 0:
            prev = self._prev
            continuation = (
                prev is not None
                and prev[0] == 0
                and length == prev[1] + 1
                and self.prompt_len is not None
                and (
                    ids is None
                    or prev[2] is None
                    or (prev[2].shape[0] == batch and torch.equal(ids[:, : prev[1]], prev[2]))
                )
            )
            if not continuation:
                self.prompt_len = self._forced if self._forced is not None else length
                self._forced = None
        elif length > 1 or self.prompt_len is None:
            self.prompt_len = past + length  # a new chunk of prompt on top of a cache
        assert self.prompt_len is not None  # set above for a first forward, kept from it for later ones
        self._prev = (past, length, ids.detach() if ids is not None else None)
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape == (batch, past + length) else None
        self.current = _Call(start=past, length=length, prompt_len=int(self.prompt_len), ids=ids, attention_mask=mask)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self.current = None

    def roles(self, batch: int, length: int, device: torch.device) -> TokenRoles:
        """The roles of the tokens of the forward pass now running (a bare forward: all prompt, unpadded)."""
        call = self.current
        if call is None or call.length != length:
            return TokenRoles.whole(batch, length, device)
        key = (batch, device)
        if key not in call.roles:
            roles = TokenRoles.whole(batch, length, device, call.start, call.prompt_len)
            mask = call.attention_mask
            if mask is not None and not bool(mask.all()):
                mask = mask.to(device=device, dtype=torch.long)
                position = mask.cumsum(-1)[:, -length:] - 1
                roles.real = mask[:, -length:].bool()
                roles.first = roles.real & (position == 0)
            call.roles[key] = roles
        return call.roles[key]


def _past_length(cache: Any) -> int:  # a transformers Cache, a legacy tuple of tensors, or None
    """Tokens already in the KV cache. A wrong guess would misplace every position-scoped edit, so a cache
    whose length cannot be read is an error, not 0."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy tuple-of-tuples cache: [layer][key/value] with shape [B, H, T, D]
        return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0
    raise MonoscopeError(
        f"cannot read how many tokens a {type(cache).__name__} KV cache holds; "
        "position-scoped steering needs it (pass use_cache=False or a transformers Cache)"
    )


# ---------------------------------------------------------------- the compiled form


@dataclass
class _FeatureGroup:
    """All feature edits of one spec on one SAE at one hook point (n edits, reading m features)."""

    sae: SAE
    needed: list[int]  # features whose activation is read (edits needing f, conditions)
    decoder: Tensor  # [n, d] rows of W_dec (float32)
    kind: Tensor  # [n] 0 clamp, 1 add, 2 multiply, 3 ablate
    values: Tensor  # [n] resolved values (clamp target, add amount, multiplier)
    where: Tensor  # [n] positions: 0 all, 1 prompt, 2 generated
    edit_slot: Tensor  # [n] index in `needed` of each edit's own feature (-1: not read)
    cond_slot: Tensor  # [n] index in `needed` of each edit's condition feature (-1: none)
    cond_threshold: Tensor  # [n]


@dataclass
class _DirectionPlan:
    mode: str
    direction: Tensor  # [d] unit for orthogonal/cap
    value: float
    positions: str


@dataclass
class _HookPlan:
    hook: str
    groups: list[_FeatureGroup]
    directions: list[_DirectionPlan]

    def make_fn(self, tracker: PositionTracker, steering: Steering):
        tables = [FeatureTable.build([g], [steering.skip_first]) for g in self.groups]
        directions = DirectionTable.build([self.directions], [steering.skip_first]) if self.directions else None

        def fn(x: Tensor) -> Tensor | None:
            if x.dim() == 2:  # unbatched: [T, d]
                out = fn(x.unsqueeze(0))
                return None if out is None else out.squeeze(0)
            strength = torch.tensor([steering.strength], dtype=torch.float32, device=x.device)
            return apply_edits(x, tracker.roles(x.shape[0], x.shape[1], x.device), tables, directions, strength)

        return fn


# ---------------------------------------------------------------- the edits of many rows at once


_CODES = {p: i for i, p in enumerate(("all", "prompt", "generated"))}


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values [B, T, m] at index [R, E] (R = B or 1; -1 reads 0) -> [B, T, E]."""
    batch, length = values.shape[0], values.shape[1]
    safe = index.clamp_min(0).unsqueeze(1).expand(batch, length, index.shape[-1])
    out = values.gather(2, safe)
    return out.masked_fill((index < 0).unsqueeze(1), 0.0)


@dataclass
class FeatureTable:
    """The feature edits on one SAE at one hook point of R rows (or one spec for every row, R = 1), padded to
    E edits per row: one encoder GEMM over the union of the features any row reads, then per-row gathers of
    coefficients and masks, and one [T, E] x [E, d] product per row."""

    sae: SAE
    needed: Tensor  # [m] the union of features read
    rows: Tensor | None  # [R] rows of the batch these edits belong to (None: every row, R = B or 1)
    decoder: Tensor  # [R, E, d]
    kind: Tensor  # [R, E]
    values: Tensor  # [R, E]
    where: Tensor  # [R, E]
    edit_slot: Tensor  # [R, E] into `needed`, -1 none
    cond_slot: Tensor  # [R, E] into `needed`, -1 none
    cond_threshold: Tensor  # [R, E]
    skip_first: Tensor  # [R] bool

    @classmethod
    def build(
        cls, groups: "list[_FeatureGroup]", skip_first: "list[bool]", rows: "list[int] | None" = None
    ) -> "FeatureTable":
        """One table from the groups of several rows (all on the same SAE); `rows` their places in the batch."""
        sae = groups[0].sae
        device, width = groups[0].decoder.device, groups[0].decoder.shape[-1]
        union: dict[int, int] = {}
        for g in groups:
            for f in g.needed:
                union.setdefault(int(f), len(union))
        n_rows, n_edits = len(groups), max(len(g.kind) for g in groups)

        def padded(fill: float, dtype: torch.dtype) -> Tensor:
            return torch.full((n_rows, n_edits), fill, dtype=dtype, device=device)

        kind, values, where = padded(1, torch.long), padded(0.0, torch.float32), padded(0, torch.long)
        edit_slot, cond_slot, threshold = padded(-1, torch.long), padded(-1, torch.long), padded(0.0, torch.float32)
        decoder = torch.zeros(n_rows, n_edits, width, dtype=torch.float32, device=device)
        for r, g in enumerate(groups):
            n = len(g.kind)
            remap = torch.tensor(
                [union[int(f)] for f in g.needed] + [-1], dtype=torch.long, device=device
            )  # [-1] -> -1
            kind[r, :n], values[r, :n], where[r, :n], threshold[r, :n] = g.kind, g.values, g.where, g.cond_threshold
            edit_slot[r, :n], cond_slot[r, :n] = remap[g.edit_slot], remap[g.cond_slot]
            decoder[r, :n] = g.decoder
        return cls(
            sae=sae,
            needed=torch.tensor(list(union), dtype=torch.long, device=device),
            rows=None if rows is None else torch.tensor(rows, dtype=torch.long, device=device),
            decoder=decoder,
            kind=kind,
            values=values,
            where=where,
            edit_slot=edit_slot,
            cond_slot=cond_slot,
            cond_threshold=threshold,
            skip_first=torch.tensor(skip_first, dtype=torch.bool, device=device),
        )

    def delta(self, x: Tensor, masks: Tensor, strength: Tensor) -> Tensor:
        """The change [R, T, d] (float32) to x [R, T, d] (this table's rows), masks [R, T, 3], strength [R] or [1]."""
        batch, length, d = x.shape
        codes = None
        if self.needed.numel():
            codes = feature_codes(self.sae, x.reshape(-1, d), self.needed).view(batch, length, -1).float()
            own = _gather(codes, self.edit_slot)
        else:
            own = torch.zeros(batch, length, self.kind.shape[-1], dtype=torch.float32, device=x.device)
        values, kind = self.values.unsqueeze(1), self.kind.unsqueeze(1)
        coef = torch.where(
            kind == 0,
            values - own,
            torch.where(kind == 1, values.expand_as(own), torch.where(kind == 2, (values - 1) * own, -own)),
        )
        keep = masks.gather(2, self.where.unsqueeze(1).expand(batch, length, self.where.shape[-1]))
        if codes is not None and bool((self.cond_slot >= 0).any()):
            active = _gather(codes, self.cond_slot) > self.cond_threshold.unsqueeze(1)
            keep = keep & (active | (self.cond_slot < 0).unsqueeze(1))
        coef = strength.view(-1, 1, 1) * (coef * keep.to(coef.dtype))
        return torch.matmul(coef, self.decoder)


_DIRECTION_MODES = {"add": 0, "orthogonal": 1, "cap": 2}


@dataclass
class DirectionTable:
    """The direction edits at one hook point of R rows, padded to K per row (mode -1: none), applied in order."""

    rows: Tensor | None
    mode: Tensor  # [R, K]
    direction: Tensor  # [R, K, d]
    value: Tensor  # [R, K]
    where: Tensor  # [R, K]
    skip_first: Tensor  # [R]

    @classmethod
    def build(
        cls, plans: "list[list[_DirectionPlan]]", skip_first: "list[bool]", rows: "list[int] | None" = None
    ) -> "DirectionTable":
        first = next(p for row in plans for p in row)
        device, width = first.direction.device, first.direction.numel()
        n_rows, k = len(plans), max(len(row) for row in plans)
        mode = torch.full((n_rows, k), -1, dtype=torch.long, device=device)
        value, where = torch.zeros(n_rows, k, device=device), torch.zeros(n_rows, k, dtype=torch.long, device=device)
        direction = torch.zeros(n_rows, k, width, device=device)
        for r, row in enumerate(plans):
            for j, p in enumerate(row):
                mode[r, j], value[r, j], where[r, j] = _DIRECTION_MODES[p.mode], p.value, _CODES[p.positions]
                direction[r, j] = p.direction.to(device=device, dtype=torch.float32)
        return cls(
            rows=None if rows is None else torch.tensor(rows, dtype=torch.long, device=device),
            mode=mode,
            direction=direction,
            value=value,
            where=where,
            skip_first=torch.tensor(skip_first, dtype=torch.bool, device=device),
        )

    def apply(self, x: Tensor, masks: Tensor, strength: Tensor) -> Tensor:
        """x [R, T, d] with each row's directions applied one after the other (differentiable)."""
        out = x
        strength = strength.view(-1, 1)
        for j in range(self.mode.shape[-1]):
            mode, value = self.mode[:, j].view(-1, 1), self.value[:, j].view(-1, 1)
            r = self.direction[:, j]  # [R, d]
            xf = out.float()
            comp = torch.matmul(xf, r.unsqueeze(-1)).squeeze(-1)  # [R or B, T]
            amount = torch.where(
                mode == 0,
                value.expand_as(comp),
                torch.where(mode == 1, (value - 1.0) * comp, -(comp - value).clamp_min(0)),
            )
            keep = masks.gather(2, self.where[:, j].view(-1, 1, 1).expand(masks.shape[0], masks.shape[1], 1)).squeeze(
                -1
            )
            amount = strength * amount * (keep & (mode >= 0)).to(amount.dtype)
            out = (xf + amount.unsqueeze(-1) * r.unsqueeze(1)).to(x.dtype)
        return out


def apply_edits(
    x: Tensor, roles: TokenRoles, tables: "list[FeatureTable]", directions: "DirectionTable | None", strength: Tensor
) -> Tensor:
    """x [B, T, d] with feature edits (all read from x, summed) and then direction edits applied; each table
    touches its own rows only. `strength` is [B] (or [1] for every row)."""
    out = x
    if tables:
        delta = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        with torch.no_grad():
            for table in tables:
                rows = table.rows
                xs = x.detach() if rows is None else x.detach().index_select(0, rows)
                part = table.delta(xs, _masks_for(roles, table.skip_first, rows), _rows_of(strength, rows))
                if rows is None:
                    delta = delta + part
                else:
                    delta.index_add_(0, rows, part)
        out = x + delta.to(x.dtype)
    if directions is not None:
        rows = directions.rows
        if rows is None:
            out = directions.apply(out, _masks_for(roles, directions.skip_first, None), strength)
        else:
            changed = directions.apply(
                out.index_select(0, rows), _masks_for(roles, directions.skip_first, rows), _rows_of(strength, rows)
            )
            out = out.index_copy(0, rows, changed)
    return out


def _rows_of(values: Tensor, rows: Tensor | None) -> Tensor:
    return values if rows is None or values.shape[0] == 1 else values.index_select(0, rows)


def _masks_for(roles: TokenRoles, skip_first: Tensor, rows: Tensor | None) -> Tensor:
    return (roles if rows is None else roles.select(rows)).masks(skip_first)


_KIND = {"clamp": 0, "add": 1, "multiply": 2, "ablate": 3}


@dataclass
class CompiledSteering:
    plans: dict[str, _HookPlan]
    steering: Steering

    @classmethod
    def build(cls, steering: Steering, model: nn.Module, loaded: LoadedModel | None) -> "CompiledSteering":
        from ..model import resolve

        device = next(model.parameters()).device
        width = model_width(model)
        by_hook: dict[str, dict[int, list[FeatureEdit]]] = defaultdict(dict)
        saes: dict[int, SAE] = {}
        checked: set[tuple[int, str]] = set()
        for e in steering.feature_edits:
            hook = str(HookPoint.parse(e.hook)) if e.hook else sae_hook_point(e.sae)
            if hook is None:
                raise MonoscopeError(
                    "the SAE does not say which hook point it reads (no hook_point in monoscope.json); pass hook="
                )
            if (id(e.sae), hook) not in checked:
                resolve(model, hook)
                check_sae_fits(e.sae, model, hook, loaded)
                checked.add((id(e.sae), hook))
            if e.feature >= e.sae.cfg.d_sae:
                raise MonoscopeError(
                    f"feature id {e.feature} does not exist: this SAE has {e.sae.cfg.d_sae} features (0-{e.sae.cfg.d_sae - 1})"
                )
            if e.condition is not None:
                cond_sae = e.condition.sae if e.condition.sae is not None else e.sae
                if cond_sae is not e.sae:
                    raise MonoscopeError("a condition must be a feature of the same SAE as the edit it gates")
                if e.condition.feature >= e.sae.cfg.d_sae:
                    raise MonoscopeError(
                        f"condition feature id {e.condition.feature} does not exist: this SAE has {e.sae.cfg.d_sae} features"
                    )
            saes[id(e.sae)] = e.sae
            by_hook[hook].setdefault(id(e.sae), []).append(e)
        for d in steering.direction_edits:
            resolve(model, d.hook)
            if width is not None and d.direction.numel() != width:
                raise MonoscopeError(
                    f"a direction at {d.hook} has {d.direction.numel()} numbers but the model's width is {width}; it was made for another model"
                )
        maxima = _resolve_maxima(steering, model, loaded, by_hook, saes)

        plans: dict[str, _HookPlan] = {}
        for hook, groups in by_hook.items():
            plan = plans.setdefault(hook, _HookPlan(hook, [], []))
            for sae_id, edits in groups.items():
                sae = saes[sae_id]
                if sae.W_dec.device != device:
                    raise MonoscopeError(
                        f"the SAE is on {sae.W_dec.device} but the model is on {device}; load both on the same device"
                    )
                needed: list[int] = []
                values, edit_slot, cond_slot, cond_thr = [], [], [], []
                for e in edits:
                    m = maxima.get((sae_id, e.feature))
                    values.append(e.value.resolve(m, f"the value of feature {e.feature}"))
                    edit_slot.append(_slot(needed, e.feature) if e.mode != "add" else -1)
                    if e.condition is not None:
                        cond_slot.append(_slot(needed, e.condition.feature))
                        mc = maxima.get((sae_id, e.condition.feature))
                        cond_thr.append(
                            e.condition.threshold.resolve(
                                mc, f"the threshold of condition feature {e.condition.feature}"
                            )
                        )
                    else:
                        cond_slot.append(-1)
                        cond_thr.append(0.0)
                dev = sae.W_dec.device
                idx = torch.tensor([e.feature for e in edits], dtype=torch.long, device=dev)
                plan.groups.append(
                    _FeatureGroup(
                        sae=sae,
                        needed=needed,
                        decoder=sae.W_dec.detach().index_select(0, idx).float(),
                        kind=torch.tensor([_KIND[e.mode] for e in edits], device=dev),
                        values=torch.tensor(values, dtype=torch.float32, device=dev),
                        where=torch.tensor(
                            [_CODES[e.positions or steering.positions] for e in edits], dtype=torch.long, device=dev
                        ),
                        edit_slot=torch.tensor(edit_slot, dtype=torch.long, device=dev),
                        cond_slot=torch.tensor(cond_slot, dtype=torch.long, device=dev),
                        cond_threshold=torch.tensor(cond_thr, dtype=torch.float32, device=dev),
                    )
                )
        for d in steering.direction_edits:
            plan = plans.setdefault(d.hook, _HookPlan(d.hook, [], []))
            plan.directions.append(
                _DirectionPlan(d.mode, d.direction.to(device), d.value, d.positions or steering.positions)
            )
        return cls(plans=plans, steering=steering)


def _slot(needed: list[int], feature: int) -> int:
    """The index of `feature` in `needed` (the features a group reads), appended when new."""
    if feature not in needed:
        needed.append(feature)
    return needed.index(feature)


def _resolve_maxima(
    steering: Steering, model: nn.Module, loaded: LoadedModel | None, by_hook: dict, saes: dict[int, SAE]
) -> dict[tuple[int, int], float]:
    """Max activations of every feature whose value (or condition threshold) is relative, like `8x`."""
    from .featuredb import FeatureDB, default_db_path, estimate_max_activations, lookup_max_activations

    wanted: dict[tuple[int, str], set[int]] = defaultdict(set)
    for hook, groups in by_hook.items():
        for sae_id, edits in groups.items():
            for e in edits:
                if e.value.relative:
                    wanted[(sae_id, hook)].add(e.feature)
                if e.condition is not None and e.condition.threshold.relative:
                    wanted[(sae_id, hook)].add(e.condition.feature)
    out: dict[tuple[int, int], float] = {}
    for (sae_id, hook), features in wanted.items():
        sae = saes[sae_id]
        feats = sorted(features)
        found = lookup_max_activations(steering.max_activations, sae, feats)
        missing = [f for f in feats if f not in found]
        if missing and steering.max_activations is None:
            folder = getattr(sae, "folder", None)
            db = default_db_path(folder) if folder else None
            if db is not None and db.is_file():
                found.update(FeatureDB(db).max_activations(missing))
                missing = [f for f in feats if f not in found]
        if missing:
            if loaded is None or steering.max_activations is not None:
                raise MonoscopeError(
                    f"values like 8x need the max activation of feature(s) {', '.join(map(str, missing[:5]))}, which "
                    + ("the given max_activations lacks" if steering.max_activations is not None else "is unknown here")
                    + "; run `monoscope analyze` for a feature database, or give plain numbers"
                )
            found.update(estimate_max_activations(loaded, sae, hook, missing))
        for f in feats:
            value = found[f]
            if not (value == value) or value <= 0:
                raise MonoscopeError(
                    f"feature {f} never fired where its max activation was measured (max {value:g}), so a multiple like 8x means nothing; give a plain number"
                )
            out[(sae_id, f)] = float(value)
    return out


# ---------------------------------------------------------------- attaching


class Steerer:
    """What `steer()` yields: the live spec (change it between calls), and the position tracker."""

    def __init__(self, model: nn.Module, loaded: LoadedModel | None, steering: Steering, tracker: PositionTracker):
        self.model, self.loaded, self.steering, self.tracker = model, loaded, steering, tracker

    def begin(self, prompt_length: int | None = None) -> None:
        """Mark the start of a new sequence (optional: `generate` calls are detected on their own)."""
        self.tracker.begin(prompt_length)


@contextmanager
def steer(model: nn.Module | LoadedModel, steering: Steering | None) -> Iterator[Steerer]:
    """Apply `steering` to every forward pass and `generate` call of `model` inside the block; always unhooks.

    `model` is a transformers causal LM or a `LoadedModel` (which also allows estimating max activations
    when no feature database exists). Everything is checked before the block starts. The spec is compiled
    once: to change edits between calls, leave the block and enter a new one (cheap).
    """
    module, loaded = _unwrap(model)
    steering = steering if steering is not None else Steering()
    compiled = steering.compile(model)
    tracker = PositionTracker(steering.skip_first)
    with ExitStack() as stack:
        h1 = module.register_forward_pre_hook(tracker.pre_forward, with_kwargs=True)
        stack.callback(h1.remove)
        h2 = module.register_forward_hook(tracker.post_forward, with_kwargs=True)
        stack.callback(h2.remove)
        fns = {hook: plan.make_fn(tracker, steering) for hook, plan in compiled.plans.items()}
        if fns:
            stack.enter_context(edit(module, fns))
        yield Steerer(module, loaded, steering, tracker)


def load_steering_sae(folder: str | Path, device: str | torch.device | None = "cpu") -> SAE:
    """`load_sae` that also remembers the folder, so the feature database next to it is found."""
    from ..model import resolve_device
    from ..sae import load_sae

    path = Path(folder)
    if not path.exists():
        raise MonoscopeError(
            f"SAE folder {path} does not exist; pass the folder `monoscope train` wrote (with cfg.json)"
        )
    sae = load_sae(path, device=resolve_device(device))
    sae.requires_grad_(False)
    object.__setattr__(sae, "folder", path)
    return sae


def max_activations_for(
    steering_or_sae: Steering | SAE,
    features: list[int],
    loaded: LoadedModel | None = None,
    db: MaxActivationSource | None = None,
) -> Mapping[int, float]:
    """Max activations of `features`: from `db` / the SAE's database, else estimated with `loaded`."""
    from .featuredb import FeatureDB, default_db_path, estimate_max_activations, lookup_max_activations

    sae = steering_or_sae.sae if isinstance(steering_or_sae, Steering) else steering_or_sae
    if sae is None:
        raise MonoscopeError("max activations are per SAE, and this Steering has none: pass the SAE")
    if db is not None:
        return lookup_max_activations(db, sae, features)
    folder = getattr(sae, "folder", None)
    if folder and default_db_path(folder).is_file():
        return FeatureDB(default_db_path(folder)).max_activations(features)
    if loaded is None:
        raise MonoscopeError("no feature database and no model to estimate max activations with")
    hook = sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads (no hook_point in monoscope.json)")
    return estimate_max_activations(loaded, sae, hook, features)
