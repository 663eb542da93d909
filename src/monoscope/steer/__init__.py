"""Stage 5: interventions. Steer a model by turning SAE features up, down or off, add steering vectors,
ablate directions (and bake the ablation into the weights), and attribute a prediction to features.

    from monoscope.model import load_model
    from monoscope.steer import Steering, steer, generate, load_steering_sae

    lm = load_model("smollm2-135m-instruct")
    sae = load_steering_sae("runs/quickstart/sae")
    s = Steering(sae).clamp(1234, "8x").add(99, 4).ablate(7)     # the equalizer; s.strength = 0.5
    print(generate(lm, "Tell me about yourself.", steering=s).text)
    with steer(lm, s):                                           # or around any forward / generate call
        lm.model.generate(...)

See docs/steering.md for the formulas, the CLI (`monoscope steer`, `chat`, `attribute`, `suggest`,
`vector`, `ablate-direction`) and measured numbers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # spec and application
    "Steering": "steering",
    "Steerer": "steering",
    "SteeringWarning": "steering",
    "PositionTracker": "steering",
    "steer": "steering",
    "feature_codes": "steering",
    "load_steering_sae": "steering",
    "FeatureEdit": "spec",
    "DirectionEdit": "spec",
    "Condition": "spec",
    "Value": "spec",
    "parse_feature_spec": "spec",
    "FEATURE_MODES": "spec",
    "POSITIONS": "spec",
    # generation
    "generate": "generation",
    "compare": "generation",
    "encode_prompt": "runtime",
    "Generation": "runtime",
    "generate_batch": "batch",
    "BatchEngine": "batch",
    "SamplingParams": "runtime",
    "Request": "batch",
    "RowResult": "batch",
    # feature database access
    "FeatureDB": "featuredb",
    "estimate_max_activations": "featuredb",
    # steering vectors
    "SteeringVector": "vectors",
    "contrastive_vector": "vectors",
    "export_gguf": "vectors",
    "read_gguf": "vectors",
    # directional ablation
    "directional_ablation": "ablation",
    "orthogonalize_weights": "ablation",
    "save_orthogonalized": "ablation",
    # attribution and suggestions
    "attribute": "attribution",
    "Attribution": "attribution",
    "suggest_features": "suggest",
    "Suggestion": "suggest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monoscope.steer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
