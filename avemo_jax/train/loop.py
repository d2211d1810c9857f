"""The one training loop, shared by every stage: step, log, evaluate, checkpoint, resume."""
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import Checkpoints
from avemo_jax.train.writer import MetricWriter


@dataclasses.dataclass
class Stage:
  """What the loop needs to train one stage.

  `step(state, *step_args, batch) -> (state, metrics)` is a pure function (static arguments
  already bound); the loop jits it once with the state donated. `evaluate(state) -> dict`
  returns scalar metrics (plus anything non-scalar, which is not logged).
  """
  name: str
  config: ml_collections.ConfigDict
  step: Callable
  step_args: tuple[Any, ...]
  batches: grain.DatasetIterator
  evaluate: Callable[[state_lib.TrainState], dict[str, Any]]


def _scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  return {prefix + k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def train(stage: Stage, state: state_lib.TrainState, workdir: pathlib.Path,
          max_checkpoints: int) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Trains `stage` to `config.num_steps` from the newest checkpoint in workdir (if any)."""
  cfg = stage.config
  checkpoints = Checkpoints(workdir / "checkpoints", max_checkpoints)
  start = checkpoints.latest_step() or 0
  if start:
    state = checkpoints.restore(state, stage.batches, start)
  writer = MetricWriter(workdir, resume_step=start)
  step_fn = jax.jit(stage.step, donate_argnums=0)
  schedule = state_lib.schedule(cfg)
  pending, data_wait, window_start = [], 0.0, time.perf_counter()
  for step in range(start + 1, cfg.num_steps + 1):
    t0 = time.perf_counter()
    batch = next(stage.batches)
    data_wait += time.perf_counter() - t0
    state, metrics = step_fn(state, *stage.step_args, batch)
    pending.append(metrics)
    last = step == cfg.num_steps
    if step % cfg.log_every == 0 or last:
      host = jax.device_get(pending)  # blocks: the only host sync of the window
      elapsed = time.perf_counter() - window_start
      logged = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      logged.update(learning_rate=float(schedule(step - 1)),
                    steps_per_sec=len(host) / elapsed, data_wait_frac=data_wait / elapsed)
      writer.write(step, logged)
      eta = (cfg.num_steps - step) * elapsed / len(host)
      logging.info("[%s] step %d/%d loss %.4f  %.2f steps/s  data wait %.0f%%  ETA %.0fs",
                   stage.name, step, cfg.num_steps, logged["loss"], logged["steps_per_sec"],
                   100 * logged["data_wait_frac"], eta)
      pending, data_wait, window_start = [], 0.0, time.perf_counter()
    if cfg.eval_every and step % cfg.eval_every == 0 and not last:
      writer.write(step, _scalars(stage.evaluate(state), "eval_"))
      window_start = time.perf_counter()  # evaluation time is not training throughput
    if step % cfg.checkpoint_every == 0 or last:
      checkpoints.save(step, state, stage.batches)
  checkpoints.close()
  final = stage.evaluate(state)
  writer.write(cfg.num_steps, _scalars(final, "eval_"))
  writer.close()
  return state, final
