"""Training SAEs on a stream of activation batches, independent of any language model.

Entry points
- `train_sae(config, batches, out_dir)`: one SAE; `batches` yields float tensors [n, d_in] (already
  normalised; n need not equal the batch size, chunks are re-cut into batches of `config.batch_size`).
- `train_saes(configs, batches, out_dir)`: several SAEs from one pass over a stream of
  `dict[str, Tensor]` (key = hook point such as "resid_post.15"); each config's `hook_name` picks its
  tensor, so several hook points, or several widths/k on one hook point, train together. All configs
  must share the batch size; each follows its own token budget and schedule.
- `train_from_batches(batches, out, d_sae=..., k=..., tokens=...)`: `train_sae` with CLI-style arguments.

The batch source protocol (what makes exact resume possible)
- Any iterable works. To resume, the trainer needs the data from where the checkpoint was taken: it
  iterates the source again from the start and reads and drops the chunks already consumed.
- A source may instead provide `iter_from(batch_index: int) -> Iterator`, which restarts the stream at
  chunk `batch_index` (0-based, counted in the source's own chunks); resuming then costs nothing. It must
  yield the same chunks as a fresh iteration would from that index on.
Resuming with the same configs and data gives the same parameters as an uninterrupted run.

Outputs (per SAE folder: `out_dir` for `train_sae`, `out_dir/<name>` for `train_saes`)
- the trained SAE in SAELens's format (`cfg.json`, `sae_weights.safetensors`) + `monoscope.json`
  (see `io.py`), written when that SAE's token budget is reached; the activation scale is folded in,
  so it takes raw activations;
- `train_log.jsonl`: one line per step: step, tokens, loss, mse, fvu, l0, dead_frac, lr, aux_loss
  (+ architecture extras such as BatchTopK's threshold);
- `train_config.json`: the resolved config.
Checkpoints go to `out_dir/checkpoints/` every `checkpoint_every_tokens` tokens (default: a tenth of
the run, at most 50M tokens apart), and when the run is interrupted with Ctrl-C (the first Ctrl-C
finishes the current step and saves; a second one stops at once). They are deleted once every SAE is
saved. Batches or losses with NaN/inf stop training with a `MonoscopeError` naming the step; the last
good checkpoint is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .._io import atomic_write_bytes, atomic_write_json
from ..errors import MonoscopeError
from ..progress import progress_bar
from .base import SAE
from .checkpoint import (
    RunState,
    list_checkpoints,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from .config import TrainConfig
from .io import INFO_FILENAME, read_sae_folder, save_sae
from .metrics import evaluate_reconstruction
from .optim import OptimizerConfig, evaluation_weights, make_optimizer, optimizer_config
from .stream import BatchStream, DataPosition, peek_width
from .training import StepContext, StepOutput, training_class

CHECKPOINT_DIRNAME = "checkpoints"
LOG_FILENAME = "train_log.jsonl"
CONFIG_FILENAME = "train_config.json"
MAX_CHECKPOINT_INTERVAL = 50_000_000
GEOMETRIC_MEDIAN_SAMPLE = 8192


@dataclass
class TrainResult:
    """One trained SAE: its inference form (as saved), where it is, and how far training got."""

    name: str
    sae: SAE
    folder: Path
    steps: int
    tokens: int
    complete: bool  # False when the stream ended before the token budget
    final_metrics: dict[str, float] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Run:
    """One SAE being trained: model, optimiser, dead-latent counters, log."""

    def __init__(self, name: str, cfg: TrainConfig, folder: Path, device: torch.device) -> None:
        self.name = name
        self.cfg = cfg
        self.folder = folder
        self.device = device
        self.sae = training_class(cfg.architecture)(cfg, device=device)
        self.optimizer = make_optimizer(self.sae.parameters(), cfg.optim, device)
        self.tokens_since_fired = torch.zeros(cfg.width, dtype=torch.int64, device=device)
        self.step = 0
        self.done = False
        self.result: TrainResult | None = None
        self.pending_logs: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        self.param_names = {id(p): n for n, p in self.sae.named_parameters()}
        self.checked_width = False
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first step whose loss was NaN/inf

    @property
    def key(self) -> str:
        return self.cfg.hook_name

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        tensors = {f"sae.{name}": value for name, value in self.sae.state_dict().items()}
        tensors.update(optimizer_tensors(self.optimizer, self.param_names))
        tensors["tokens_since_fired"] = self.tokens_since_fired
        return tensors

    def inference_sae(self) -> SAE:
        """The SAE as it is evaluated and saved (schedule-free: the averaged weights), activation scale not folded."""
        with evaluation_weights(self.optimizer):
            return self.sae.to_inference()

    def restore(self, tensors: dict[str, Tensor]) -> None:
        state = {key[len("sae.") :]: value for key, value in tensors.items() if key.startswith("sae.")}
        with torch.no_grad():
            for name, target in self.sae.state_dict().items():
                target.copy_(state[name])
        restore_optimizer(self.optimizer, dict(self.sae.named_parameters()), tensors)
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])


class _NullBar:
    """Stands in for the progress bar when progress display is off."""

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class _InterruptGuard:
    """The first Ctrl-C asks the loop to checkpoint and stop after the current step; a second stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nmonoscope: stopping after this step to save a checkpoint (Ctrl-C again to stop now)", file=sys.stderr)

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except ValueError:
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


