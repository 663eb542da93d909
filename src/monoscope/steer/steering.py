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
import warnings
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..errors import MonoscopeError
from ..model import HookPoint, edit, find_blocks
from ..sae.interop import check_model_match
from ..sae.io import sae_hook_point
from .spec import Condition, DirectionEdit, FeatureEdit, Value, check_number, check_positions, parse_feature_spec

# ---------------------------------------------------------------- helpers on models and SAEs


class SteeringWarning(UserWarning):
    """Something is probably wrong (an SAE trained on another model) but steering can still run."""


def _unwrap(model: Any) -> tuple[nn.Module, Any]:
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


def model_name_of(model: nn.Module, loaded: Any = None) -> str | None:
    if loaded is not None and getattr(loaded, "name", None):
        return str(loaded.name)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def check_sae_fits(sae: Any, model: nn.Module, hook: str, loaded: Any = None) -> None:
    """Width must match (error); the recorded model name should (loud warning); the hook must exist."""
    hp = HookPoint.parse(hook)
    n_layers = len(find_blocks(model))
    if hp.layer >= n_layers:
        raise MonoscopeError(f"the SAE reads hook point {hp}, but the model has only {n_layers} layers (0-{n_layers - 1}); use the model the SAE was trained on")
    check_model_match(sae, model_name_of(model, loaded), model_width(model), category=SteeringWarning)


def feature_codes(sae: Any, x: Tensor, features: Tensor) -> Tensor:
    """Activations [n, m] of `features` (LongTensor [m]) for flat input x [n, d_in]: one encoder GEMM.

    TopK needs every pre-activation (a feature is active only when among the k largest); JumpReLU and ReLU
    SAEs need only the wanted encoder columns.
    """
    x = x.to(sae.W_enc.dtype)
    centred = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    arch = sae.cfg.architecture
    if arch == "topk":
        pre = torch.addmm(sae.b_enc, centred, sae.W_enc)
        kth = pre.topk(sae.cfg.k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        picked = pre.index_select(1, features)
        return torch.where(picked >= kth, picked.relu(), torch.zeros_like(picked))
    if arch in ("jumprelu", "standard"):
        pre = torch.addmm(sae.b_enc.index_select(0, features), centred, sae.W_enc.index_select(1, features))
        if arch == "jumprelu":
            return pre.relu() * (pre > sae.threshold.index_select(0, features))
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
        sae: Any = None,
        *,
        strength: float = 1.0,
        positions: str = "all",
        max_activations: Any = None,
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

    def _sae(self, sae: Any) -> Any:
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
        sae: Any = None,
        positions: str | None = None,
        when: "Condition | str | None" = None,
        hook: str | None = None,
    ) -> "Steering":
        """Set (or replace) the edit of `feature`; `when` makes it conditional (`Condition` or 'ID>THRESHOLD')."""
        sae = self._sae(sae)
        condition = Condition.parse(when) if isinstance(when, str) else when
        new = FeatureEdit(sae=sae, feature=feature, mode=mode, value=value, positions=positions, condition=condition, hook=hook)
        self.feature_edits = [e for e in self.feature_edits if not (e.sae is sae and e.feature == new.feature and e.hook == new.hook)]
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

    def remove(self, feature: int, *, sae: Any = None) -> bool:
        """Drop the edit(s) of `feature`; whether there was one."""
        sae = sae if sae is not None else self.sae
        before = len(self.feature_edits)
        self.feature_edits = [e for e in self.feature_edits if not (e.feature == int(feature) and (sae is None or e.sae is sae))]
        return len(self.feature_edits) < before

    def reset(self) -> "Steering":
        self.feature_edits.clear()
        self.direction_edits.clear()
        self.strength = 1.0
        return self

    def parse(self, specs: "str | list[str]", *, sae: Any = None, positions: str | None = None, when: "Condition | str | None" = None) -> "Steering":
        """Add CLI-style specs: `ID=clamp:VALUE`, `ID=add:VALUE`, `ID=multiply:M`, `ID=ablate`, `ID=VALUE` (clamp)."""
        for spec in [specs] if isinstance(specs, str) else list(specs):
            feature, mode, value = parse_feature_spec(spec)
            self.set(feature, mode, value, sae=sae, positions=positions, when=when)
        return self

    # ---- direction edits ---------------------------------------------------------------------------

    def orthogonal(self, direction: Tensor, hook: str, c: float = 0.0, *, positions: str | None = None, label: str = "") -> "Steering":
        """Set the component of the activation along `direction` (made unit) to `c` times itself."""
        self.direction_edits.append(DirectionEdit(str(HookPoint.parse(hook)), direction, "orthogonal", c, positions, label))
        return self

    def cap(self, direction: Tensor, hook: str, value: float, *, positions: str | None = None, label: str = "") -> "Steering":
        """Cap the component of the activation along `direction` (made unit) at `value`."""
        self.direction_edits.append(DirectionEdit(str(HookPoint.parse(hook)), direction, "cap", value, positions, label))
        return self

    def add_vector(self, vector: Any, coefficient: float = 1.0, *, hook: str | None = None, positions: str | None = None, label: str = "") -> "Steering":
        """Add `coefficient` x a vector: a raw tensor at `hook`, or a `SteeringVector` (each of its hook points)."""
        directions = getattr(vector, "directions", None)
        if directions is not None:
            for point, tensor in directions.items():
                if hook is None or str(HookPoint.parse(hook)) == point:
                    self.direction_edits.append(DirectionEdit(point, tensor, "add", coefficient, positions, label or getattr(vector, "name", "") or "vector"))
            return self
        if hook is None:
            raise MonoscopeError("add_vector with a plain tensor needs hook= (e.g. resid_post.12)")
        self.direction_edits.append(DirectionEdit(str(HookPoint.parse(hook)), vector, "add", coefficient, positions, label or "vector"))
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

    def compile(self, model: Any) -> "CompiledSteering":
        """Check everything against `model` and resolve values; errors come here, before any generation."""
        module, loaded = _unwrap(model)
        return CompiledSteering.build(self, module, loaded)


