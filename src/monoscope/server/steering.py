"""Steering translation: the `steering` list of a completion request into a `Steering` over the served
SAEs and vectors, with feature maxima from the feature databases (so `8x` means 8 x the feature's max)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Mapping, Sequence

from ..errors import MonoscopeError
from . import schemas as S
from .errors import ApiError
from .saes import SAERegistry

if TYPE_CHECKING:
    from ..model import LoadedModel
    from ..sae.base import SAE
    from ..steer import Steering
    from ..steer.vectors import SteeringVector

Positions = Literal["all", "prompt", "generated"]


class SteeringTranslator:
    """Builds the `Steering` of one request; every fault is a 400/404 naming the item at fault."""

    def __init__(self, lm: LoadedModel, saes: SAERegistry, vectors: Mapping[str, SteeringVector]):
        self.lm, self.saes, self.vectors = lm, saes, vectors

    def max_activations(self, sae: SAE, features: list[int]) -> dict[int, float]:
        """Each feature's largest activation: from the feature database, else estimated on a little text."""
        served = self.saes.by_object(sae)
        if served.store is not None:
            return {r.id: float(r.max_activation) for r in served.store.features(sorted(set(features)))}
        from ..steer import estimate_max_activations

        return estimate_max_activations(self.lm, sae, served.hook, features)

    def translate(
        self, items: Sequence[S.SteeringItem] | None, strength: float, positions: Positions
    ) -> tuple[Steering | None, S.SteeringApplied | None]:
        """(Steering or None when there is nothing to steer with, its description)."""
        if not items:
            return None, None
        from ..steer import Steering

        default_sae = self.saes.values()[0].sae if len(self.saes) else None
        steering = Steering(default_sae, strength=strength, positions=positions, max_activations=self.max_activations)
        edits, used = [], []
        for i, item in enumerate(items):
            try:
                if item.feature is not None:
                    served = self.saes.get(item.sae)
                    served.check_feature(item.feature, f"steering[{i}].feature")
                    steering.set(item.feature, item.mode, item.value, sae=served.sae, positions=item.positions)
                    edits.append(f"{item.feature}={item.mode}" + ("" if item.mode == "ablate" else f":{item.value}"))
                    used.append(served.id)
                else:
                    vector = self.vectors.get(item.vector or "")
                    if vector is None:
                        listed = ", ".join(self.vectors) or "none (start the server with --vector NAME=FILE)"
                        raise ApiError(
                            400,
                            f"no steering vector {item.vector!r}; served: {listed}",
                            "unknown_vector",
                            f"steering[{i}].vector",
                        )
                    steering.add_vector(vector, item.coefficient, positions=item.positions, label=item.vector or "")
                    edits.append(f"vector {item.vector} x{item.coefficient:g}")
            except MonoscopeError as err:
                raise ApiError(400, str(err), "invalid_steering", f"steering[{i}]") from None
        return steering, S.SteeringApplied(sae=", ".join(sorted(set(used))) or None, edits=edits, strength=strength)