class SAETrainer:
    """Trains one or more SAEs on one activation stream; see the module docstring.

    configs: SAE name -> config (names become folders unless `single`); all share the batch size.
    out_dir: where SAEs, logs and checkpoints go; `single=True` puts the one SAE in `out_dir` itself.
    device: "cpu", "cuda", ... (default: CUDA when available).
    checkpoint_every_tokens: default a tenth of the longest run, at most 50M tokens.
    keep_checkpoints: how many recent checkpoints to keep while training (all go once every SAE is saved).
    resume: continue from the newest checkpoint in `out_dir` (or return SAEs already saved there with the
        same config); with False, an `out_dir` holding a run is an error.
    info: facts recorded in each saved SAE's monoscope.json (model, corpus, ...).
    log_flush_steps: how often the JSONL log and progress bar are updated (every step is logged).
    finite_check_steps: how often the loss is checked for NaN/inf (default: every step on CPU, every 32 on a GPU,
        where reading it back waits for the step); the error names the first bad step, and checkpoints, held-out
        evaluations and saved SAEs are always checked first.
    held_out: activations never trained on (one tensor for every SAE, or {hook name: tensor}), in the units of
        the batches; the SAE's inference form is scored on them every `eval_every_tokens` tokens (default: a tenth
        of the run) and at the end, logged as held_out_fvu, held_out_l0, ... in train_log.jsonl.
    """

    world_size = 1  # processes sharing each step's batch (distributed.py); dead-latent counters count all of them

    def __init__(
        self,
        configs: Mapping[str, TrainConfig],
        out_dir: str | os.PathLike,
        *,
        single: bool = False,
        device: str | torch.device | None = None,
        checkpoint_every_tokens: int | None = None,
        keep_checkpoints: int = 2,
        resume: bool = True,
        progress: bool = True,
        info: Mapping[str, Any] | None = None,
        log_flush_steps: int = 20,
        held_out: Tensor | Mapping[str, Tensor] | None = None,
        eval_every_tokens: int | None = None,
        finite_check_steps: int | None = None,
    ) -> None:
        if not configs:
            raise MonoscopeError("no SAE to train: give at least one config")
        batch_sizes = {cfg.batch_size for cfg in configs.values()}
        if len(batch_sizes) > 1:
            raise MonoscopeError(f"SAEs trained from one stream must share the batch size; got {sorted(batch_sizes)}")
        if single and len(configs) != 1:
            raise ValueError("single=True needs exactly one config")
        if checkpoint_every_tokens is not None and checkpoint_every_tokens <= 0:
            raise MonoscopeError(
                f"checkpoint interval must be a positive number of tokens, got {checkpoint_every_tokens}"
            )
        self.configs = dict(configs)
        self.out_dir = Path(out_dir)
        self.single = single
        self.device = torch.device(device or default_device())
        self.batch_size = batch_sizes.pop()
        longest = max(cfg.total_steps for cfg in self.configs.values()) * self.batch_size
        if checkpoint_every_tokens is None:
            checkpoint_every_tokens = min(MAX_CHECKPOINT_INTERVAL, max(self.batch_size, longest // 10))
        self.checkpoint_every_steps = max(1, checkpoint_every_tokens // self.batch_size)
        self.keep_checkpoints = max(1, keep_checkpoints)
        self.resume = resume
        self.progress = progress
        self.info = dict(info or {})
        self.log_flush_steps = max(1, log_flush_steps)
        self.held_out = self._check_held_out(held_out)
        if eval_every_tokens is not None and eval_every_tokens <= 0:
            raise MonoscopeError(f"evaluation interval must be a positive number of tokens, got {eval_every_tokens}")
        if eval_every_tokens is not None and held_out is None:
            raise MonoscopeError("eval_every_tokens needs held-out activations to evaluate on (held_out=...)")
        self.eval_every_steps = max(1, (eval_every_tokens or longest // 10) // self.batch_size)
        if finite_check_steps is not None and finite_check_steps <= 0:
            raise MonoscopeError(f"finite_check_steps must be positive, got {finite_check_steps}")
        # On CPU reading the loss costs nothing; on a GPU it would wait for the step to finish, every step.
        self.finite_check_steps = finite_check_steps or (1 if self.device.type == "cpu" else 32)
        self.checkpoint_root = self.out_dir / CHECKPOINT_DIRNAME
        self.step = 0
        self.position = DataPosition()
        self._last_checkpoint: Path | None = None

    def _check_held_out(self, held_out: Tensor | Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        """Held-out activations per SAE (same units as the training batches), checked before any training."""
        if held_out is None:
            return None
        per_run = {}
        for name, cfg in self.configs.items():
            x = held_out if isinstance(held_out, Tensor) else held_out.get(cfg.hook_name)
            if x is None:
                has = ", ".join(held_out) if isinstance(held_out, Mapping) else "one tensor"
                raise MonoscopeError(
                    f"no held-out activations for {cfg.hook_name or name!r}; held_out has {has or 'none'}"
                )
            if x.ndim < 2 or x.shape[-1] != cfg.d_in or x.numel() == 0:
                raise MonoscopeError(
                    f"held-out activations for {name!r} must be [tokens, {cfg.d_in}], got {list(x.shape)}"
                )
            per_run[name] = x.reshape(-1, cfg.d_in)
        return per_run

    # ---- layout --------------------------------------------------------------------------------------

    def run_folder(self, name: str) -> Path:
        return self.out_dir if self.single else self.out_dir / name

    def _file_names(self) -> dict[str, str]:
        return {name: ("sae" if self.single else name) + ".safetensors" for name in self.configs}

    # ---- public --------------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Any]) -> dict[str, TrainResult]:
        """Train every SAE on `batches` (resuming from the last checkpoint when there is one)."""
        runs = {name: _Run(name, cfg, self.run_folder(name), self.device) for name, cfg in self.configs.items()}
        resumed = self._restore_or_start(runs)
        for run in runs.values():
            if not run.done:
                run.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_json(run.folder / CONFIG_FILENAME, run.cfg.to_dict())
                self._prepare_log(run, resumed)
        if all(run.done for run in runs.values()):
            return {name: run.result for name, run in runs.items() if run.result is not None}
        keys = tuple(dict.fromkeys(run.key for run in runs.values() if not run.done))
        single_key = keys[0] if len(keys) == 1 else None  # plain tensors serve every SAE when all read one hook
        stream = BatchStream(batches, self.batch_size, keys, single_key, self.position)
        total_tokens = max(cfg.total_steps for cfg in self.configs.values()) * self.batch_size
        description = "training SAE" + ("s" if len(runs) > 1 else "")
        if self.progress:
            bar = progress_bar(total=total_tokens, desc=description, unit="tok", initial=self.step * self.batch_size)
        else:
            bar = _NullBar()
        started = time.perf_counter()
        try:
            with _InterruptGuard() as guard:
                self._loop(runs, stream, resumed, bar, guard, started)
        finally:
            bar.close()
        return {name: run.result for name, run in runs.items() if run.result is not None}

    # ---- the loop ------------------------------------------------------------------------------------

    def _loop(
        self,
        runs: dict[str, _Run],
        stream: BatchStream,
        resumed: bool,
        bar: Any,
        guard: _InterruptGuard,
        started: float,
    ) -> None:
        initialised = resumed
        while not all(run.done for run in runs.values()):
            try:
                batch = stream.next_batch()
            except KeyboardInterrupt:
                self._flush_logs(runs)
                self._checkpoint(runs)
                raise
            if batch is None:
                self._stream_ended(runs, started)
                return
            active = [run for run in runs.values() if not run.done]
            inputs = {}
            for run in active:
                inputs[run.name] = self._check_batch(run, batch[run.key])
            if not initialised:
                self._initialise(active, inputs)
                initialised = True
            for run in active:
                self._train_step(run, inputs[run.name])
            self.step += 1
            self.position = stream.position
            bar.update(self.batch_size)
            if self.step % self.finite_check_steps == 0:
                self._verify_finite(active)
            if self.step % self.log_flush_steps == 0:
                self._flush_logs(runs)
                bar.set_postfix_str(self._postfix(runs), refresh=False)
            finishing = [run for run in active if run.step >= run.cfg.total_steps]
            if finishing:
                self._verify_finite(finishing)
            for run in finishing:
                self._finish(run, complete=True, started=started)
            if guard.requested:
                self._flush_logs(runs)
                self._checkpoint(runs)
                raise KeyboardInterrupt
            if self.step % self.checkpoint_every_steps == 0 and not all(run.done for run in runs.values()):
                self._flush_logs(runs)
                self._checkpoint(runs)
        self._flush_logs(runs)
        shutil.rmtree(self.checkpoint_root, ignore_errors=True)

    def _check_batch(self, run: _Run, x: Tensor) -> Tensor:
        if not run.checked_width:
            if x.shape[-1] != run.cfg.d_in:
                raise MonoscopeError(
                    f"activations for {run.key or run.name!r} have d={x.shape[-1]} but the SAE expects d_in={run.cfg.d_in}"
                )
            run.checked_width = True
        if not x.is_floating_point():
            raise MonoscopeError(f"activations for {run.key or run.name!r} must be floating point, got {x.dtype}")
        return x.to(device=self.device, dtype=torch.float32, non_blocking=True)

    def _reject_non_finite(self, run: _Run, x: Tensor) -> None:
        """Raise if the batch has NaN/inf. Checked when initialising and when a loss is not finite: a bad
        value in the batch always reaches the loss, so a clean step costs no extra pass over the batch."""
        if not bool(torch.isfinite(x).all()):
            raise MonoscopeError(
                f"step {self.step + 1}: the activation batch for {run.key or run.name!r} contains NaN or inf values; "
                f"training stopped. {self._kept_checkpoint_text()}"
            )

    def _verify_finite(self, runs: Iterable[_Run]) -> None:
        """Raise if a step since the last check had a non-finite loss (one device sync for all SAEs).

        Called every `finite_check_steps` steps and before anything is checkpointed, evaluated or saved, so a
        checkpoint never holds weights that a NaN has reached."""
        pending = [run for run in runs if not run.done]
        if self.finite_check_steps == 1 or not pending:
            return
        firsts = torch.stack([run.first_bad_step for run in pending]).tolist()
        for run, first in zip(pending, firsts):
            if first >= 0:
                raise MonoscopeError(
                    f"step {first} of {run.name!r}: the loss became NaN or inf; training stopped (NaN/inf in the "
                    f"activations, or try a lower learning rate). {self._kept_checkpoint_text()}"
                )

    def _kept_checkpoint_text(self) -> str:
        if self._last_checkpoint is not None:
            return (
                f"The last good checkpoint ({self._last_checkpoint}) is kept; fix the activations and rerun to resume."
            )
        return "No checkpoint had been written yet."

    def _initialise(self, runs: list[_Run], inputs: dict[str, Tensor]) -> None:
        for run in runs:
            self._reject_non_finite(run, inputs[run.name])
            generator = torch.Generator().manual_seed(run.cfg.seed)
            sample = inputs[run.name][:GEOMETRIC_MEDIAN_SAMPLE].to("cpu")
            run.sae.initialize(sample, generator)

    def _after_backward(self, run: _Run, output: StepOutput) -> None:
        """Between backward and the optimiser step; `distributed.py` all-reduces gradients here."""

    def _train_step(self, run: _Run, x: Tensor) -> None:
        cfg = run.cfg
        lr = cfg.lr_at(run.step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        assert cfg.dead_tokens is not None
        dead_mask = run.tokens_since_fired >= cfg.dead_tokens
        ctx = StepContext(step=run.step, total_steps=cfg.total_steps, dead_mask=dead_mask)
        output = run.sae.training_forward(x, ctx)
        if self.finite_check_steps == 1:
            if not bool(torch.isfinite(output.loss)):
                self._reject_non_finite(run, x)
                raise MonoscopeError(
                    f"step {run.step + 1} of {run.name!r}: the loss became {float(output.loss.detach())}; training stopped "
                    f"(try a lower learning rate). {self._kept_checkpoint_text()}"
                )
        else:  # remember the first non-finite step on the device; `_verify_finite` reads it now and then
            with torch.no_grad():
                bad = ~torch.isfinite(output.loss.detach()) & (run.first_bad_step < 0)
                run.first_bad_step.copy_(torch.where(bad, run.step + 1, run.first_bad_step))
        run.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        self._after_backward(run, output)
        run.sae.before_optimizer_step()
        assert cfg.max_grad_norm is not None
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.sae.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.sae.after_optimizer_step()
        with torch.no_grad():
            run.tokens_since_fired.add_(x.shape[0] * self.world_size)
            if output.fired is not None:
                run.tokens_since_fired[output.fired] = 0
        run.step += 1
        record: dict[str, Any] = {"step": run.step, "tokens": run.step * self.batch_size, "lr": lr}
        record.update(output.metrics)
        record["dead_frac"] = dead_mask.float().mean()
        if self.held_out is not None and (run.step % self.eval_every_steps == 0 or run.step >= cfg.total_steps):
            self._verify_finite([run])
            record.update(self._evaluate_held_out(run))
        run.pending_logs.append(record)

    @torch.no_grad()
    def _evaluate_held_out(self, run: _Run) -> dict[str, float]:
        """SAEBench metrics of the SAE's inference form on the held-out activations (logged as held_out_*)."""
        assert self.held_out is not None
        metrics = evaluate_reconstruction(run.inference_sae(), self.held_out[run.name].split(self.batch_size))
        assert not isinstance(metrics, tuple)
        return {
            f"held_out_{key}": float(getattr(metrics, key))
            for key in ("fvu", "l0", "mse", "cosine_similarity", "frac_alive")
        }

    # ---- logs and progress ---------------------------------------------------------------------------

    def _prepare_log(self, run: _Run, resumed: bool) -> None:
        path = run.folder / LOG_FILENAME
        if resumed and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if entry.get("step", 0) <= run.step:
                    kept.append(line)
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        else:
            atomic_write_bytes(path, b"")

    def _flush_logs(self, runs: dict[str, _Run]) -> None:
        for run in runs.values():
            if not run.pending_logs:
                continue
            lines = []
            for record in run.pending_logs:
                entry = {key: (float(value) if isinstance(value, Tensor) else value) for key, value in record.items()}
                lines.append(json.dumps(entry))
                run.last_metrics = {key: value for key, value in entry.items() if isinstance(value, float)}
            run.pending_logs.clear()
            try:
                with open(run.folder / LOG_FILENAME, "a") as log:
                    log.write("\n".join(lines) + "\n")
            except OSError as err:
                raise MonoscopeError(f"could not write {run.folder / LOG_FILENAME}: {err.strerror or err}") from err

    def _postfix(self, runs: dict[str, _Run]) -> str:
        parts = []
        for index, run in enumerate(runs.values()):
            m = run.last_metrics
            if not m:
                continue
            prefix = f"[{index}] " if len(runs) > 1 else ""
            parts.append(
                f"{prefix}loss={m.get('loss', float('nan')):.4g} fvu={m.get('fvu', float('nan')):.3f} "
                f"L0={m.get('l0', float('nan')):.1f} dead={100 * m.get('dead_frac', 0.0):.1f}%"
            )
        return " | ".join(parts)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _checkpoint(self, runs: dict[str, _Run]) -> None:
        if self.step == 0:
            return
        self._verify_finite(runs.values())
        run_states = {
            name: RunState(
                tensors={} if run.done else run.checkpoint_tensors(), config=run.cfg.to_dict(), done=run.done
            )
            for name, run in runs.items()
        }
        trainer_tensors = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            trainer_tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "tokens": self.step * self.batch_size,
            "position": self.position.to_dict(),
            "run_steps": {name: run.step for name, run in runs.items()},
        }
        self._last_checkpoint = save_checkpoint(
            self.checkpoint_root,
            self.step,
            state,
            run_states,
            self._file_names(),
            trainer_tensors,
            self.keep_checkpoints,
        )

    def _restore_or_start(self, runs: dict[str, _Run]) -> bool:
        """Load the newest checkpoint (or finished SAEs) into `runs`; True when training continues from one."""
        checkpoints = list_checkpoints(self.checkpoint_root)
        if checkpoints and not self.resume:
            raise MonoscopeError(
                f"{self.out_dir} already holds checkpoints of a training run; resume it or choose another output folder"
            )
        if not checkpoints:
            finished = [run for run in runs.values() if (run.folder / INFO_FILENAME).is_file()]
            for run in finished:
                if not self.resume:
                    raise MonoscopeError(f"{run.folder} already holds a trained SAE; choose another output folder")
                self._adopt_finished(run)
            return False
        step, folder = checkpoints[-1]
        state, run_states, trainer_tensors = load_checkpoint(folder)
        if set(run_states) != set(runs):
            raise MonoscopeError(
                f"the checkpoint in {folder} trains {', '.join(sorted(run_states))} but this run asks for "
                f"{', '.join(sorted(runs))}; use the same SAEs to resume or choose another output folder"
            )
        for name, run in runs.items():
            saved = run_states[name]
            saved_config, config = _flat_items(_comparable(saved.config)), _flat_items(run.cfg.to_dict())
            if saved_config != config:
                differing = sorted(
                    key for key in set(saved_config) | set(config) if saved_config.get(key) != config.get(key)
                )
                raise MonoscopeError(
                    f"cannot resume {name!r} from {folder}: its config differs in {', '.join(differing)}; "
                    "use the original settings or choose another output folder"
                )
            if saved.done:
                self._adopt_finished(run)
            else:
                run.restore(saved.tensors)
                run.step = int(state["run_steps"][name])
        self.step = int(state["step"])
        self.position = DataPosition.from_dict(state["position"])
        torch.set_rng_state(trainer_tensors["rng.cpu"])
        if "rng.cuda" in trainer_tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(trainer_tensors["rng.cuda"], self.device)
        self._last_checkpoint = folder
        return True

    def _adopt_finished(self, run: _Run) -> None:
        """Treat an SAE already saved by an earlier call as done (its config must match)."""
        sae = read_sae_folder(run.folder, device=self.device)
        training = sae.info.get("training", {})
        if _comparable(training.get("config")) != run.cfg.to_dict():
            raise MonoscopeError(
                f"{run.folder} already holds an SAE trained with other settings; choose another output folder"
            )
        run.done = True
        run.step = int(training.get("steps", 0))
        run.result = TrainResult(
            run.name,
            sae,
            run.folder,
            run.step,
            int(training.get("tokens", 0)),
            bool(training.get("complete", False)),
            dict(training.get("final_metrics", {})),
        )

    # ---- the end -------------------------------------------------------------------------------------

    def _finish(self, run: _Run, complete: bool, started: float) -> None:
        self._flush_logs({run.name: run})
        sae = run.inference_sae()
        if run.cfg.activation_scale != 1.0:
            sae.fold_activation_scale(run.cfg.activation_scale)
        tokens = run.step * self.batch_size
        info = {
            **self.info,
            "hook_name": run.cfg.hook_name or self.info.get("hook_name"),
            "activation_scale": run.cfg.activation_scale,
            "activation_scale_folded": True,
            "trained_architecture": run.cfg.architecture,
            "training": {
                "config": run.cfg.to_dict(),
                "steps": run.step,
                "tokens": tokens,
                "complete": complete,
                "seconds": round(time.perf_counter() - started, 3),
                "final_metrics": run.last_metrics,
            },
        }
        save_sae(sae, run.folder, info)
        run.done = True
        run.result = TrainResult(run.name, sae, run.folder, run.step, tokens, complete, dict(run.last_metrics))

    def _stream_ended(self, runs: dict[str, _Run], started: float) -> None:
        self._verify_finite(runs.values())
        self._flush_logs(runs)
        for run in runs.values():
            if not run.done:
                warnings.warn(
                    f"the activation stream ended after {run.step * self.batch_size} tokens, before the "
                    f"{run.cfg.total_steps * self.batch_size} asked for {run.name!r}; saving the SAE as trained so far",
                    stacklevel=3,
                )
                self._finish(run, complete=False, started=started)
        shutil.rmtree(self.checkpoint_root, ignore_errors=True)


# ---- convenience entry points ----------------------------------------------------------------------------


def train_sae(config: TrainConfig, batches: Iterable[Any], out_dir: str | os.PathLike, **options: Any) -> TrainResult:
    """Train one SAE on a stream of [n, d_in] tensors; the SAE is saved in `out_dir`. Options: see `SAETrainer`."""
    trainer = SAETrainer({"sae": config}, out_dir, single=True, **options)
    (result,) = trainer.fit(batches).values()
    return result


def train_saes(
    configs: Mapping[str, TrainConfig] | Sequence[TrainConfig],
    batches: Iterable[Any],
    out_dir: str | os.PathLike,
    **options: Any,
) -> dict[str, TrainResult]:
    """Train several SAEs from one pass over a stream of {hook name: tensor} dicts; SAE `name` goes to out_dir/name."""
    if not isinstance(configs, Mapping):
        named: dict[str, TrainConfig] = {}
        for cfg in configs:
            name = cfg.default_name()
            if name in named:
                raise MonoscopeError(f"two SAEs would both be saved as {name!r}; pass a dict of names to configs")
            named[name] = cfg
        configs = named
    for name in configs:
        if not name or "/" in name or name in (".", "..", CHECKPOINT_DIRNAME):
            raise MonoscopeError(f"{name!r} cannot be an SAE folder name")
    return SAETrainer(configs, out_dir, **options).fit(batches)


def _comparable(saved: Any) -> Any:
    """A saved training config as `TrainConfig.to_dict()` writes it today (older versions wrote it flat)."""
    if not isinstance(saved, dict):
        return saved
    try:
        return TrainConfig.from_dict(saved).to_dict()
    except (MonoscopeError, TypeError):
        return saved


def _flat_items(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"arch.k": 32, ...}, so a difference is named by its field."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def train_from_batches(
    batches: Iterable[Any],
    out: str | os.PathLike,
    *,
    tokens: int,
    d_sae: int | None = None,
    expansion_factor: float | None = None,
    k: int = 32,
    arch: str = "topk",
    batch_size: int = 4096,
    lr: float | None = None,
    optimizer: str | OptimizerConfig | None = None,
    seed: int = 0,
    d_in: int | None = None,
    hook_name: str = "",
    activation_scale: float = 1.0,
    info: Mapping[str, Any] | None = None,
    resume: bool = True,
    device: str | None = None,
    checkpoint_every_tokens: int | None = None,
    progress: bool = True,
    **config_overrides: Any,
) -> TrainResult:
    """What `monoscope train` runs: one SAE from a batch source, saved in `out`.

    `d_in` is read from the first batch when not given. `optimizer` is a name ("adam", "signum", "adam_sf")
    or an `OptimizerConfig`; `lr` overrides its learning rate. Extra keyword arguments set other
    `TrainConfig` fields (e.g. `multi_topk=True`, `l1_coefficient=3.0`).
    """
    if d_in is None:
        d_in, batches = peek_width(batches, hook_name or None)
    config = TrainConfig(
        d_in=d_in,
        total_tokens=tokens,
        d_sae=d_sae,
        expansion_factor=expansion_factor,
        architecture=arch,
        k=k,
        batch_size=batch_size,
        optimizer=optimizer_config(optimizer, lr),
        seed=seed,
        hook_name=hook_name,
        activation_scale=activation_scale,
        **config_overrides,
    )
    return train_sae(
        config,
        batches,
        out,
        resume=resume,
        device=device,
        checkpoint_every_tokens=checkpoint_every_tokens,
        progress=progress,
        info=info,
    )


def load_train_log(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-step records of `train_log.jsonl` in an SAE folder."""
    path = Path(folder) / LOG_FILENAME
    if not path.is_file():
        raise MonoscopeError(f"{folder} has no {LOG_FILENAME}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "SAETrainer",
    "TrainResult",
    "train_sae",
    "train_saes",
    "train_from_batches",
    "load_train_log",
    "default_device",
]