# ---------------------------------------------------------------- positions


@dataclass
class _Call:
    """One forward pass of the model: where its tokens sit in the sequence."""

    start: int
    length: int
    prompt_len: int
    ids: Tensor | None
    masks: dict = field(default_factory=dict)


class PositionTracker:
    """Follows `generate` through its forward calls: which positions are prompt and which are generated."""

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
                prev is not None and prev[0] == 0 and length == prev[1] + 1 and self.prompt_len is not None
                and (ids is None or prev[2] is None or (prev[2].shape[0] == batch and torch.equal(ids[:, : prev[1]], prev[2])))
            )
            if not continuation:
                self.prompt_len = self._forced if self._forced is not None else length
                self._forced = None
        elif length > 1 or self.prompt_len is None:
            self.prompt_len = past + length  # a new chunk of prompt on top of a cache
        self._prev = (past, length, ids.detach() if ids is not None else None)
        self.current = _Call(start=past, length=length, prompt_len=int(self.prompt_len), ids=ids)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.current = None

    def mask(self, positions: str, batch: int, length: int, device: torch.device) -> Tensor | None:
        """Bool [batch * length] of the positions to edit, or None for all of them."""
        call = self.current
        if call is None or call.length != length:
            call = _Call(start=0, length=length, prompt_len=length, ids=None)  # a bare forward: all prompt
        key = (positions, batch, device)
        if key in call.masks:
            return call.masks[key]
        mask = None
        if positions != "all":
            where = torch.arange(call.start, call.start + length, device=device)
            keep = where < call.prompt_len if positions == "prompt" else where >= call.prompt_len
            mask = keep.unsqueeze(0).expand(batch, length)
        if self.skip_first and call.start == 0:
            first = torch.ones(batch, length, dtype=torch.bool, device=device)
            first[:, 0] = False
            mask = first if mask is None else (mask & first)
        mask = None if mask is None else mask.reshape(-1)
        if mask is not None and bool(mask.all()):
            mask = None
        call.masks[key] = mask
        return mask


def _past_length(cache: Any) -> int:
    if cache is None:
        return 0
    getter = getattr(cache, "get_seq_length", None)
    if callable(getter):
        try:
            return int(getter())
        except Exception:
            return 0
    try:  # legacy tuple-of-tuples cache: [layer][key/value] with shape [B, H, T, D]
        return int(cache[0][0].shape[-2])
    except Exception:
        return 0


# ---------------------------------------------------------------- the compiled form


@dataclass
class _FeatureGroup:
    """All feature edits on one SAE at one hook point."""

    sae: Any
    needed: Tensor  # LongTensor [m]: features whose activation is read (edits needing f, conditions)
    edit_features: Tensor  # LongTensor [n]
    decoder: Tensor  # [n, d] rows of W_dec
    kind: Tensor  # [n] 0 clamp, 1 add, 2 multiply, 3 ablate
    values: Tensor  # [n] resolved values (clamp target, add amount, multiplier)
    positions: list[str]
    edit_slot: Tensor  # [n] column in `needed` of each edit's own feature (-1: not read)
    cond_slot: list[int | None]  # column in `needed` of each edit's condition feature
    cond_threshold: list[float]

    def delta(self, x: Tensor, tracker: PositionTracker, strength: float) -> Tensor:
        batch, length, d = x.shape[0], x.shape[1], x.shape[-1]
        flat = x.reshape(-1, d)
        n_tok = flat.shape[0]
        codes = feature_codes(self.sae, flat, self.needed) if self.needed.numel() else None
        own = torch.zeros(n_tok, len(self.positions), dtype=self.decoder.dtype, device=flat.device)
        if codes is not None:
            has = self.edit_slot >= 0
            if has.any():
                own[:, has] = codes[:, self.edit_slot[has]].to(own.dtype)
        values = self.values.to(own.dtype)
        coef = torch.where(self.kind == 0, values - own, torch.where(self.kind == 1, values.expand_as(own), torch.where(self.kind == 2, (values - 1) * own, -own)))
        for j, positions in enumerate(self.positions):
            keep = tracker.mask(positions, batch, length, flat.device)
            slot = self.cond_slot[j]
            if slot is not None:
                active = codes[:, slot] > self.cond_threshold[j]
                keep = active if keep is None else keep & active
            if keep is not None:
                coef[:, j] = coef[:, j] * keep.to(coef.dtype)
        return (strength * coef @ self.decoder).reshape(batch, length, d)


