"""Training checkpoints: everything needed to continue a run exactly, in safetensors + JSON (no pickle).

Layout: `<out>/checkpoints/step-<step>/` holds one `<run>.safetensors` per SAE (its training-form
parameters and buffers, the optimiser's state (Adam's moments and step count, schedule-free's z and counters), tokens since each latent last fired),
`trainer.safetensors` (RNG states) and `state.json` (step, tokens, data position, each SAE's config).
`state.json` is written last, atomically: a folder without it is an unfinished checkpoint and is ignored,
so a crash or a full disk while checkpointing leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .._io import atomic_save_safetensors, atomic_write_json, read_json
from ..errors import MonoscopeError

STATE_FILENAME = "state.json"
TRAINER_FILENAME = "trainer.safetensors"
CHECKPOINT_FORMAT = "monoscope-train-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class RunState:
    """One SAE's share of a checkpoint."""

    tensors: dict[str, Tensor]
    config: dict[str, Any]
    done: bool


def _dir_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILENAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Tensor]:
    """The optimiser's per-parameter state as flat named tensors ("optim.<param>.<field>": Adam's moments and
    step, schedule-free's z), and its per-group counters ("optim_group.<field>") when it keeps any."""
    out: dict[str, Tensor] = {}
    for parameter, state in optimizer.state.items():
        name = names[id(parameter)]
        for key, value in state.items():
            if isinstance(value, Tensor):
                out[f"optim.{name}.{key}"] = value.detach()
            else:
                out[f"optim.{name}.{key}"] = torch.tensor(float(value))
    scalar_state = getattr(optimizer, "scalar_state", None)
    if callable(scalar_state):
        scalars = scalar_state()
        assert isinstance(scalars, dict)
        out.update({f"optim_group.{key}": value for key, value in scalars.items()})
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer, named_parameters: dict[str, Tensor], tensors: dict[str, Tensor]
) -> None:
    """Inverse of `optimizer_tensors`; moments keep the parameter's memory layout, steps stay as Adam keeps them."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in named_parameters.items():
        fields = {}
        for prefix in (f"optim.{name}.", f"adam.{name}."):  # "adam." in checkpoints written before other optimisers
            fields.update({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
        if not fields:
            continue
        group = groups[id(parameter)]
        state: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "step":
                on_device = group.get("fused") or group.get("capturable")
                state[key] = value.to(dtype=torch.float32, device=parameter.device if on_device else "cpu").reshape(())
            else:
                state[key] = torch.empty_like(parameter).copy_(value)
        optimizer.state[parameter] = state
    load_scalar_state = getattr(optimizer, "load_scalar_state", None)
    if callable(load_scalar_state):
        load_scalar_state(
            {key[len("optim_group.") :]: value for key, value in tensors.items() if key.startswith("optim_group.")}
        )


def save_checkpoint(
    root: Path,
    step: int,
    state: dict[str, Any],
    runs: dict[str, RunState],
    file_names: dict[str, str],
    trainer_tensors: dict[str, Tensor],
    keep: int,
) -> Path:
    """Write a checkpoint for `step`, then drop all but the newest `keep` ones; returns its folder."""
    folder = root / _dir_name(step)
    if (folder / STATE_FILENAME).is_file():
        return folder  # the state after a given step is always the same; it is already saved
    if folder.exists():
        shutil.rmtree(folder)
    try:
        for name, run in runs.items():
            if not run.done:
                atomic_save_safetensors(folder / file_names[name], run.tensors)
        atomic_save_safetensors(folder / TRAINER_FILENAME, trainer_tensors)
        body = {
            "format": CHECKPOINT_FORMAT,
            **state,
            "runs": {
                name: {"config": run.config, "done": run.done, "file": None if run.done else file_names[name]}
                for name, run in runs.items()
            },
        }
        atomic_write_json(folder / STATE_FILENAME, body)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for child in root.iterdir():  # unfinished checkpoints left by a crash
        if _STEP_DIR.match(child.name) and not (child / STATE_FILENAME).is_file():
            shutil.rmtree(child, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, RunState], dict[str, Tensor]]:
    """(state.json contents, per-run states, trainer tensors) of a finished checkpoint folder."""
    state = read_json(folder / STATE_FILENAME)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MonoscopeError(f"{folder / STATE_FILENAME} is not a monoscope training checkpoint")
    runs: dict[str, RunState] = {}
    try:
        for name, entry in state["runs"].items():
            tensors = {} if entry["done"] else load_file(str(folder / entry["file"]), device="cpu")
            runs[name] = RunState(tensors=tensors, config=entry["config"], done=bool(entry["done"]))
        trainer_tensors = load_file(str(folder / TRAINER_FILENAME), device="cpu")
    except (SafetensorError, OSError, KeyError) as err:
        raise MonoscopeError(
            f"checkpoint {folder} is damaged ({err}); delete that folder to resume from the one before it"
        ) from err
    return state, runs, trainer_tensors