@dataclass
class _DirectionPlan:
    mode: str
    direction: Tensor  # [d] unit for orthogonal/cap
    value: float
    positions: str

    def apply(self, x: Tensor, tracker: PositionTracker, strength: float) -> Tensor:
        batch, length, d = x.shape[0], x.shape[1], x.shape[-1]
        r = self.direction.to(device=x.device, dtype=torch.float32)
        xf = x.float()
        if self.mode == "add":
            change = (strength * self.value) * r.expand(batch, length, d)
        else:
            comp = xf @ r  # [B, T]
            amount = (self.value - 1.0) * comp if self.mode == "orthogonal" else -(comp - self.value).clamp_min(0)
            change = (strength * amount).unsqueeze(-1) * r
        keep = tracker.mask(self.positions, batch, length, x.device)
        if keep is not None:
            change = change * keep.view(batch, length, 1).to(change.dtype)
        return (xf + change).to(x.dtype)


@dataclass
class _HookPlan:
    hook: str
    groups: list[_FeatureGroup]
    directions: list[_DirectionPlan]

    def make_fn(self, tracker: PositionTracker, steering: Steering):
        def fn(x: Tensor) -> Tensor | None:
            if x.dim() == 2:  # unbatched: [T, d]
                out = fn(x.unsqueeze(0))
                return None if out is None else out.squeeze(0)
            strength = steering.strength
            out = x
            if self.groups:
                delta = None
                for group in self.groups:
                    with torch.no_grad():
                        part = group.delta(x.detach(), tracker, strength)
                    delta = part if delta is None else delta + part
                out = x + delta.to(x.dtype)
            for plan in self.directions:
                out = plan.apply(out, tracker, strength)
            return out

        return fn


_KIND = {"clamp": 0, "add": 1, "multiply": 2, "ablate": 3}


@dataclass
class CompiledSteering:
    plans: dict[str, _HookPlan]
    steering: Steering

    @classmethod
    def build(cls, steering: Steering, model: nn.Module, loaded: Any) -> "CompiledSteering":
        from ..model import resolve

        device = next(model.parameters()).device
        width = model_width(model)
        by_hook: dict[str, dict[int, list[FeatureEdit]]] = defaultdict(dict)
        saes: dict[int, Any] = {}
        checked: set[tuple[int, str]] = set()
        for e in steering.feature_edits:
            hook = str(HookPoint.parse(e.hook)) if e.hook else sae_hook_point(e.sae)
            if hook is None:
                raise MonoscopeError("the SAE does not say which hook point it reads (no hook_point in monoscope.json); pass hook=")
            if (id(e.sae), hook) not in checked:
                resolve(model, hook)
                check_sae_fits(e.sae, model, hook, loaded)
                checked.add((id(e.sae), hook))
            if e.feature >= e.sae.cfg.d_sae:
                raise MonoscopeError(f"feature id {e.feature} does not exist: this SAE has {e.sae.cfg.d_sae} features (0-{e.sae.cfg.d_sae - 1})")
            if e.condition is not None:
                cond_sae = e.condition.sae if e.condition.sae is not None else e.sae
                if cond_sae is not e.sae:
                    raise MonoscopeError("a condition must be a feature of the same SAE as the edit it gates")
                if e.condition.feature >= e.sae.cfg.d_sae:
                    raise MonoscopeError(f"condition feature id {e.condition.feature} does not exist: this SAE has {e.sae.cfg.d_sae} features")
            saes[id(e.sae)] = e.sae
            by_hook[hook].setdefault(id(e.sae), []).append(e)
        for d in steering.direction_edits:
            resolve(model, d.hook)
            if width is not None and d.direction.numel() != width:
                raise MonoscopeError(f"a direction at {d.hook} has {d.direction.numel()} numbers but the model's width is {width}; it was made for another model")
        maxima = _resolve_maxima(steering, model, loaded, by_hook, saes)

        plans: dict[str, _HookPlan] = {}
        for hook, groups in by_hook.items():
            plan = plans.setdefault(hook, _HookPlan(hook, [], []))
            for sae_id, edits in groups.items():
                sae = saes[sae_id]
                if sae.W_dec.device != device:
                    raise MonoscopeError(f"the SAE is on {sae.W_dec.device} but the model is on {device}; load both on the same device")
                needed: list[int] = []

                def slot(feature: int) -> int:
                    if feature not in needed:
                        needed.append(feature)
                    return needed.index(feature)

                values, edit_slot, cond_slot, cond_thr = [], [], [], []
                for e in edits:
                    m = maxima.get((sae_id, e.feature))
                    values.append(e.value.resolve(m, f"the value of feature {e.feature}"))
                    edit_slot.append(slot(e.feature) if e.mode != "add" else -1)
                    if e.condition is not None:
                        cond_slot.append(slot(e.condition.feature))
                        mc = maxima.get((sae_id, e.condition.feature))
                        cond_thr.append(e.condition.threshold.resolve(mc, f"the threshold of condition feature {e.condition.feature}"))
                    else:
                        cond_slot.append(None)
                        cond_thr.append(0.0)
                idx = torch.tensor([e.feature for e in edits], dtype=torch.long, device=sae.W_dec.device)
                plan.groups.append(
                    _FeatureGroup(
                        sae=sae,
                        needed=torch.tensor(needed, dtype=torch.long, device=sae.W_dec.device),
                        edit_features=idx,
                        decoder=sae.W_dec.detach().index_select(0, idx).float(),
                        kind=torch.tensor([_KIND[e.mode] for e in edits], device=sae.W_dec.device),
                        values=torch.tensor(values, dtype=torch.float32, device=sae.W_dec.device),
                        positions=[e.positions or steering.positions for e in edits],
                        edit_slot=torch.tensor(edit_slot, dtype=torch.long, device=sae.W_dec.device),
                        cond_slot=cond_slot,
                        cond_threshold=cond_thr,
                    )
                )
        for d in steering.direction_edits:
            plan = plans.setdefault(d.hook, _HookPlan(d.hook, [], []))
            plan.directions.append(_DirectionPlan(d.mode, d.direction.to(device), d.value, d.positions or steering.positions))
        return cls(plans=plans, steering=steering)


def _resolve_maxima(steering: Steering, model: nn.Module, loaded: Any, by_hook: dict, saes: dict) -> dict[tuple[int, int], float]:
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
                raise MonoscopeError(f"feature {f} never fired where its max activation was measured (max {value:g}), so a multiple like 8x means nothing; give a plain number")
            out[(sae_id, f)] = float(value)
    return out


# ---------------------------------------------------------------- attaching


class Steerer:
    """What `steer()` yields: the live spec (change it between calls), and the position tracker."""

    def __init__(self, model: nn.Module, loaded: Any, steering: Steering, tracker: PositionTracker):
        self.model, self.loaded, self.steering, self.tracker = model, loaded, steering, tracker

    def begin(self, prompt_length: int | None = None) -> None:
        """Mark the start of a new sequence (optional: `generate` calls are detected on their own)."""
        self.tracker.begin(prompt_length)


@contextmanager
def steer(model: Any, steering: Steering | None) -> Iterator[Steerer]:
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


def load_steering_sae(folder: str | Path, device: str | torch.device | None = "cpu") -> Any:
    """`load_sae` that also remembers the folder, so the feature database next to it is found."""
    from ..model import resolve_device
    from ..sae import load_sae

    path = Path(folder)
    if not path.exists():
        raise MonoscopeError(f"SAE folder {path} does not exist; pass the folder `monoscope train` wrote (with cfg.json)")
    sae = load_sae(path, device=resolve_device(device))
    sae.requires_grad_(False)
    object.__setattr__(sae, "folder", path)
    return sae


def max_activations_for(steering_or_sae: Any, features: list[int], loaded: Any = None, db: Any = None) -> Mapping[int, float]:
    """Max activations of `features`: from `db` / the SAE's database, else estimated with `loaded`."""
    from .featuredb import FeatureDB, default_db_path, estimate_max_activations, lookup_max_activations

    sae = steering_or_sae.sae if isinstance(steering_or_sae, Steering) else steering_or_sae
    if db is not None:
        return lookup_max_activations(db, sae, features)
    folder = getattr(sae, "folder", None)
    if folder and default_db_path(folder).is_file():
        return FeatureDB(default_db_path(folder)).max_activations(features)
    if loaded is None:
        raise MonoscopeError("no feature database and no model to estimate max activations with")
    return estimate_max_activations(loaded, sae, sae_hook_point(sae), features)
